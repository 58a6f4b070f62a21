"""``ferrum quantize``: turn a float (or FP8) Hugging Face checkpoint into an mlx-community one.

The output has the layout ``mlx_lm.convert(..., quantize=True)`` writes, so
mlx-lm, Ferrum and anything else that reads mlx-community folders load it
(from float32 sources the tensors are mlx-lm's, bit for bit; from float16 /
bfloat16 ones :func:`ferrum.quant.quantize` rounds some ``q`` to the stored
scales where ``mx.quantize`` uses unrounded ones, a closer fit). Every
projection and the embedding (and an untied ``lm_head``) is packed with
:func:`ferrum.quant.quantize` (scales and biases in the source tensor's
dtype), at 8 bits where mlx-lm's model class asks for it (MoE routers,
some of Granite's projections: :data:`_MLX_LM_EIGHT_BIT`); modules whose
input size is not a multiple of the group size stay in float (``false`` in
config.json); JetMoE's attention experts and kv_proj, which the load splits on the host, stay in float
(:data:`ferrum.arch.moa.HOST_SPLIT`); norms and biases are copied byte for byte. A group size that
would cut the narrower heads Ferrum pads at load (a Gemma 4 sliding layer's
o_proj) or a layer's fewer query heads (Laguna's) is refused before anything is written
(:func:`ferrum.arch.tensors.check_padded_groups`).
An FP8 source (DeepSeek-V3's and Kimi K2's only releases, Qwen3-*-FP8; see
:mod:`ferrum.quant.fp8`) has each FP8 weight decoded and cast to the model's
dtype (config.json's ``torch_dtype``) first, so it packs as its float original
in that dtype would, and a matrix left in float is written in that dtype.
Mixture-of-experts layers are written stacked, as mlx-lm stores them
(``switch_mlp.*`` ``[E, ...]``, see :mod:`ferrum.moe.loading`, or a family's own
names: gpt-oss's and dots1's ``experts.*``), from any checkpoint layout Ferrum reads.
A family whose mlx-lm conversion folds constants into the weights (Falcon-H1's muP multipliers) is written folded as
that conversion is, its convolution taps ``[C, K, 1]``: mlx-lm's ``sanitize`` tells a conversion by the taps and would
fold them again into packed words (:func:`_mlx_lm_taps`).

Tensors are converted and written one at a time, straight into
safetensors files whose headers are planned up front from the source
headers, so memory is one tensor's working set, not the model's.
Everything is written into a hidden sibling folder that is renamed into place
at the end: an interrupted run leaves ``DST`` untouched. A BitNet checkpoint
(:mod:`ferrum.quant.bitnet`) is refused: the format has no word for its
ternary weights or its layers' per-token activation quantization.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from ferrum.checkpoint import FP8_DTYPES, INDEX_FILE, Checkpoint, tensor_nbytes, write_safetensors_header
from ferrum.errors import CheckpointError, InvalidRequestError, UnsupportedFeatureError
from ferrum.quant.affine import MLX_GROUP_SIZES, SUPPORTED_BITS, quantize
from ferrum.quant import fp8
from ferrum.quant.config import QuantConfig

ProgressFn = Callable[[int, int, str], None]

#: mlx-lm's shard limit (mlx_lm/utils.py ``MAX_FILE_SIZE_GB``), so both tools split alike.
MAX_SHARD_BYTES = 5 << 30
#: Files besides the weights that a runtime needs: tokenizer, chat template, generation defaults.
COPIED_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template.*", "*.tiktoken", "tiktoken.model", "rwkv_vocab_v*.txt", "generation_config.json",
)
#: safetensors dtype codes of the float tensors a source may hold, and their numpy types.
_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_FLOAT_CODES = tuple(_FLOAT_TYPES)
#: config.json's ``torch_dtype`` -> the code an FP8 source's weights are decoded into.
_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: Modules mlx-lm's model classes keep at 8 bits, group size 64 (their ``quant_predicate``), by the ending of
#: their mlx-lm path and by model_type: MoE routers, and Granite's projections whose small values low bit widths
#: lose.
EIGHT_BIT = (8, 64)
#: Modules mlx-lm's model classes hold as plain parameters, not linear layers, so its conversion leaves them in
#: float (and its loader refuses them packed): GLM-4.5's (Solar Open's, which mlx-lm runs as GLM-4.5), GLM-4.7-Flash's,
#: DeepSeek-MoE's, DeepSeek-V2's and V3's (Kimi K2's and JoyAI's, which mlx-lm runs as V3), dots1's, K-EXAONE's,
#: Nemotron 3 Nano's and MiMo-V2-Flash's routers (their ``MoEGate``, ``Dots1TopkRouter``); and modules its
#: ``quant_predicate`` keeps at the source's precision (Spark 2.5's per-head gate ``g_proj``).
_MLX_LM_FLOAT: dict[str, tuple[str, ...]] = {"glm4_moe": ("mlp.gate",), "deepseek_v3": ("mlp.gate",),
                                           "kimi_k2": ("mlp.gate",), "joyai_llm_flash": ("mlp.gate",),
                                           "deepseek": ("mlp.gate",),
                                           "deepseek_v2": ("mlp.gate",), "glm4_moe_lite": ("mlp.gate",),
                                           "dots1": ("mlp.gate",), "solar_open": ("mlp.gate",),
                                           "exaone_moe": ("mlp.gate",), "nemotron_h": ("mixer.gate",),
                                           "mimo_v2_flash": ("mlp.gate",), "spark2_5": ("self_attn.g_proj",)}
#: Latent attention's ``kv_b_proj`` stays in float too: mlx-lm splits a packed one per head into ``embed_q`` and
#: ``unembed_out`` and packs those again along other axes, rounding twice (or failing, where qk_nope_head_dim is no
#: multiple of the group size); Ferrum joins mlx-lm's own split back into float at load, so it costs Ferrum nothing.
_LATENT_FLOAT = ("self_attn.kv_b_proj",)
#: ...and A.X-K2's q_b_proj, whose columns the load cuts between the normed query latent and the latent itself
#: (ferrum.arch.mla), from float only.
_GATED_QUERY_FLOAT = ("self_attn.q_b_proj",)
#: ...and o_proj where some layer's latent-attention heads are padded to the KV pool's (Dots 3's sliding layers): the
#: load pads its columns, from float only.
_PADDED_OUTPUT_FLOAT = ("self_attn.o_proj",)


def _kept_float(config: Any) -> tuple[str, ...]:
    """Endings of the modules ``ferrum quantize`` leaves in float for ``config``."""
    from ferrum.arch.moa import HOST_SPLIT  # imported here, as the architecture modules in _plan

    mla = config.arch.mla
    return (_MLX_LM_FLOAT.get(config.model_type, ()) + (_LATENT_FLOAT if mla is not None else ())
            + (_GATED_QUERY_FLOAT if mla is not None and mla.output_gate else ())
            + (_PADDED_OUTPUT_FLOAT if mla is not None and any(
                config.arch.latent(i).width_heads != config.arch.latent(i).heads for i in range(config.num_layers))
               else ())
            + (HOST_SPLIT if config.arch.moa is not None else ()))


_MLX_LM_EIGHT_BIT: dict[str, tuple[str, ...]] = {
    "qwen3_moe": ("mlp.gate",),
    "gpt_oss": ("router",),
    "granite": ("self_attn.o_proj", "mlp.down_proj", "lm_head"),
    "granitemoe": ("block_sparse_moe.router.layer", "self_attn.o_proj", "mlp.down_proj", "lm_head"),
    "minimax_m2": ("block_sparse_moe.gate",),
    "mellum": ("mlp.gate",),
    "gemma4_text": ("router.proj",),
    "afmoe": ("mlp.router.gate",),
    "kimi_linear": ("mlp.gate",),
    "kimi_k3": ("block_sparse_moe.gate",),  # written as stored: its sanitize moves it, packed too, to mlp.gate
    "bailing_moe": ("mlp.gate.gate_proj",),
    "bailing_moe_linear": ("mlp.gate.gate_proj",),
    "Klear": ("mlp.gate",),
    "step3p5": ("moe.gate",),  # the release's router, mlx-lm's mlp.gate.gate
    # RWKV-7's embedding and the LoRAs' up-projections (mlx-lm's {"bits": 8}: to_quantized's group size, 64)
    "rwkv7": ("embeddings", "lora.2"),
}
#: Modules mlx-lm's model classes hold under other names than the checkpoint's, where its ``sanitize`` moves float
#: weights alone (packed ones left behind are refused), by model_type: the beginning of a path in a layer -> mlx-lm's
#: (the first that fits). Kimi Linear's MLPs, dense and sparse, under ``mlp``, the correction bias beside the router;
#: Ling's router weight under ``gate.gate_proj``; Nemotron NAS's linear sub-blocks under mlx-lm's ``linear`` (its
#: ``sanitize`` does not rename the release's); Step 3.5's experts under the release's stacks ``moe.<proj>``, which its
#: ``sanitize`` moves into ``mlp.switch_mlp`` (as it moves the release's router and shared expert, written as stored).
_MLX_LM_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "kimi_linear": (("block_sparse_moe.gate.e_score_correction_bias", "mlp.e_score_correction_bias"),
                    ("block_sparse_moe.", "mlp.")),
    # Ling's router a Linear under the router (its expert bias stays beside it)
    "bailing_moe": (("mlp.gate.weight", "mlp.gate.gate_proj.weight"),),
    "bailing_moe_linear": (("mlp.gate.weight", "mlp.gate.gate_proj.weight"),),
    "nemotron-nas": (("self_attn.linear_attn.", "self_attn.linear."), ("mlp.linear_mlp.", "mlp.linear.")),
    "step3p5": (("moe.switch_mlp.", "moe."),),
}
#: ...and outside the layers: the beginning of a tensor's name -> mlx-lm's. LongCat-Flash-Lite's embedding under its
#: n-gram embedding (its ``sanitize`` moves ``model.embed_tokens.weight`` alone).
_MLX_LM_OUTSIDE: dict[str, tuple[tuple[str, str], ...]] = {
    "longcat_flash_ngram": (("model.embed_tokens.", "model.ngram_embeddings.word_embeddings."),),
}


def _mlx_lm_taps(config: Any) -> tuple[str, ...]:
    """Endings of the convolution taps written ``[C, K, 1]``, as mlx-lm's conversion stores them, for a family whose
    conversion folds constants into the weights (``Architecture.converted``, which Ferrum's loader, like mlx-lm's
    ``sanitize``, tells by those taps). Other families' taps are written as transformers stores them ``[C, 1, K]``:
    their ``sanitize`` transposes float taps alone."""
    from ferrum.recurrent import mixer_spec  # imported here, as in quantize_checkpoint

    arch = config.arch
    if not arch.converted:
        return ()
    specs = [mixer_spec(arch, mixer) for mixer in {m for layer in arch.layers for m in layer.mixers}]
    return tuple(f".{spec.module}.{spec.taps}.weight" for spec in specs if spec is not None)


def _mlx_lm_module(config: Any, name: str) -> str:
    """Where mlx-lm's model class holds tensor ``name`` (:data:`_MLX_LM_MODULES`, :data:`_MLX_LM_OUTSIDE`)."""
    stem, dot, rest = name.partition(".layers.")
    index, _, path = rest.partition(".")
    for theirs, mlx_lm in _MLX_LM_MODULES.get(config.model_type, ()) if dot else ():
        if path.startswith(theirs):
            return f"{stem}.layers.{index}.{mlx_lm}{path[len(theirs):]}"
    for theirs, mlx_lm in () if dot else _MLX_LM_OUTSIDE.get(config.model_type, ()):
        if name.startswith(theirs):
            return f"{mlx_lm}{name[len(theirs):]}"
    return name


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the output file: its name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class _Item:
    """One model tensor and the output tensors it becomes (one if copied, three if packed)."""

    source: str
    shape: tuple[int, ...]  # the model tensor's
    packed: bool
    outputs: tuple[_Tensor, ...]
    parts: tuple[str, ...]  # the source tensors it is read from: itself, or those its experts are assembled from
    format: tuple[int, int] | None = None  # (bits, group_size) where packed
    decoded: str | None = None  # an FP8 source's: the float code its weight is decoded into before anything else
    folded: np.ndarray | None = None  # each row times this, as mlx-lm's conversion folds constants in (Falcon-H1)
    taps_last: bool = False  # convolution taps [C, 1, K] written [C, K, 1], as that conversion stores them


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    bits: int = 4,
    group_size: int = 64,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> Path:
    """Write ``src`` quantized to ``bits`` / ``group_size`` into ``dst`` (mlx-community layout); returns ``dst``.

    Everything is checked before anything is written. ``force`` replaces an
    existing non-empty ``dst``. ``progress(done, total, name)`` follows the
    source tensors.
    """
    # Imported here: ferrum.config and ferrum.model import ferrum.quant, which exports this module.
    from ferrum.arch.tensors import resolve_layout
    from ferrum.config import ModelConfig
    from ferrum.model import weight_shapes

    src, dst = Path(src), Path(os.path.abspath(dst))  # "." and ".." named: the staging folder sits beside it
    _check_format(bits, group_size)
    if not src.is_dir():
        raise CheckpointError(
            f"{src} is not a folder; give the folder of a float Hugging Face checkpoint (config.json + *.safetensors)"
        )
    config = ModelConfig.from_file(src)
    if config.quantization is not None and config.quantization.bitnet is not None:
        mode = "online" if config.quantization.bitnet.online else "offline"
        raise InvalidRequestError(
            f"{src} is a BitNet b1.58 checkpoint (quant_method 'bitnet', {mode}): its weights are already ternary and "
            "each linear layer quantizes its input per token to int8, as transformers runs it; an mlx-community copy "
            "would run plain affine layers with neither, another model: run the checkpoint as it is"
        )
    if config.quantization is not None and not config.quantization.runs_as_float:
        raise InvalidRequestError(
            f"{src} is already quantized ({config.quantization.bits}-bit, group size "
            f"{config.quantization.group_size}); quantize its float original instead"
        )
    checkpoint = Checkpoint(src)
    config = resolve_layout(config, checkpoint.shapes())
    if config.arch.transposed:
        raise UnsupportedFeatureError(f"{src}: a {config.model_type} checkpoint stores its projections transposed "
                                      "(GPT-2's Conv1D), which ferrum quantize does not pack; run it in float")
    shapes = weight_shapes(config)
    plan = _plan(checkpoint, shapes, bits, group_size, config)
    _check_destination(src, dst, force)
    kept_float = _kept_float(config)
    unpacked = [item.source for item in plan if _quantizable(item.source, shapes) and not item.packed
                and not item.source.removesuffix(".weight").endswith(kept_float)]
    if unpacked:  # mlx-lm keeps them in float too, without a word
        warnings.warn(f"{len(unpacked)} matri{'x' if len(unpacked) == 1 else 'ces'} (e.g. {unpacked[0]}, "
                      f"{shapes[unpacked[0]][-1]} wide) are not a multiple of --group-size {group_size} wide and stay "
                      "in float; a smaller group size packs them", stacklevel=2)

    overrides = {item.outputs[0].name.removesuffix(".weight"): item.format for item in plan
                 if _quantizable(item.source, shapes) and item.format != (bits, group_size)}
    quant = QuantConfig(bits, group_size, overrides).to_json()
    raw = json.loads((src / "config.json").read_text())
    if "text_config" not in raw:
        # mlx-lm's models read a missing key as tied embeddings; Hugging Face (and Ferrum) read it as untied.
        raw.setdefault("tie_word_embeddings", config.tie_word_embeddings)
    raw["quantization"], raw["quantization_config"] = quant, quant

    _remove_dead_staging(dst)
    staging = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        staging.mkdir(parents=True)
        _write_weights(checkpoint, plan, staging, progress, config)
        (staging / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for pattern in COPIED_FILES:
            for path in src.glob(pattern):
                if path.is_file():
                    shutil.copy2(path, staging / path.name)
        from ferrum.tokenizer import NAMED_TEMPLATES  # here: the tokenizer's import of the config imports this room

        if (src / NAMED_TEMPLATES).is_dir():
            shutil.copytree(src / NAMED_TEMPLATES, staging / NAMED_TEMPLATES)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(staging, dst)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"quantizing into {dst} failed: {exc}; the partial output was removed") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst


def _remove_dead_staging(dst: Path) -> None:
    """Delete the staging folders of earlier runs into ``dst`` that were killed outright (their process is gone),
    so a retry does not leave them behind, hidden, a model's size each."""
    for leftover in dst.parent.glob(f".{dst.name}.partial-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this run's own name: left by an earlier run that had the same id
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, alive
        return True
    return True


# ------------------------------------------------------------------ checks and plan


def _check_format(bits: int, group_size: int) -> None:
    """Only formats mlx-lm writes and loads (Ferrum's group size 16 exists for GGUF imports alone)."""
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise InvalidRequestError(
            f"{bits}-bit quantization is not supported; bits (--bits) must be one of {SUPPORTED_BITS}"
        )
    if not isinstance(group_size, int) or group_size not in MLX_GROUP_SIZES:
        raise InvalidRequestError(
            f"group size {group_size} is not supported; it (--group-size) must be one of {MLX_GROUP_SIZES}"
        )


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise InvalidRequestError(f"{dst} exists and is not a folder; choose another output path")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise InvalidRequestError(
                f"{dst} exists and is not empty; choose a new folder or pass --force to replace it"
            )
        source, target = src.resolve(), dst.resolve()
        if target == source or target in source.parents:
            raise InvalidRequestError(f"{dst} holds the source checkpoint {src}; --force would delete it")


def _quantizable(name: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    """The matrices mlx-lm quantizes: every Linear, stacked experts and the embedding (2-D and 3-D ``.weight``),
    not a norm's weight per head (Command R+'s ``[heads, head_dim]``) nor a convolution's taps (``[C, 1, K]``, no
    Linear's either)."""
    from ferrum.arch.tensors import is_norm  # imported here, as in quantize_checkpoint

    shape = shapes[name]
    taps = len(shape) == 3 and shape[1] == 1
    return name.endswith(".weight") and len(shape) in (2, 3) and not taps and not is_norm(name)


def _plan(checkpoint: Checkpoint, shapes: dict[str, tuple[int, ...]], bits: int, group_size: int,
          config: Any) -> list[_Item]:
    """Every output tensor, with dtype and shape, checked against config.json before any work."""
    from ferrum.arch.mla import split_kv_b
    from ferrum.arch.tensors import check_padded_groups, folded_by_mlx_lm, model_name
    from ferrum.moe.loading import LAYOUTS, expert_parts, fused_half, is_expert_stack, mlx_lm_stack_name
    from ferrum.recurrent.gated_delta import joined_taps
    from ferrum.weights import split_norm_parts

    moe = config.arch.moe
    layout = None if moe is None or moe.layout is None else LAYOUTS[moe.layout]
    present = checkpoint.names()
    scheme = None if config.quantization is None else config.quantization.fp8

    def source_parts(name: str) -> tuple[str, ...]:
        """The tensors ``name`` is read from: an MoE stack's experts, a norm stored a head a tensor, or itself."""
        if moe is not None and is_expert_stack(name):
            return expert_parts(present, moe, name)
        if config.arch.mla is not None and split_kv_b(config.arch, name, present):
            raise UnsupportedFeatureError(
                f"{checkpoint.folder} stores {name.removesuffix('kv_b_proj.weight')}kv_b_proj split into embed_q and "
                "unembed_out, as mlx-lm converts latent attention; `ferrum quantize` reads Hugging Face's kv_b_proj: "
                "run this checkpoint as it is (Ferrum reads it), or quantize its Hugging Face original")
        heads = () if name in present else split_norm_parts(config, name) or taps(name, present) or ()
        scale = fp8.scale_part(name.removesuffix(".weight"), present) if scheme is not None else None
        return heads or ((name, scale) if scale is not None and name.endswith(".weight") else (name,))

    def taps(name: str, present: set[str]) -> tuple[str, ...] | None:
        """OLMo Hybrid's q's, k's and v's taps, stored apart where the model joins them."""
        return joined_taps(name, present) if config.arch.gated_delta is not None else None

    sources = {name: source_parts(name) for name in shapes}
    checkpoint.require([part for parts in sources.values() for part in parts])
    headers = checkpoint.headers()
    if any(name.endswith(".scales") for name in headers):
        raise InvalidRequestError(
            f"{checkpoint.folder} holds packed weights (*.scales) although config.json has no 'quantization' "
            "section; quantize its float original instead"
        )
    eight_bit = _MLX_LM_EIGHT_BIT.get(config.model_type, ())
    kept_float = _kept_float(config)
    taps_last = _mlx_lm_taps(config)
    decoded = None if scheme is None else _decoded_code(config, headers)
    plan = []
    for name, shape in shapes.items():
        parts = sources[name]
        if parts == split_norm_parts(config, name):  # one tensor a head, copied as they are (as mlx-lm keeps them)
            for part in parts:
                code, stored = headers[part]
                if stored != shape[1:]:
                    raise CheckpointError(f"tensor {part} has shape {stored} but config.json implies {shape[1:]}")
                plan.append(_Item(name, shape[1:], False, (_Tensor(part, code, shape[1:]),), (part,)))
            continue
        if parts == taps(name, present):  # copied apart as they are (mlx-lm keeps them apart too)
            stored = [headers[part][1] for part in parts]
            if any(s[1:] != shape[1:] for s in stored) or sum(s[0] for s in stored) != shape[0]:
                raise CheckpointError(f"{checkpoint.folder}: {', '.join(parts)} ({', '.join(map(str, stored))}) "
                                      f"do not join into {name} {shape}, which config.json implies")
            plan.extend(_Item(name, s, False, (_Tensor(part, headers[part][0], s),), (part,))
                        for part, s in zip(parts, stored))
            continue
        code, stored = headers[parts[0]]
        weights = [part for part in parts if part.rsplit(".", 1)[-1] not in fp8.SCALE_NAMES]
        own_layout = layout is not None and is_expert_stack(name)
        if own_layout:  # as the family's layout stores it
            shapes_stored = layout.stored_shapes(name, parts[0], shape)
        else:
            if len(weights) > 1:  # one expert's matrix of a stack
                stored = (len(weights), *stored)
            if (len(shape) == 3 and is_expert_stack(name) and fused_half(moe, name, parts) is not None
                    and len(stored) == 3):
                stored = (stored[0], stored[1] // 2, stored[2])
            shapes_stored = (shape,)
        scaled = len(weights) < len(parts)
        if code in FP8_DTYPES and scaled:
            code = decoded
        elif code not in _FLOAT_CODES:
            raise CheckpointError(
                f"{checkpoint.folder}: tensor {parts[0]} is {code}; `ferrum quantize` reads float32, float16 or "
                "bfloat16 checkpoints, and FP8 ones with their scales"
            )
        if stored not in shapes_stored:
            raise CheckpointError(f"tensor {parts[0]} has shape {stored} but config.json implies "
                                  f"{' or '.join(map(str, shapes_stored))}")
        # where mlx-lm's layout keeps it
        written = _mlx_lm_module(config, layout.mlx_lm_name(name, moe.mlx_lm_stack) if own_layout else
                                 mlx_lm_stack_name(moe, name) if moe is not None and is_expert_stack(name) else name)
        module = written.removesuffix(".weight")
        folded = folded_by_mlx_lm(config, name, shape)
        if _quantizable(name, shapes) and shape[-1] % group_size == 0 and not module.endswith(kept_float):
            fmt = EIGHT_BIT if module.endswith(eight_bit) and shape[-1] % EIGHT_BIT[1] == 0 else (bits, group_size)
            check_padded_groups(config, model_name(config.arch, name), *fmt)
            *rows, k = shape
            outputs = (
                _Tensor(written, "U32", (*rows, k * fmt[0] // 32)),
                _Tensor(f"{module}.scales", code, (*rows, k // fmt[1])),
                _Tensor(f"{module}.biases", code, (*rows, k // fmt[1])),
            )
            plan.append(_Item(name, shape, True, outputs, parts, fmt, code if scaled else None, folded))
        else:
            last = name.endswith(taps_last) and len(shape) == 3 and shape[1] == 1
            plan.append(_Item(name, shape, False, (_Tensor(written, code, (shape[0], shape[2], 1) if last else shape),),
                              parts, None, code if scaled else None, folded, last))
    return plan


def _decoded_code(config: Any, headers: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """What an FP8 source's weights are decoded into: the model's dtype (config.json's ``torch_dtype``), else
    the one most of its float tensors are stored in."""
    named = _DTYPE_CODES.get(str(config.torch_dtype))
    if named is not None:
        return named
    codes = [code for code, _ in headers.values() if code in _FLOAT_CODES]
    return max(set(codes), key=codes.count) if codes else "BF16"


# ------------------------------------------------------------------ writing


def _read(checkpoint: Checkpoint, item: _Item, config: Any) -> np.ndarray:
    """The source tensor of ``item``; experts assembled into their stack as the loader does; FP8 weights
    decoded and cast to the model's dtype; laid out as mlx-lm's conversion lays it out (:func:`_mlx_lm_taps`)."""
    from ferrum.arch.tensors import normed_head  # imported here, as in _plan
    from ferrum.moe.loading import assemble_stack, is_expert_stack

    moe, where = config.arch.moe, str(checkpoint.folder)
    if moe is None or not is_expert_stack(item.source):
        array = checkpoint.read(item.parts[0])
        if item.decoded is not None:
            weight, scale = item.parts
            array = fp8.decode(array, checkpoint.read(scale), config.quantization.fp8, item.shape,
                               f"{where}: {weight}")
    else:
        parts = {part: checkpoint.read(part) for part in item.parts}
        array = assemble_stack(item.source, parts, item.shape, moe, config.quantization, where)
    if item.decoded is not None:
        array = array.astype(_FLOAT_TYPES[item.decoded])
    if item.folded is not None:
        array = (array.astype(np.float32) * item.folded[:, None]).astype(array.dtype)
    if config.arch.head_normed and item.source == config.arch.lm_head:  # normed before packing, as mlx-lm's is
        array = normed_head(array, config.arch.head_norm_axis)
    return array.transpose(0, 2, 1) if item.taps_last else array


def _pack(array: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed weight, scales and biases of a matrix, or of each expert of a stack (stacked again)."""
    each = [quantize(m, bits, group_size) for m in (array if array.ndim == 3 else [array])]
    if array.ndim == 2:
        return each[0].packed, each[0].scales, each[0].biases
    return tuple(np.stack([getattr(q, f) for q in each]) for f in ("packed", "scales", "biases"))


def _shards(plan: list[_Item]) -> list[list[_Item]]:
    """Consecutive items in files of at most :data:`MAX_SHARD_BYTES` (a larger tensor gets its own)."""
    shards: list[list[_Item]] = []
    size = 0
    for item in plan:
        nbytes = sum(t.nbytes for t in item.outputs)
        if not shards or size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def _write_weights(
    checkpoint: Checkpoint, plan: list[_Item], folder: Path, progress: ProgressFn | None, config: Any,
) -> None:
    """Write the shards (plus an index when there are several), converting one source tensor at a time."""
    shards = _shards(plan)
    names = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    done = 0
    for file_name, items in zip(names, shards):
        with open(folder / file_name, "wb") as out:
            write_safetensors_header(
                out, [(t.name, t.dtype, t.shape) for item in items for t in item.outputs], {"format": "mlx"}
            )
            for item in items:
                array = _read(checkpoint, item, config)
                if item.packed:
                    arrays = _pack(array, *item.format)
                    del array
                else:
                    arrays = (array,)
                for tensor, data in zip(item.outputs, arrays):
                    assert data.nbytes == tensor.nbytes, (tensor, data.dtype, data.shape)
                    out.write(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
                done += 1
                if progress is not None:
                    progress(done, len(plan), item.source)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for item in plan for t in item.outputs)},
            "weight_map": {t.name: file_name for file_name, items in zip(names, shards)
                           for item in items for t in item.outputs},
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
