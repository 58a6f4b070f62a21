"""A checkpoint's tensors read from disk and placed on a backend, each matrix with the op that applies it.

A matrix is either dense (``upload_weight``, then ``linear`` / ``embedding``)
or packed affine-quantized (:mod:`ferrum.quant`). A packed one runs on the
backend's native quantized ops when its ``(bits, group_size)`` is in
``BackendInfo.quant_formats`` and the backend accepts the tensor, else on the
core's reference composition. The model stores the chosen function next to
the weight, so a forward pass never asks which kind it holds.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ferrum.arch import cla
from ferrum.checkpoint import NOT_TEXT, Checkpoint, is_float
from ferrum.config import ModelConfig
from ferrum.errors import CheckpointError, MissingTensorError, UnsupportedFeatureError
from ferrum.hookspec import DTYPE_BYTES, QUANTIZED_OPS
from ferrum.quant import awq_gptq, bitnet, float_modes, fp8
from ferrum.quant.affine import QuantizedWeight, dequantize
from ferrum.quant.config import AFFINE, FLOAT_MODES, stored_mode
from ferrum.recurrent.gated_delta import joined_taps

HostTensor = np.ndarray | QuantizedWeight

@dataclass(frozen=True)
class Placed:
    """A weight in its backend form, with the ops that consume it."""

    weight: Any
    linear: Callable[[Any, Any, Any], Any]  # (x, weight, bias) -> x @ W.T + bias
    embedding: Callable[[Any, Any], Any]  # (weight, ids) -> rows
    nbytes: int
    dense_dtype: str | None = None  # the dtype a dense weight was placed in; None: packed


class Linear:
    """One projection: ``apply(x, weight, bias)``."""

    __slots__ = ("apply", "weight", "bias", "dense_dtype")

    def __init__(self, placed: Placed, bias: Any = None):
        self.apply, self.weight, self.bias = placed.linear, placed.weight, bias
        self.dense_dtype = placed.dense_dtype  # the dtype of a dense weight (None: packed)

    def __call__(self, x: Any) -> Any:
        return self.apply(x, self.weight, self.bias)


class Projections:
    """Projections of one input (q/k/v, gate/up): ``self(x)`` is the list of their outputs.

    Either one fused matrix (:data:`ferrum.arch.tensors.FUSED`) whose output is
    cut by the ops table's ``split`` into ``sizes`` (looked up per call, so profilers
    see it), or one matrix per output. ``spans`` gives the output columns each of
    ``linears`` produces, counted over the concatenated outputs of ``group`` (the fused
    projection's name, ``qkv_proj``), which is how LoRA factors find their place in either form.
    """

    __slots__ = ("linears", "sizes", "spans", "group", "_ops")

    def __init__(self, linears: list[Linear], sizes: tuple[int, ...], group: str, split_by: Any = None):
        """``split_by``: the ops table that splits the output of one fused matrix, None for one matrix each."""
        self.linears, self.sizes, self.group, self._ops = list(linears), tuple(sizes), group, split_by
        bounds = np.cumsum((0, *sizes)).tolist()
        self.spans = [(0, bounds[-1])] if split_by is not None else list(zip(bounds[:-1], bounds[1:]))

    def adapt(self, wrap: Callable[[str, int, int, Linear], Linear]) -> None:
        """Each matrix replaced by ``wrap(group, start, stop, matrix)`` (LoRA's): the group and the columns of its
        outputs the matrix makes."""
        spans = zip(self.linears, self.spans)
        self.linears[:] = [wrap(self.group, start, stop, linear) for linear, (start, stop) in spans]

    def __call__(self, x: Any) -> list[Any]:
        if self._ops is not None:
            return self._ops.split(self.linears[0](x), self.sizes)
        return [linear(x) for linear in self.linears]


def place(ops: Any, name: str, tensor: HostTensor, dtype: str, role: str = "linear",
          needs: tuple[str, ...] = (), since: tuple[int, int] = (1, 0)) -> Placed:
    """Put one host tensor on the backend; ``role`` is "linear", "embedding", "tied" (both) or "bias"
    (added to outputs as it is: never laid out for products, which ``upload_weight`` may do to 2-D arrays).

    A stack of experts (3-D) is placed by :func:`ferrum.moe.experts.place_experts`, with the
    ``moe_experts`` features its experts ``needs`` and the plugin API they need it to declare (``since``).
    """
    from ferrum.moe import experts  # imported here: it places each expert through this module

    if experts.is_stack(tensor):
        return experts.place_experts(ops, name, tensor, dtype, needs, since)
    if not isinstance(tensor, QuantizedWeight):
        nbytes = tensor.size * DTYPE_BYTES.get(dtype, 4)
        if role == "bias":
            return Placed(ops.from_numpy(np.ascontiguousarray(tensor), dtype), ops.linear, ops.embedding, nbytes, dtype)
        return Placed(ops.upload_weight(name, tensor, dtype), ops.linear, ops.embedding, nbytes, dtype)
    if runs_natively(ops, tensor.bits, tensor.group_size):
        weight = ops.quantized_upload(name, tensor, dtype, role)
        if weight is not None:
            resident = getattr(weight, "nbytes", tensor.nbytes)  # a repacked form may be larger
            return Placed(weight, ops.quantized_linear, ops.quantized_embedding, resident)
    fallback = ops.fallback
    weight = fallback["quantized_upload"](name, tensor, dtype, role)
    resident = getattr(weight, "nbytes", tensor.nbytes)  # dequantized at load where it fits (ferrum.quant.reference)
    return Placed(weight, fallback["quantized_linear"], fallback["quantized_embedding"], resident)


def runs_natively(ops: Any, bits: int, group_size: int) -> bool:
    """Whether the backend's own quantized ops take this format."""
    return (bits, group_size) in ops.info.quant_formats and all(op in ops.native for op in QUANTIZED_OPS)


# ------------------------------------------------------------------ reading


def _tensor_parts(checkpoint: Checkpoint, present: set[str], config: ModelConfig, name: str) -> tuple[str, ...]:
    """The checkpoint tensors (of ``present``) that make up ``name``: itself, or packed weight, scales and biases
    (scales alone in MLX's float modes; AWQ's and GPTQ's ``qweight``, ``qzeros``, ``scales`` and ``g_idx``)."""
    from ferrum.moe import loading  # imported here: ferrum.moe places each expert through this module

    module = name.removesuffix(".weight")
    quant = config.quantization
    heads = split_norm_parts(config, name) if name not in present else ()  # stacked already (a GGUF import's)
    if heads:
        return heads
    folded = cla.query_norm_parts(config, name)
    if folded:  # a query norm times the ratio of two key norms (Hunyuan's cross-layer attention)
        return folded
    split = _split_kv_b(config, name, present)
    if split is not None:  # mlx-lm's embed_q and unembed_out, each dense or packed
        return tuple(part for weight in split for part in _tensor_parts(checkpoint, present, config, weight))
    joined = joined_taps(name, present) if config.arch.gated_delta is not None else None
    if joined is not None:  # OLMo Hybrid's q_conv1d, k_conv1d and v_conv1d
        return joined
    if config.arch.moe is not None and loading.is_expert_stack(name):
        return loading.expert_parts(present, config.arch.moe, name, loading.stack_mode(quant, config.arch.moe, name))
    alias = loading.correction_bias_alias(present, config.arch.moe, name) if config.arch.moe is not None else None
    if alias is not None:
        return (alias,)
    if module != name and f"{module}.qweight" in present:
        if quant is None or quant.mode_for(module) not in awq_gptq.METHODS:
            raise CheckpointError(f"{checkpoint.folder}: {module}.qweight marks an AWQ or GPTQ layer, but config.json "
                                  "has no quantization_config with quant_method awq or gptq")
        kinds = ("qweight", "qzeros", "scales") + (("g_idx",) if f"{module}.g_idx" in present else ())
        return tuple(f"{module}.{kind}" for kind in kinds)
    scale = fp8.scale_part(module, present) if _fp8(config) is not None and module != name else None
    if scale is not None:  # an FP8 weight and its scale
        return name, scale
    scale = _bitnet_scale(config, name, present)
    if scale is not None:  # a packed ternary weight, or its layer's bias, and the layer's scale
        return name, scale
    if module == name or f"{module}.scales" not in present:
        return (name,)
    if quant is None:
        raise CheckpointError(
            f"{checkpoint.folder}: {module}.scales marks a quantized module, but config.json has no "
            "'quantization' section saying its bits and group size"
        )
    if quant.for_module(module) is None:
        raise CheckpointError(
            f"{checkpoint.folder}: config.json keeps {module} in float (false) but the checkpoint holds "
            f"{module}.scales; the two disagree"
        )
    if quant.infers_formats and not quant.declares(module):  # as its tensors say: affine has biases
        return (name, f"{module}.scales") + ((f"{module}.biases",) if f"{module}.biases" in present else ())
    mode = quant.mode_for(module)
    if mode in FLOAT_MODES:  # codes and scales only
        return name, f"{module}.scales"
    if mode != AFFINE:  # an AWQ, GPTQ or FP8 section over MLX's packed layout (a config copied from another release)
        raise CheckpointError(
            f"{checkpoint.folder}: {module}.scales is MLX's packed layout, but config.json's quantization section "
            f"says {mode!r}; give the checkpoint the config.json it was written with (mlx-lm's 'quantization': "
            "bits and group_size)"
        )
    return name, f"{module}.scales", f"{module}.biases"


def _fp8(config: ModelConfig) -> Any:
    """The checkpoint's FP8 scheme (:mod:`ferrum.quant.fp8`), or None."""
    return None if config.quantization is None else config.quantization.fp8


def _bitnet(config: ModelConfig) -> Any:
    """The checkpoint's BitNet scheme (:mod:`ferrum.quant.bitnet`), or None."""
    return None if config.quantization is None else config.quantization.bitnet


def _bitnet_scale(config: ModelConfig, name: str, present: Any) -> str | None:
    """The stored scale of weight or bias ``name`` of a layer the checkpoint's BitNet scheme converts, where
    ``present`` holds it; else None (a layer left in float reads its tensors as they are)."""
    scheme, scale = _bitnet(config), bitnet.scale_name(name)
    converted = scheme is not None and name.endswith((".weight", ".bias")) and bitnet.quantizes_input(
        scheme, f"{name.rsplit('.', 1)[0]}.weight", f"{config.arch.prefix}layers.")
    return scale if converted and scale in present else None


def split_norm_parts(config: ModelConfig, name: str) -> tuple[str, ...]:
    """The per-head tensors, in head order, that make up q/k norm weight ``name`` where the family keeps one a
    head (``Architecture.qk_norm_split``; a checkpoint holding ``name`` itself stacked is read as it is); else ()."""
    arch = config.arch
    if not arch.qk_norm_split or not name.startswith(arch.prefix) or ".self_attn." not in name:
        return ()
    q_norm, k_norm = (f".self_attn.{n}.weight" for n in arch.qk_norm_names)
    heads = config.num_heads if name.endswith(q_norm) else config.num_kv_heads if name.endswith(k_norm) else 0
    return tuple(f"{name.removesuffix('.weight')}.norms.{h}.weight" for h in range(heads))


def _assemble(
    name: str, parts: dict[str, np.ndarray], shape: tuple[int, ...], config: ModelConfig, where: str
) -> HostTensor:
    from ferrum.moe import loading  # imported here, as in _tensor_parts

    heads = split_norm_parts(config, name) if name not in parts else ()
    if heads:  # one tensor a head, stacked in head order
        if any(tuple(parts[head].shape) != shape[1:] for head in heads):
            raise CheckpointError(f"{where}: {', '.join(heads)} must each be [{shape[1]}] (one head's dims)")
        return np.stack([parts[head] for head in heads])
    folded = cla.query_norm_parts(config, name)
    if folded:
        if any(tuple(parts[part].shape) != shape for part in folded):
            raise CheckpointError(f"{where}: {', '.join(folded)} must each be {list(shape)}")
        return cla.folded_query_norm(parts, folded, where)

    if config.arch.moe is not None and loading.is_expert_stack(name):  # a stack of experts, or their biases
        return loading.assemble_stack(name, parts, shape, config.arch.moe, config.quantization, where)
    joined = joined_taps(name, parts) if config.arch.gated_delta is not None else None
    if joined is not None:
        taps = np.concatenate([np.asarray(parts[part], dtype=np.float32) for part in joined])
        if tuple(taps.shape) != shape:
            raise CheckpointError(f"{where}: {', '.join(joined)} join into {tuple(taps.shape)}, but config.json "
                                  f"implies {name} {shape}")
        return taps
    split = _split_kv_b(config, name, parts)
    if split is not None:
        halves = [_per_head(weight, parts, head_shape, config, where)
                  for weight, head_shape in zip(split, config.arch.mla.split_shapes())]
        return config.arch.mla.join_kv_b(*halves, where)
    module = name.removesuffix(".weight")
    if f"{module}.qweight" in parts:
        quant = config.quantization
        return awq_gptq.repack(parts, module, quant.mode_for(module), shape, quant.bits, quant.group_size, where)
    array = parts[name] if name in parts else next(iter(parts.values()))  # one part under another name: an alias
    quant = config.quantization
    scale = fp8.scale_part(module, parts) if _fp8(config) is not None else None
    if scale is not None:
        return fp8.decode(array, parts[scale], _fp8(config), shape, f"{where}: {module}")
    scheme = _bitnet(config)
    if scheme is not None and len(shape) == 2 and bitnet.quantizes_input(scheme, name, f"{config.arch.prefix}layers."):
        return bitnet.decode(array, parts.get(bitnet.scale_name(name)), scheme, shape, f"{where}: {module}")
    scale = _bitnet_scale(config, name, parts) if name.endswith(".bias") else None
    if scale is not None:
        return bitnet.scaled_bias(array, parts[scale], shape, f"{where}: {name.removesuffix('.bias')}")
    if len(parts) == 1:
        if fp8.is_fp8(array):
            raise CheckpointError(fp8.unscaled(name, array, quant, where))
        if not is_float(array):
            raise CheckpointError(
                f"{where}: tensor {name} is {array.dtype} but a float tensor is expected "
                "(a packed weight needs its .scales and .biases and a 'quantization' section in config.json)"
            )
        if tuple(array.shape) != shape and shape in ((), (1,)) and array.shape in ((), (1,)):
            array = array.reshape(shape)  # one value, as a scalar or a [1] vector (mlx-lm squeezes Apertus's)
        if tuple(array.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(array.shape)} but config.json implies {shape}")
        return array
    declared = quant.declares(module) or not quant.infers_formats
    mode = quant.mode_for(module) if declared else stored_mode(module, array, parts[f"{module}.scales"], shape[-1],
                                                               f"{module}.biases" in parts, where)
    if mode != AFFINE:
        return float_modes.decode(array, parts[f"{module}.scales"], mode, shape, f"{where}: {module}")
    scales, biases = parts[f"{module}.scales"], parts[f"{module}.biases"]
    n, k = shape
    if array.dtype != np.uint32 or array.ndim != 2 or array.shape[0] != n or scales.ndim != 2 or not scales.shape[1]:
        raise CheckpointError(
            f"{where}: quantized {name} must be uint32 [{n}, K*bits/32] with scales [{n}, groups]; "
            f"got {array.dtype} {tuple(array.shape)} and scales {tuple(scales.shape)}"
        )
    if k % scales.shape[1] or (array.shape[1] * 32) % k:
        raise CheckpointError(
            f"{where}: {name} {tuple(array.shape)} with scales {tuple(scales.shape)} does not describe a "
            f"[{n}, {k}] matrix in whole groups of whole bits"
        )
    fmt = (array.shape[1] * 32 // k, k // scales.shape[1])
    said = quant.for_module(module)
    if declared and fmt != said:
        raise CheckpointError(f"{where}: {module} is stored at {fmt[0]} bits, group size {fmt[1]}, but config.json "
                              f"says {said[0]} bits, group size {said[1]}")
    try:
        return QuantizedWeight(array, scales, biases, *fmt)
    except Exception as exc:
        raise CheckpointError(f"{where}: {module}: {exc}") from exc


def _split_kv_b(config: ModelConfig, name: str, present: Any) -> tuple[str, str] | None:
    """mlx-lm's two weights that hold latent attention's ``kv_b_proj`` weight ``name`` (:mod:`ferrum.arch.mla`)."""
    from ferrum.arch.mla import split_kv_b  # imported here: ferrum.arch reads this module

    return None if config.arch.mla is None else split_kv_b(config.arch, name, present)


def _per_head(name: str, parts: dict[str, np.ndarray], shape: tuple[int, int, int], config: ModelConfig,
              where: str) -> np.ndarray:
    """One of mlx-lm's per-head ``MultiLinear`` weights, float32 ``shape`` ``[H, out, in]``: dense, or packed per head
    along ``in``, read as the ``[H*out, in]`` matrix it packs and unpacked."""
    module = name.removesuffix(".weight")
    own = {part: array.reshape(-1, array.shape[-1]) if array.ndim == 3 else array
           for part, array in parts.items() if part.rsplit(".", 1)[0] == module}
    matrix = _assemble(name, own, (shape[0] * shape[1], shape[2]), config, where)
    dense = dequantize(matrix) if isinstance(matrix, QuantizedWeight) else np.asarray(matrix, np.float32)
    return dense.reshape(shape)


#: Tensors older checkpoints saved from buffers that Ferrum recomputes: rotary inverse frequencies, and GPT-NeoX's
#: and GPT-2's causal masks.
_BUFFERS = ("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias", ".attn.bias", ".attn.masked_bias")
#: Shown by name at most, of the tensors a load leaves unread.
_UNREAD_SHOWN = 8


def _warn_unread(where: str, config: ModelConfig, unread: set[str]) -> None:
    """Say which tensors of the checkpoint the model does not use: a misnamed ``model_type``, biases or
    norms config.json does not turn on, or extra layers would otherwise load and run silently wrong.
    Not reported: buffers (rotary inverse frequencies, recomputed from config.json; causal masks), the
    LM head a tied model reads from its embedding, and the other modalities' towers of a multimodal
    checkpoint, wherever they sit (only the text model runs), an FP8 checkpoint's activation and KV-cache
    scales, which only FP8 kernels use (:mod:`ferrum.quant.fp8`), and multi-token prediction layers
    (``Architecture.mtp_layers``, ``Architecture.unloaded``)."""
    arch = config.arch
    wrapped = arch.prefix != "model."
    head = arch.lm_head.removesuffix(".weight")  # its packed scales and biases too
    unused_fp8 = _fp8(config) is not None
    mtp = tuple(f"{arch.prefix}layers.{config.num_layers + i}." for i in range(arch.mtp_layers))
    left = sorted(
        name for name in unread
        if not name.endswith(_BUFFERS)
        and not name.startswith(mtp)
        and not (arch.unloaded and re.search(arch.unloaded, name))
        and not (config.tie_word_embeddings and name.rsplit(".", 1)[0] == head)
        and not (wrapped and not name.startswith(arch.prefix) and name != arch.lm_head)
        and not NOT_TEXT.search(name)
        and not (unused_fp8 and name.endswith(fp8.UNUSED_SUFFIXES))
    )
    if left:
        more = len(left) - _UNREAD_SHOWN
        shown = ", ".join(left[:_UNREAD_SHOWN]) + (f" and {more} more" if more > 0 else "")
        warnings.warn(
            f"{where}: {len(left)} tensor(s) in the checkpoint are not used by a {config.model_type} model and "
            f"were not loaded: {shown}. If the model needs them, config.json does not describe these weights",
            stacklevel=2,
        )


def _warn_untied_head(checkpoint: Checkpoint, config: ModelConfig, present: set[str]) -> None:
    """A tied model whose file also holds an LM head that differs from its embedding: the embedding is the head,
    as mlx-lm and transformers 4 read it (transformers 5 runs the stored head instead), so say so."""
    from ferrum.arch.tensors import stored_name  # imported here: ferrum.arch.tensors imports this module

    arch = config.arch
    embed = stored_name(arch, f"{arch.prefix}embed_tokens.weight")
    if not (config.tie_word_embeddings and arch.lm_head in present and embed in present):
        return
    head, table = checkpoint.read(arch.lm_head), checkpoint.read(embed)
    if head.shape == table.shape and not np.array_equal(head, table):
        warnings.warn(f"{checkpoint.folder}: config.json ties the LM head to the embedding (tie_word_embeddings), but "
                      f"the file's {arch.lm_head} differs from it; the embedding is used, as mlx-lm does (set "
                      "tie_word_embeddings to false to run the stored head, as transformers 5 does)", stacklevel=3)


#: Why only the LM head is missing, most often: config.json unties it (``tie_word_embeddings`` false, or left out,
#: which transformers reads as false where mlx-lm's models read it as true).
_UNTIED_ADVICE = ("Only the LM head is missing, and config.json unties it from the embedding (tie_word_embeddings "
                  "false, or left out, which transformers reads as false and mlx-lm as true): if the model shares "
                  "the embedding's weights, set \"tie_word_embeddings\": true in config.json.")


def _dropped_correction_biases(checkpoint: Checkpoint, config: ModelConfig, parts_of: dict[str, tuple[str, ...]],
                               present: set[str]) -> list[str]:
    """The MoE correction biases a checkpoint left out where the family allows it (``MoeSpec.
    correction_bias_droppable``: mlx-lm's ERNIE 4.5 routes without them, transformers' A.X-K1 with zeros), to be
    read as zeros; said once. All of them or none: a checkpoint missing only some (a lost shard) is reported missing
    as any other."""
    moe = config.arch.moe
    if moe is None or not moe.correction_bias_droppable:
        return []
    biases = [name for name in parts_of if name.endswith(f".{moe.bias_name}")]
    dropped = [name for name in biases if not present.intersection(parts_of[name])]
    if dropped and len(dropped) < len(biases):
        return []
    if dropped:
        warnings.warn(
            f"{checkpoint.folder}: {len(dropped)} MoE correction bias(es) (e.g. {dropped[0]}) are not in the "
            f"checkpoint, as some {config.model_type} checkpoints leave them out (mlx-lm's ERNIE 4.5 conversions); "
            "experts are chosen without them (zeros), as transformers and mlx-lm then choose them, which can differ "
            "from the original model's choice where it had them (load its Hugging Face release for that)",
            stacklevel=3)
    return dropped


def read_weights(
    checkpoint: Checkpoint, config: ModelConfig, shapes: dict[str, tuple[int, ...]]
) -> Iterator[tuple[str, HostTensor]]:
    """Yield every tensor of ``shapes`` (dense name -> shape), dense or packed, checked against config."""
    present = checkpoint.names()
    packed = sorted(name for name in present if name.endswith(".weight_packed"))
    if packed:  # compressed-tensors' pack-quantized ints (Kimi K2 Thinking's, Kimi K3's experts)
        raise UnsupportedFeatureError(
            f"{checkpoint.folder}: {packed[0]} ({len(packed)} such tensors, with their weight_scale) is "
            "compressed-tensors' packed int layout, which Ferrum does not read; load the float release, an MLX "
            "conversion (mlx_lm.convert) or `ferrum quantize`'s output")
    parts_of = {name: _tensor_parts(checkpoint, present, config, name) for name in shapes}
    dropped = _dropped_correction_biases(checkpoint, config, parts_of, present)
    for name in dropped:
        del parts_of[name]
    owners: dict[str, list[str]] = {}  # a part may make up several tensors (GraniteMoE's gate and up experts)
    for name, parts in parts_of.items():
        for part in parts:
            owners.setdefault(part, []).append(name)
    try:
        checkpoint.require(list(owners))
    except MissingTensorError as exc:
        if exc.where == str(checkpoint.folder) and set(exc.names) <= set(parts_of.get(config.arch.lm_head, ())):
            raise MissingTensorError(exc.names, exc.where, _UNTIED_ADVICE) from None
        raise
    where = str(checkpoint.folder)
    _warn_unread(where, config, present - owners.keys())
    _warn_untied_head(checkpoint, config, present)
    for name in dropped:
        yield name, np.zeros(shapes[name], np.float32)
    pending: dict[str, dict[str, np.ndarray]] = {}
    for part, array in checkpoint.read_many(list(owners)):
        for name in owners[part]:
            got = pending.setdefault(name, {})
            got[part] = array
            if len(got) == len(parts_of[name]):
                del pending[name]
                yield name, _assemble(name, got, shapes[name], config, where)
