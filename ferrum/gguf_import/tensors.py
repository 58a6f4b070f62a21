"""Every GGUF tensor mapped to its Hugging Face name and shape, stored packed or dense, and streamed into
``model.safetensors``."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ferrum.arch.heads import layout as heads_layout
from ferrum.arch.tensors import bias_of, check_padded_groups, grouped_qkv_order, model_name, stored_name, weight_shapes
from ferrum.checkpoint import write_safetensors_header
from ferrum.config import ModelConfig
from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.architectures import (
    BLOCK_TENSORS, GLOBAL_TENSORS, IGNORED_BLOCK_TENSORS, MOE_BLOCK_TENSORS, ROPE_FACTOR_TENSORS,
    SUPPORTED_ARCHITECTURES, for_model_type,
)
from ferrum.gguf_import.files import Metadata
from ferrum.moe.loading import is_expert_stack, mlx_lm_stack_name
from ferrum.moe.spec import ROUTER
from ferrum.quant.affine import FloatCodes, QuantizedWeight
from ferrum.quant.config import AFFINE, QuantConfig
from ferrum.quant.gguf import StoredForm, describe, repack

ProgressFn = Callable[[int, int, str], None]


#: Float dtypes ``dequantize_to`` accepts.
DEQUANTIZE_DTYPES = ("float32", "float16", "bfloat16")
#: safetensors' name of each stored dtype.
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32", "uint8": "U8"}


def check_finite(plan: list["PlannedTensor"], where: str) -> None:
    """Float tensors hold finite values (quantized ones: their scales, checked by ``describe``)."""
    for p in plan:
        for t in p.sources:
            if t.data.dtype.kind == "f" and not np.isfinite(t.data).all():
                raise CheckpointError(f"{where}: tensor {t.name} holds NaN or infinite values")


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q/k projection (``[n_heads * head_dim, ...]``).

    llama.cpp's converter reorders each head's rows ``(half, j) -> (j, half)`` so
    that the rotary pairs ``(j, j + d/2)`` of the rotate-half layout become the
    adjacent rows ``(2j, 2j + 1)`` its rope kernel rotates. Reading each head's
    rows as ``(j, half)`` and swapping back restores Hugging Face's order.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"cannot un-permute a q/k tensor of {rows} rows over {n_heads} heads")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass
class PlannedTensor:
    hf_name: str
    source: Any  # gguf ReaderTensor
    shape: tuple[int, ...]  # numpy / Hugging Face order
    row_order: np.ndarray | None  # rows taken in this order (q/k un-permuted, q/k/v regrouped), or as stored
    offset: float = 0.0  # subtracted from the values (Gemma's norms)
    form: StoredForm | None = None  # how it is written, set by choose_forms
    joined: tuple[Any, ...] = ()  # further tensors whose rows follow ``source``'s (``_Architecture.joined``)
    rows: tuple[int, int] | None = None  # the share ``[start, stop)`` of ``source``'s rows it is (``.split``)
    columns: np.ndarray | None = None  # its equal column groups taken in this order (Qwen3.5's out_proj)
    restore: Callable[[np.ndarray, str], np.ndarray] | None = None  # a float value's own undoing (A_log's)

    @property
    def module(self) -> str:
        return self.hf_name.removesuffix(".weight")

    @property
    def sources(self) -> tuple[Any, ...]:
        """The GGUF tensors whose rows make this one, in order."""
        return (self.source, *self.joined)

    def part_shape(self, source: Any) -> tuple[int, ...]:
        """``source``'s shape: its rows of a joined tensor (InternLM2's q, k and v, unequal); a split one's whole (a
        stack's as stored, or as its rows where it is cut into matrices: Gemma 3n's AltUp projections; a
        convolution's ``[C, K]`` as the ``[C, 1, K]`` read); else the tensor's."""
        if self.rows is not None:
            shape = numpy_shape(source)
            if len(shape) > len(self.shape) > 1:  # a stack cut into matrices: its rows, one after another
                return _as_matrix(shape)
            return shape if len(shape) == len(self.shape) else (shape[0], *self.shape[1:])
        return (numpy_shape(source)[0], *self.shape[1:]) if self.joined else self.shape


@dataclass(frozen=True)
class MetadataTensor:
    """Values the converter moved into the metadata that the family reads as a tensor (Apertus's xIELU parameters),
    with what the import reads of a gguf reader's tensor: a name, float32 data and GGUF's dimension order."""

    name: str
    data: np.ndarray

    @property
    def tensor_type(self) -> Any:
        from gguf.constants import GGMLQuantizationType

        return GGMLQuantizationType.F32

    @property
    def shape(self) -> list[int]:
        return list(reversed(self.data.shape))


def numpy_shape(tensor: Any) -> tuple[int, ...]:
    """GGUF lists ne0 (fastest) first; numpy wants the slowest dimension first."""
    return tuple(int(n) for n in reversed(list(tensor.shape)))


def _gguf_dequantize(data: np.ndarray, tensor: Any, where: str) -> np.ndarray:
    """``data`` (some or all of ``tensor``'s blocks) through the ``gguf`` package's own dequantization."""
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    if tensor.tensor_type in (Q.I8, Q.I16, Q.I32, Q.I64, Q.F64):
        raise UnsupportedFeatureError(
            f"{where}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which is not a weight type "
            "llama.cpp writes for a model's matrices; Ferrum reads F32, F16, BF16 and its quantized types")
    try:
        return dequantize(data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise UnsupportedFeatureError(
            f"{where}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the installed "
            f"gguf package cannot dequantize ({exc}); try upgrading it: pip install -U gguf"
        ) from exc


def dequantized(tensor: Any, where: str) -> np.ndarray:
    """A GGUF tensor's values as float32 in numpy order."""
    array = _gguf_dequantize(tensor.data, tensor, where)
    shape = numpy_shape(tensor)
    if array.size != math.prod(shape):
        raise CheckpointError(
            f"{where}: tensor {tensor.name} dequantized to {array.size} values but its shape {shape} "
            f"needs {math.prod(shape)}"
        )
    return np.ascontiguousarray(array, dtype=np.float32).reshape(shape)


def _check_quant_types(tensors: Iterable[Any], where: str) -> None:
    """Dequantize one block of every storage type up front, so nothing is written for a file we cannot read."""
    seen: dict[Any, Any] = {}
    for t in tensors:
        seen.setdefault(t.tensor_type, t)
    for t in seen.values():
        _gguf_dequantize(t.data.reshape(-1, t.data.shape[-1])[:1] if t.data.ndim else t.data, t, where)


def _in_layout(arch: Any, name: str) -> str:
    """Llama's name ``model.* / lm_head.*`` under the family's decoder prefix and LM head (GPT-NeoX's)."""
    if name.startswith("lm_head."):
        return bias_of(arch.lm_head) if name.endswith(".bias") else arch.lm_head
    return arch.prefix + name.removeprefix("model.")


def _checkpoint_name(arch: Any, name: str) -> str:
    """Llama's name ``name`` as the family's checkpoint stores it, a block's index the checkpoint's layer: one of
    several of Ferrum's where the family runs sub-layers (RWKV-7's time and channel mixes), the module telling which."""
    name = _in_layout(arch, name)
    if arch.sublayers is not None:
        name = arch.sublayers.model(arch.prefix, name)
    return stored_name(arch, name)


def plan_tensors(reader: Any, cfg: dict[str, Any], where: str, gguf_arch: str | None = None) -> list[PlannedTensor]:
    """Map every GGUF tensor to its Hugging Face name and the shape the model reads it in: ``weight_shapes`` of
    the config being written (rope_freqs and longrope's factors are read into the config instead); ``gguf_arch``
    is the file's architecture, where several write one family."""
    model_config = ModelConfig.from_dict(cfg, where)
    arch = for_model_type(cfg["model_type"], gguf_arch, experts=model_config.arch.moe is not None)
    # written as the converter stored them, [out, in], whatever the family's own checkpoints do (GPT-2's Conv1D)
    model_arch = replace(model_config.arch, transposed=False, lm_head=_lm_head(model_config.arch))
    model_config = replace(model_config, arch=model_arch)
    by_name = {t.name: t for t in reader.tensors}
    expected = _with_split_kv_b(weight_shapes(model_config), model_config, by_name)
    heads, kv_heads = model_config.num_heads, model_config.num_kv_heads
    block_tensors = {**BLOCK_TENSORS, **dict(arch.renamed)}
    for tensor, renamed in arch.renamed_with:
        if f"blk.0.{tensor}" in by_name:
            block_tensors.update(renamed)
    if arch.moe is not None:
        router = {"ffn_gate_inp.weight": f"{arch.moe.router or ROUTER.get(arch.model_type, 'gate')}.weight"}
        moe_tensors = {**MOE_BLOCK_TENSORS, **router, **dict(arch.moe.shared_tensors)}
        block_tensors.update({name: f"{arch.moe.module}.{suffix}" for name, suffix in moe_tensors.items()})
    # the next-token-prediction layers (GLM-4.5's) the converter appends after the decoder's: not run, not read
    layers = model_config.num_layers  # cfg spells it in the family's words (GPT-2's n_layer)
    predicted = cfg.get("num_nextn_predict_layers") or cfg.get("mtp_num_hidden_layers") or 0  # GLM's, Qwen3.5's
    if not predicted and gguf_arch is not None:  # a family that reads none (Ling 2.0's): the file's, left out
        predicted = int(Metadata(reader, where).get(f"{gguf_arch}.nextn_predict_layers") or 0)
    prediction_layers = range(layers, layers + predicted)
    joins = {parts[0]: (parts, target) for parts, target in arch.joined}
    splits = dict(arch.split)
    global_splits = dict(arch.split_globals)
    later_parts = {part for parts, _ in arch.joined for part in parts[1:]}
    global_tensors = {**GLOBAL_TENSORS, **dict(arch.renamed_globals)}
    otherwise = dict(arch.otherwise)
    plan: list[PlannedTensor] = []
    unknown: list[str] = []
    block = re.compile(r"blk\.(\d+)\.(.+)$")
    for name, tensor in by_name.items():
        if name == "rope_freqs.weight" or name in ROPE_FACTOR_TENSORS:  # read into the config
            continue
        row_order, hf_name = None, global_tensors.get(name)
        if name in global_splits:
            planned = _split_rows(tensor, [_checkpoint_name(model_arch, t)
                                           for t in global_splits[name]], expected, where)
            plan += planned
            unknown += [name] if not planned else []
            continue
        m = block.match(name)
        if m is not None:
            i, rest = int(m.group(1)), m.group(2)
            if rest.split(".")[0] in IGNORED_BLOCK_TENSORS or i in prediction_layers:
                continue
            if arch.unread is not None and re.fullmatch(arch.unread, name):  # the converter's dummies
                continue
            if rest in _KV_B_HALVES and f"blk.{i}.attn_kv_b.weight" in by_name:  # the same numbers, split
                continue
            if rest in later_parts:  # planned with the first part of its join
                continue
            own = arch.own_tensors(rest, cfg) if arch.own_tensors is not None else None
            if own is not None:
                names = [_checkpoint_name(model_arch, f"model.layers.{i}.{r.name}") for r in own]
                plan += _restored(tensor, own, names, expected, arch, where)
                continue
            if rest in splits:
                planned = _split_rows(tensor, [_checkpoint_name(model_arch, f"model.layers.{i}.{t}")
                                               for t in splits[rest]], expected, where)
                plan += planned
                unknown += [name] if not planned else []
                continue
            joined = joins.get(rest)
            if joined is not None:
                parts, target = joined
                tensor = [by_name.get(f"blk.{i}.{part}") for part in parts]
                if None in tensor:  # the whole joined tensor is then named missing
                    continue
            hf_name = f"model.layers.{i}.{block_tensors[rest]}" if rest in block_tensors else None
            if joined is not None:
                hf_name = f"model.layers.{i}.{target}"
                row_order = _joined_row_order(arch, joined[0], model_config)
            elif arch.permuted_qk and rest in _PERMUTED_QK:  # a bias's rows as its matrix's, over the layer's heads
                rows = numpy_shape(tensor)[0]  # (Nemotron NAS's key/value heads differ by layer)
                row_order = unpermute_qk(np.arange(rows), max(1, rows // model_config.head_dim))
            elif arch.grouped_qkv and rest.startswith("attn_qkv."):  # the checkpoint's rows, grouped by kv head
                row_order = np.argsort(grouped_qkv_order(heads, kv_heads, model_config.head_dim))
        if hf_name is not None:  # under the family's own prefix and module names
            hf_name = _checkpoint_name(model_arch, hf_name)
        want = expected.get(hf_name)
        if want is None and m is not None and rest in otherwise:  # a layer that reads it otherwise
            hf_name = _checkpoint_name(model_arch, f"model.layers.{m.group(1)}.{otherwise[rest]}")
            want = expected.get(hf_name)
        if want is None and hf_name is not None and model_arch.unloaded and re.search(model_arch.unloaded, hf_name):
            continue  # stored, but not read (Gemma 4's keys and values of the layers that read another's)
        if want is None:
            unknown.append(name)
            continue
        tensor, joined = (tensor[0], tuple(tensor[1:])) if isinstance(tensor, list) else (tensor, ())
        shape = numpy_shape(tensor)
        if len(shape) == 1 and len(want) == 2 and math.prod(want) == shape[0]:  # a matrix the converter flattened
            shape = want  # (a one-row one; RWKV-7's per-head r_k)
        if joined:  # the rows the converter split, one part after another
            shapes = [numpy_shape(t) for t in (tensor, *joined)]
            shape = (sum(s[0] for s in shapes), *shape[1:]) if len({s[1:] for s in shapes}) == 1 else shapes
        if shape != want:
            raise CheckpointError(
                f"{where}: tensor {name} ({hf_name}) has shape {shape} but the metadata implies {want}"
            )
        offset = _norm_offset(hf_name, arch)
        plan.append(PlannedTensor(hf_name, tensor, shape, row_order, offset, joined=joined))
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        raise UnsupportedFeatureError(
            f"{where}: {len(unknown)} tensor(s) have no place in a {arch.hf_class} checkpoint: {shown}. "
            f"Ferrum's GGUF import handles dense {', '.join(SUPPORTED_ARCHITECTURES)} files as llama.cpp's "
            "converter writes them"
        )
    if arch.metadata_tensors is not None:
        for name, value in arch.metadata_tensors(Metadata(reader, where), f"{gguf_arch}.", cfg).items():
            hf_name = _checkpoint_name(model_arch, name)
            if expected.get(hf_name) != value.shape:
                raise CheckpointError(f"{where}: {hf_name} from the metadata has shape {value.shape} but the "
                                      f"metadata implies {expected.get(hf_name)}")
            plan.append(PlannedTensor(hf_name, MetadataTensor(name, value), value.shape, None))
    have = {p.hf_name for p in plan}
    missing = [n for n in expected if n not in have]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{where}: GGUF file lacks {len(missing)} tensor(s) a {arch.hf_class} needs: {shown}")
    spec = model_arch.moe
    if spec is not None and spec.layout is None:  # the experts where mlx-lm's conversions of the family stack them
        for p in plan:  # (dots1's module, Nemotron 3 Nano's fc1 / fc2), which the loader reads
            if is_expert_stack(p.hf_name):
                p.hf_name = mlx_lm_stack_name(spec, p.hf_name)
    return plan


def _lm_head(arch: Any) -> str:
    """The LM head's name as the family's checkpoints store it: where a layout of its own under its usual prefix
    renames nothing else, that layout's (InternLM2's ``output``), which the loader tries first."""
    return next((head for prefix, head, names, *_ in arch.layouts if prefix == arch.prefix and not names), arch.lm_head)


def _joined_row_order(arch: Any, parts: tuple[str, ...], config: ModelConfig) -> np.ndarray | None:
    """The joined rows' order where the parts are q, k and v (InternLM2's, which the converter cut out of its wqkv):
    each of q and k un-permuted where the converter permuted them, then grouped by key/value head where the family
    reads them so (``_Architecture.grouped_qkv``); None for other parts (in order)."""
    if parts != _QKV_PARTS:
        return None
    heads, kv_heads, d = config.num_heads, config.num_kv_heads, config.head_dim
    order = np.arange((heads + 2 * kv_heads) * d)
    if arch.permuted_qk:
        order = np.concatenate([unpermute_qk(order[:heads * d], heads),
                                unpermute_qk(order[heads * d:(heads + kv_heads) * d], kv_heads),
                                order[(heads + kv_heads) * d:]])
    return order[np.argsort(grouped_qkv_order(heads, kv_heads, d))] if arch.grouped_qkv else order


#: The tensors whose rows llama.cpp's converter permutes for its adjacent-pair rope (``LlamaModel.permute``, which it
#: applies to q/k biases too: DeepSeek-MoE's).
_PERMUTED_QK = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")
#: q, k and v as separate GGUF tensors, joined into one (``_joined_row_order``).
_QKV_PARTS = ("attn_q.weight", "attn_k.weight", "attn_v.weight")


def _norm_offset(hf_name: str, arch: Any) -> float:
    """What the converter added to ``hf_name``: a norm's own offset (``_Architecture.norm_offsets``), else the
    family's norm offset on its norm weights, but those it left."""
    own = [offset for suffix, offset in arch.norm_offsets if hf_name.endswith(suffix)]
    if own:
        return own[0]
    shifted = hf_name.endswith("norm.weight") and not hf_name.endswith(arch.unshifted_norms)
    return arch.norm_offset if shifted else 0.0


def _restored(tensor: Any, own: tuple[Any, ...], names: list[str], expected: dict[str, tuple[int, ...]],
              arch: Any, where: str) -> list[PlannedTensor]:
    """``tensor`` as the Hugging Face tensors ``names`` a family's ``own_tensors`` reading makes of it (``own``: each
    one's rows, column groups and value restore), in the shapes the model reads (the convolution's ``[C, K]`` as
    ``[C, 1, K]``)."""
    shape = numpy_shape(tensor)
    planned = []
    for r, name in zip(own, names):
        want = expected.get(name)
        got = shape if r.rows is None else _selected_shape(shape, len(r.rows))
        flat = want is not None and len(want) == 1 and math.prod(got) == want[0]  # a vector stored in rows
        if want is None or ([n for n in got if n != 1] != [n for n in want if n != 1] and not flat):
            raise CheckpointError(f"{where}: tensor {tensor.name} ({name}) has shape {got} but the metadata implies "
                                  f"{want}")
        rows = None if r.rows is None else (0, shape[0])  # all the source's rows, then those it takes, in order
        planned.append(PlannedTensor(name, tensor, want, r.rows, _norm_offset(name, arch), rows=rows,
                                     columns=r.columns, restore=r.restore))
    return planned


def _selected_shape(shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """The shape of ``rows`` of a tensor's rows: of a stack ``[E, N, K]``, its ``E * N`` rows, as many of each."""
    if len(shape) < 3:
        return (rows, *shape[1:])
    return (*shape[:-2], rows // math.prod(shape[:-2]), shape[-1])


def _split_rows(tensor: Any, names: list[str], expected: dict[str, tuple[int, ...]],
                where: str) -> list[PlannedTensor]:
    """``tensor`` as the consecutive shares of its rows the model reads as ``names`` (``_Architecture.split`` and
    ``split_globals``; a stack's rows, one matrix after another); none where the model reads none of them."""
    shapes = [expected.get(name) for name in names]
    if all(s is None for s in shapes):
        return []
    shape = numpy_shape(tensor)
    if None not in shapes and len(shape) > max(len(s) for s in shapes):  # a stack read as its rows
        shape = _as_matrix(shape)
    if None in shapes or sum(s[0] for s in shapes) != shape[0] or any(
            _unit_free(s[1:]) != _unit_free(shape[1:]) for s in shapes):  # RWKV-7's mixes, [6, 1, 1, C] -> [1, 1, C]
        raise CheckpointError(f"{where}: tensor {tensor.name} has shape {shape}, but the metadata implies "
                              f"{' + '.join(str(s) for s in shapes)} for {', '.join(names)}")
    bounds = np.cumsum([0, *(s[0] for s in shapes)])
    return [PlannedTensor(name, tensor, s, None, rows=(int(start), int(stop)))
            for name, s, start, stop in zip(names, shapes, bounds[:-1], bounds[1:])]


def _unit_free(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without its 1s: the same values whatever unit axes the converter or the family adds."""
    return tuple(n for n in shape if n != 1)


#: The per-head halves of latent attention's ``attn_kv_b`` that llama.cpp's newer converters write beside it or in
#: its place: ``attn_k_b [H, kv_lora, nope]`` (each head's key rows transposed) and ``attn_v_b [H, v, kv_lora]``.
_KV_B_HALVES = ("attn_k_b.weight", "attn_v_b.weight")


def _with_split_kv_b(expected: dict[str, tuple[int, ...]], config: ModelConfig,
                     by_name: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``expected`` with each layer's ``kv_b_proj`` that the file holds only as its two halves replaced by them,
    under mlx-lm's names (``ferrum.arch.mla.SPLIT_KV_B``), which the loader joins back into it."""
    from ferrum.arch.mla import SPLIT_KV_B

    if config.arch.mla is None:
        return expected
    out = dict(expected)
    for i in range(config.num_layers):
        if f"blk.{i}.attn_kv_b.weight" in by_name or not all(f"blk.{i}.{h}" in by_name for h in _KV_B_HALVES):
            continue
        stem = f"{config.arch.prefix}layers.{i}."
        if f"{stem}self_attn.kv_b_proj.weight" not in out:  # no latent attention there (Kimi Linear's KDA layers):
            continue  # the halves have no place, which the plan refuses by name
        del out[f"{stem}self_attn.kv_b_proj.weight"]
        halves = zip(SPLIT_KV_B, config.arch.latent(i).split_shapes())
        out.update({f"{stem}{module}.weight": shape for module, shape in halves})
    return out


def choose_forms(plan: list[PlannedTensor], dequantize_to: str | None, where: str) -> None:
    """Decide how every tensor is stored, checking types, block shapes and scales before anything is written."""
    if dequantize_to is not None:
        _check_quant_types([t for p in plan for t in p.sources], where)
        for p in plan:
            p.form = StoredForm(p.shape, dequantize_to)
        return
    for p in plan:
        try:
            forms = [describe(t.data, t.tensor_type.name, _as_matrix(p.part_shape(t)), t.name) for t in p.sources]
        except (CheckpointError, UnsupportedFeatureError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        if len({(f.bits, f.group_size, f.mode) for f in forms}) > 1:
            raise UnsupportedFeatureError(
                f"{where}: {' and '.join(t.name for t in p.sources)}, which Ferrum joins into {p.hf_name}, are "
                f"stored as {' and '.join(t.tensor_type.name for t in p.sources)}; one packed tensor needs one "
                "format. Import through float with convert_gguf(..., dequantize_to='float32')")
        dtype = forms[0].dtype if len({f.dtype for f in forms}) == 1 else "float32"  # float16 and float32 scales
        p.form = replace(forms[0], shape=p.shape, dtype=dtype)
        _check_reorderable(p, where)


def check_padded_heads(plan: list[PlannedTensor], cfg: dict[str, Any], where: str) -> None:
    """Refuse, before writing, a packed matrix whose inputs Ferrum pads per head at load (Gemma 4's o_proj of the
    narrower sliding heads) where a head does not end on one of its blocks: the padding would cut a block."""
    config = ModelConfig.from_dict(cfg, where)
    for p in plan:
        if not p.form.packed:
            continue
        name = model_name(config.arch, p.hf_name)  # Llama's (PLaMo's layers are stored as layers.layers)
        try:
            check_padded_groups(config, name, p.form.bits, p.form.group_size)
        except UnsupportedFeatureError:
            width = heads_layout(config, config.arch.layers[int(re.search(r"layers\.(\d+)\.", name)[1])]).value_dim
            raise UnsupportedFeatureError(
                f"{where}: tensor {p.sources[0].name} is stored as {p.sources[0].tensor_type.name}, whose blocks of "
                f"{p.form.group_size} values do not end where this layer's heads of {width} "
                f"inputs do; Ferrum pads them to {config.head_dim} at load, which packed needs whole blocks. Import "
                "through float with convert_gguf(..., dequantize_to='float32')") from None


def _check_reorderable(p: PlannedTensor, where: str) -> None:
    """A restored value needs floats; column groups moved in packed form must each be whole blocks of it."""
    names = " and ".join(t.name for t in p.sources)
    if p.restore is not None and p.form.packed:
        raise UnsupportedFeatureError(f"{where}: tensor {names} is stored as {p.sources[0].tensor_type.name}; "
                                      "Ferrum reads it from float types only (llama.cpp writes it as F32)")
    if p.columns is not None and any(shape[-1] % len(p.columns) for _, _, shape in p.form.parts()):
        raise UnsupportedFeatureError(
            f"{where}: tensor {names}'s {len(p.columns)} column groups (value heads) do not fall on whole "
            f"{p.sources[0].tensor_type.name} blocks, so they cannot be put back in order packed; import through "
            "float with convert_gguf(..., dequantize_to='float32')")


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A stack of experts ``[E, N, K]`` as the ``[E * N, K]`` rows its blocks are stored in."""
    return (math.prod(shape[:-1]), shape[-1]) if len(shape) == 3 else shape


def quantization_section(plan: list[PlannedTensor]) -> dict[str, Any] | None:
    """mlx-lm's ``quantization`` entry: the commonest (bits, group size, mode), then every matrix that differs."""
    matrices = [p for p in plan if len(p.shape) >= 2]  # expert stacks too
    formats = Counter((p.form.bits, p.form.group_size, p.form.mode) for p in matrices if p.form.packed)
    if not formats:
        return None
    bits, group_size, mode = formats.most_common(1)[0][0]
    overrides: dict[str, tuple[int, int] | None] = {}
    modes: dict[str, str] = {}
    for p in matrices:
        fmt = (p.form.bits, p.form.group_size, p.form.mode) if p.form.packed else None
        if fmt != (bits, group_size, mode):
            overrides[p.module] = None if fmt is None else fmt[:2]  # None: kept dense (``false``)
            if fmt is not None and fmt[2] != mode:
                modes[p.module] = fmt[2]
    return QuantConfig(bits, group_size, overrides, mode, modes).to_json()


def torch_dtype(plan: list[PlannedTensor]) -> str:
    """The one float dtype every matrix's scales (or dense values) are stored in, else float32.

    float16 for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 imports (their parameters are float16
    values), float32 once any K-quant or overflowing scale needs it: a backend
    following ``torch_dtype`` then computes at the precision the file was made in.
    """
    dtypes = {p.form.dtype for p in plan if len(p.shape) >= 2 and p.form.mode == AFFINE}  # not uint8 exponents
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def _numpy_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _stored_arrays(p: PlannedTensor, dequantize_to: str | None, where: str) -> list[np.ndarray]:
    """The arrays ``p.form.parts()`` describes, joined tensors' rows one after the other, q/k rows un-permuted."""
    pieces = [_source_arrays(p, t, dequantize_to, where) for t in p.sources]
    arrays = pieces[0] if len(pieces) == 1 else [np.concatenate(rows) for rows in zip(*pieces)]
    if p.rows is not None:  # whole rows again: exact when packed
        arrays = [a[p.rows[0]:p.rows[1]] for a in arrays]
    if p.row_order is not None:  # whole rows move (a stack's, each expert's in turn): exact when packed
        arrays = [a[p.row_order] if a.ndim < 3 else a.reshape(-1, a.shape[-1])[p.row_order].reshape(
            *p.shape[:-1], -1) for a in arrays]
    if p.columns is not None:  # whole column groups (whole blocks when packed: _check_reorderable) move
        n = len(p.columns)
        arrays = [a.reshape(*a.shape[:-1], n, -1)[..., p.columns, :].reshape(a.shape) for a in arrays]
    return arrays


def _source_arrays(p: PlannedTensor, t: Any, dequantize_to: str | None, where: str) -> list[np.ndarray]:
    """One source's share of ``p``'s arrays, in the dtypes ``p.form`` gives."""
    shape = p.part_shape(t)
    if dequantize_to is None:
        value = repack(t.data, t.tensor_type.name, _as_matrix(shape), t.name)  # checked by choose_forms
    else:
        value = dequantized(t, where)
    if isinstance(value, (QuantizedWeight, FloatCodes)):
        parts = (value.packed, value.scales, value.biases) if isinstance(value, QuantizedWeight) else (
            value.packed, value.scales)
        return [a.reshape(*shape[:-1], -1).astype(_numpy_dtype(dtype), copy=False)  # a joined part's scales
                for a, (_, dtype, _) in zip(parts, p.form.parts())]
    value = value.reshape(shape)
    if p.offset:  # in float32: exact for the norm weights near 1 the converter wrote
        value = value.astype(np.float32) - np.float32(p.offset)
    if p.restore is not None:
        try:
            value = p.restore(value, t.name)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    if not np.isfinite(value.astype(np.float32, copy=False)).all():
        raise CheckpointError(f"{where}: tensor {t.name} holds NaN or infinite values")
    with np.errstate(over="ignore"):  # an overflow is refused just below, by name
        stored = value.astype(_numpy_dtype(p.form.dtype), copy=False)
    if not np.isfinite(stored.astype(np.float32, copy=False)).all():
        raise CheckpointError(
            f"{where}: tensor {t.name} holds values up to {np.abs(value).max():.4g}, beyond {p.form.dtype}'s "
            "range; import it as bfloat16 or float32"
        )
    return [stored]


def write_safetensors(
    path: Path, plan: list[PlannedTensor], dequantize_to: str | None, where: str, progress: ProgressFn | None
) -> None:
    """Stream tensors into a safetensors file one at a time (never all in memory at once)."""
    tensors = [(f"{p.module}.{suffix}" if p.form.packed else p.hf_name, _SAFETENSORS_DTYPES[dtype], shape)
               for p in plan for suffix, dtype, shape in p.form.parts()]  # a dense tensor keeps its name (a bias)
    with open(path, "wb") as f:
        write_safetensors_header(f, tensors, {"format": "pt"})
        for done, p in enumerate(plan, start=1):
            for array in _stored_arrays(p, dequantize_to, where):
                f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            if progress is not None:
                progress(done, len(plan), p.hf_name)
