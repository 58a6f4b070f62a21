"""FP8 checkpoints (``quant_method`` "fp8", compressed-tensors' "float-quantized") decoded to dense float32 at load.

Each quantized linear layer stores ``weight`` as safetensors ``F8_E4M3`` (or
``F8_E5M2``) ``[out, in]`` and a float scale beside it; the weight is
``weight * scale``, the scale broadcast over blocks of the matrix:

=========================================  ====================  =====================================
checkpoint                                 scale tensor          its shape
=========================================  ====================  =====================================
``fp8``, ``weight_block_size [bo, bi]``    ``weight_scale_inv``  ``[ceil(out / bo), ceil(in / bi)]``
(Qwen3-*-FP8, DeepSeek)                                          (edge blocks partial)
``fp8``, ``weight_block_size`` null        ``weight_scale_inv``  one value (``[]`` or ``[1]``)
(Mistral's FP8 releases); AutoFP8           or ``weight_scale``
compressed-tensors, strategy "tensor"      ``weight_scale``      one value
... "channel" / "group" / "block"          ``weight_scale``      ``[out, 1]`` / ``[out, in / g]`` /
                                                                 the block grid
=========================================  ====================  =====================================

(``weight_scale_inv`` multiplies too: DeepSeek's name.) The product is taken in
float32, as transformers' ``dequantize=True`` takes it, and the backend casts
it to its compute dtype like any float weight, so it runs on every backend.
Activation scales (``input_scale``, Mistral's ``activation_scale``) and FP8
KV-cache scales (``k_scale``, ``v_scale``) only matter to FP8 kernels: with
float activations and a float cache they are not read. Modules left in float
(``modules_to_not_convert``, ``ignored_layers``, compressed-tensors'
``ignore``: ``lm_head`` and the embedding, usually) are told by their stored
dtype, so those lists need not be read. A MoE's experts are decoded expert by
expert (:mod:`ferrum.moe.loading`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ferrum.checkpoint import FP8_DTYPES, is_float
from ferrum.errors import CheckpointError, ConfigError, UnsupportedFeatureError

#: The mode :class:`ferrum.quant.QuantConfig` records for an FP8 checkpoint.
FP8 = "fp8"
#: The names a layer's weight scale is stored under, beside its ``weight``, in the order they are looked for.
SCALE_NAMES = ("weight_scale_inv", "weight_scale")
#: Tensors of FP8 checkpoints that only FP8 kernels use (activation and KV-cache scales): not read.
UNUSED_SUFFIXES = (".input_scale", ".activation_scale", ".k_scale", ".v_scale")
#: config.json's ``fmt`` values read (the codes are decoded by their stored dtype, ``F8_E4M3`` / ``F8_E5M2``).
FORMATS = ("e4m3", "e5m2")
_CODES = {np.dtype(t): code for code, t in FP8_DTYPES.items()}  # numpy type -> safetensors code, for messages
#: transformers' default block when config.json has no ``weight_block_size`` key (FineGrainedFP8Config's).
DEFAULT_BLOCK = (128, 128)

Block = tuple[int | None, int | None]  # rows and columns one scale covers; None: all of them


@dataclass(frozen=True)
class Fp8Scheme:
    """How a checkpoint scales its FP8 weights: the blocks one scale may cover (``(None, None)`` per tensor,
    ``(1, None)`` per output channel, ``(bo, bi)`` a block; tried in order against each scale's shape), and
    the method that wrote it (for messages)."""

    method: str
    blocks: tuple[Block, ...]

    def describe(self) -> str:
        return " or ".join(_describe(block) for block in self.blocks)


def _describe(block: Block) -> str:
    rows, cols = block
    if rows is None:
        return "one scale per tensor"
    if cols is None:
        return "one scale per output channel"
    return f"one scale per {rows}x{cols} block" if rows > 1 else f"one scale per group of {cols} inputs"


def is_fp8_section(section: Mapping[str, Any]) -> bool:
    """Whether a quantization_config section (quant_method "fp8" or "compressed-tensors") describes FP8 weights;
    :func:`parse` then reads it, and refuses the compressed-tensors formats that are not FP8."""
    return section.get("quant_method") in (FP8, "compressed-tensors")


def parse(section: Mapping[str, Any], where: str) -> Fp8Scheme:
    """The scheme of a ``quant_method`` "fp8" or "compressed-tensors" section, or a clear refusal."""
    if section.get("quant_method") == FP8:
        return _parse_fp8(section, where)
    return _parse_compressed_tensors(section, where)


def _parse_fp8(section: Mapping[str, Any], where: str) -> Fp8Scheme:
    fmt = section.get("fmt", "e4m3")
    if fmt not in FORMATS:
        raise UnsupportedFeatureError(f"{where}: FP8 fmt {fmt!r}; Ferrum reads {' and '.join(FORMATS)} weights")
    for key, plain in (("scale_fmt", "float"), ("expert_dtype", "fp8")):
        if section.get(key, plain) != plain:
            raise UnsupportedFeatureError(
                f"{where}: FP8 {key} {section[key]!r} is not supported; Ferrum reads FP8 weights with float "
                "scales (scale_fmt 'float', expert_dtype 'fp8'): use the model's float or FP8 release")
    block = section.get("weight_block_size", DEFAULT_BLOCK)
    if block is None:
        return Fp8Scheme(FP8, ((None, None),))
    if not _is_block(block):
        raise ConfigError(f"{where}: quantization_config's weight_block_size must be two positive integers "
                          f"([128, 128]) or null, got {block!r}")
    # A one-value scale beside a block size: AutoFP8's per-tensor checkpoints, which name no block size.
    return Fp8Scheme(FP8, (tuple(block), (None, None)))


#: compressed-tensors' weight strategies this module reads -> the block one scale covers.
_CT_STRATEGIES = ("tensor", "channel", "group", "block")


def _parse_compressed_tensors(section: Mapping[str, Any], where: str) -> Fp8Scheme:
    top = section.get("format")
    groups = section.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ConfigError(f"{where}: a compressed-tensors quantization_config needs 'config_groups' (an object of "
                          f"groups with their 'weights'), got {groups!r}")
    blocks: list[Block] = []
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(weights, Mapping):
            raise ConfigError(f"{where}: compressed-tensors group {name!r} needs a 'weights' object, got {group!r}")
        fmt = group.get("format") or top
        kind, bits = weights.get("type", "int"), weights.get("num_bits")
        if fmt != "float-quantized" or kind != "float" or bits != 8:
            raise UnsupportedFeatureError(
                f"{where}: compressed-tensors format {fmt!r} with {bits}-bit {kind} weights (group {name!r}) is not "
                "supported; Ferrum reads compressed-tensors' FP8 checkpoints (format 'float-quantized', 8-bit float "
                "weights, e.g. *-FP8-dynamic), AWQ, GPTQ, GGUF and MLX's: use one of those releases, or convert "
                "the float model with `ferrum quantize SRC DST --bits 4`")
        strategy = weights.get("strategy", "tensor")
        if strategy not in _CT_STRATEGIES:
            raise UnsupportedFeatureError(f"{where}: compressed-tensors FP8 weight strategy {strategy!r}; Ferrum "
                                          f"reads strategies {', '.join(_CT_STRATEGIES)}")
        if strategy == "tensor":
            block: Block = (None, None)
        elif strategy == "channel":
            block = (1, None)
        elif strategy == "group":
            size = weights.get("group_size")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ConfigError(f"{where}: compressed-tensors group {name!r}: strategy 'group' needs a positive "
                                  f"integer group_size, got {size!r}")
            block = (1, size)
        else:
            structure = weights.get("block_structure")
            if not _is_block(structure):
                raise ConfigError(f"{where}: compressed-tensors group {name!r}: strategy 'block' needs a "
                                  f"block_structure of two positive integers, got {structure!r}")
            block = tuple(structure)
        if block not in blocks:
            blocks.append(block)
    return Fp8Scheme("compressed-tensors", tuple(blocks))


def _is_block(value: Any) -> bool:
    """Whether a config value is a block's two sizes: two positive integers."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in value))


def scale_part(module: str, present: set[str] | Mapping[str, Any]) -> str | None:
    """The scale tensor stored beside ``module.weight`` (one of :data:`SCALE_NAMES`), or None."""
    return next((f"{module}.{name}" for name in SCALE_NAMES if f"{module}.{name}" in present), None)


def is_fp8(array: np.ndarray) -> bool:
    """Whether an array read from a checkpoint holds FP8 codes."""
    return array.dtype in _CODES


def _grid(shape: tuple[int, int], block: Block) -> tuple[int, int]:
    """The scale grid of an ``[out, in]`` matrix, a scale to each ``block``."""
    return tuple(math.ceil(size / (extent or size)) if size else 0 for size, extent in zip(shape, block))


def _fits(scale: np.ndarray, grid: tuple[int, int]) -> bool:
    """Whether ``scale`` is the grid ``grid``: that shape, or its values flat where only one axis has several
    (a per-tensor ``[]`` or ``[1]``, a per-channel ``[out]``)."""
    if tuple(scale.shape) == grid:
        return True
    return scale.ndim < 2 and scale.size == math.prod(grid) and sum(n != 1 for n in grid) <= 1


def decode(weight: np.ndarray, scale: np.ndarray, scheme: Fp8Scheme, shape: tuple[int, int],
           where: str) -> np.ndarray:
    """One ``[out, in]`` FP8 matrix times its scale, as float32; refused where the codes are NaN or infinite
    (E4M3 has NaN codes, E5M2 infinities too) or the scale's shape fits none of the scheme's blocks."""
    if not is_fp8(weight):
        raise CheckpointError(
            f"{where}: the weight beside an FP8 scale is {weight.dtype}, not F8_E4M3 or F8_E5M2; the checkpoint "
            "and its quantization_config disagree")
    if tuple(weight.shape) != tuple(shape):
        raise CheckpointError(f"{where}: FP8 weight has shape {tuple(weight.shape)} but config.json implies "
                              f"{tuple(shape)}")
    if len(shape) != 2:
        raise CheckpointError(f"{where}: an FP8 tensor of shape {list(shape)} has a scale beside it; FP8 checkpoints "
                              "quantize matrices only, so the checkpoint is damaged")
    if not is_float(scale):  # an exponent byte (E8M0) or integer read as a factor would scale every weight wrongly
        raise CheckpointError(f"{where}: the FP8 scale is stored as {scale.dtype}, not as floats; the checkpoint "
                              "is damaged or in a scale format Ferrum does not read")
    block = next((b for b in scheme.blocks if _fits(scale, _grid(shape, b))), None)
    if block is None:
        wanted = " or ".join(str(list(_grid(shape, b))) for b in scheme.blocks)
        raise CheckpointError(
            f"{where}: FP8 scale has shape {list(scale.shape)}; a {list(shape)} weight with {scheme.describe()} "
            f"({scheme.method}) needs {wanted}. The checkpoint and its quantization_config disagree")
    values = weight.astype(np.float32, order="C")
    if not np.isfinite(values).all():
        byte = int(weight.view(np.uint8).flat[int(np.argmin(np.isfinite(values)))])
        raise CheckpointError(f"{where}: an FP8 weight is NaN or infinite (byte {byte:#04x}); the checkpoint is "
                              "damaged")
    grid = _grid(shape, block)
    s = np.asarray(scale, dtype=np.float32).reshape(grid)
    out, k = shape
    rows, cols = (extent or size for size, extent in zip(shape, block))
    by_column = np.repeat(s, cols, axis=1)[:, :k] if grid[1] > 1 else s  # [row blocks, in] or [row blocks, 1]
    whole = out // rows * rows
    blocks = values[:whole].reshape(-1, rows, k)  # a view: values is C-ordered
    blocks *= by_column[: out // rows, None, :]
    if whole < out:  # a partial last row block
        values[whole:] *= by_column[-1]
    if not np.isfinite(values).all():
        raise CheckpointError(f"{where}: an FP8 weight times its scale ({float(np.abs(s).max()):g}) is too large "
                              "for float32; the checkpoint is damaged")
    return values


def unscaled(name: str, array: np.ndarray, quant: Any, where: str) -> str:
    """Why FP8 tensor ``name``, read with no scale beside it, cannot load (``quant``: the checkpoint's
    :class:`ferrum.quant.QuantConfig`)."""
    module = name.removesuffix(".weight")
    if quant is None or quant.fp8 is None:
        return (f"{where}: tensor {name} is FP8 ({_CODES[array.dtype]}) but config.json has no FP8 quantization_config "
                "(quant_method 'fp8', or compressed-tensors' 'float-quantized') saying how it is scaled; restore "
                "the release's config.json")
    return (f"{where}: tensor {name} is FP8 ({_CODES[array.dtype]}) but the checkpoint has no "
            f"{module}.weight_scale_inv or {module}.weight_scale beside it; an FP8 weight needs its scale (a shard "
            "may be missing)")
