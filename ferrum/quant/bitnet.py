"""BitNet b1.58 checkpoints (``quant_method`` "bitnet"): ternary weights decoded to float at load, and the
per-token int8 quantization of every converted projection's input that the model was trained with.

microsoft/bitnet-b1.58-2B-4T's config reads ``{"quant_method": "bitnet", "linear_class": "autobitlinear",
"quantization_mode": "offline"}``; transformers then runs each linear layer but the LM head as ``AutoBitLinear``
(transformers: integrations/bitnet.py): ``linear(act_quant(x), W) * weight_scale``, where ``weight`` is stored
uint8 ``[out / 4, in]``, four ternary values a byte (value ``i`` of a byte, bits ``2i..2i+1``, minus 1, is row
``i * out / 4 + r``), and ``weight_scale`` is one number. Its ``-bf16`` release says ``"quantization_mode":
"online"`` over bfloat16 master weights, which transformers ternarizes at every call: ``round(w / m).clamp(-1, 1)
* m`` with ``m = max(mean |w|, 1e-5)`` over the whole matrix. Both are fixed per matrix, so both are decoded here
once into the float weight they amount to. ``act_quant`` rounds each token's row to 255 levels of its largest
magnitude, in float32 (:func:`ferrum.hookspec.quantize_activations`); the model applies it to the inputs of the
projections :func:`quantizes_input` names. transformers' other class, ``bitlinear`` (which divides by its scale),
and ``use_rms_norm`` are refused by name: no release uses them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from ferrum.errors import CheckpointError, ConfigError, UnsupportedFeatureError

#: The mode :class:`ferrum.quant.QuantConfig` records for a BitNet checkpoint.
BITNET = "bitnet"
#: transformers' activation quantization: symmetric int8 per token, ``[-128, 127]`` of ``127 / max |x|``.
LEVELS = 127
#: Ternary values a stored byte holds.
PER_BYTE = 4
#: Where an offline checkpoint stores a matrix's scale, beside its ``weight``.
SCALE = "weight_scale"


@dataclass(frozen=True)
class BitnetScheme:
    """``online``: float master weights ternarized at load; else packed ternary ones with their scales. ``skip``:
    modules left as plain linears (transformers' ``modules_to_not_convert`` patterns; the LM head by default)."""

    online: bool
    skip: tuple[str, ...]


def parse(section: Mapping[str, Any], where: str) -> BitnetScheme:
    """The scheme of a ``quant_method`` "bitnet" section, or a refusal by name of what transformers would run
    otherwise."""
    linear_class = section.get("linear_class", "bitlinear")
    mode = section.get("quantization_mode", "offline")
    if linear_class != "autobitlinear":
        raise UnsupportedFeatureError(
            f"{where}: BitNet linear_class {linear_class!r} is not supported; Ferrum runs 'autobitlinear' (the "
            "released checkpoints'): give config.json that class if the weights were written for it")
    if mode not in ("offline", "online"):
        raise UnsupportedFeatureError(f"{where}: BitNet quantization_mode {mode!r}; Ferrum reads 'offline' (packed "
                                      "ternary weights) and 'online' (float master weights)")
    if section.get("use_rms_norm", False):
        raise UnsupportedFeatureError(f"{where}: BitNet use_rms_norm (an RMSNorm inside every linear layer) is not "
                                      "supported; no released checkpoint uses it")
    skip = _skip_patterns(section.get("modules_to_not_convert"), where)
    if not any(_matches("lm_head", pattern) for pattern in skip):
        raise UnsupportedFeatureError(f"{where}: BitNet modules_to_not_convert {list(skip)} leaves the LM head "
                                      "quantized; Ferrum runs it in float (transformers' default): add 'lm_head'")
    return BitnetScheme(mode == "online", skip)


def _skip_patterns(skip: Any, where: str) -> tuple[str, ...]:
    """``modules_to_not_convert`` checked: absent or null is the LM head alone (transformers' default for a causal
    LM), else a list of strings, each compiled as transformers matches it."""
    if skip is None:
        return ("lm_head",)
    advice = 'write a list of module names or patterns, e.g. ["lm_head", "model.layers.0.mlp"]'
    if not isinstance(skip, list):
        raise ConfigError(f"{where}: quantization_config.modules_to_not_convert must be a list of module names or "
                          f"patterns, got {skip!r}; {advice}")
    for pattern in skip:
        if not isinstance(pattern, str):
            raise ConfigError(f"{where}: quantization_config.modules_to_not_convert entry {pattern!r} is not a "
                              f"string; {advice}")
        try:
            _boundary_regex(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}: quantization_config.modules_to_not_convert entry {pattern!r} is not a "
                              f"regular expression ({exc}); write it as transformers matches it: a module name, or "
                              "a Python regex from the name's start, e.g. \"model\\.layers\\.(0|1)\"") from None
    return tuple(skip)


def _boundary_regex(pattern: str) -> re.Pattern[str]:
    """transformers' regex of one pattern (quantizers_utils ``should_convert_module``): from the start of a module
    name up to a module boundary; ``re`` keeps it compiled."""
    return re.compile(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))")


def _matches(module: str, pattern: str) -> bool:
    """transformers' ``should_convert_module`` test of one pattern: a prefix or regex up to a module boundary,
    or a suffix."""
    return bool(_boundary_regex(pattern).match(module)) or module.endswith(pattern)


def quantizes_input(scheme: BitnetScheme, name: str, layers_prefix: str) -> bool:
    """Whether weight ``name`` is an ``AutoBitLinear``'s, whose input is quantized per token: a decoder layer's
    projection that no ``skip`` pattern names."""
    module = name.removesuffix(".weight")
    return (name.startswith(layers_prefix) and name.endswith(".weight")
            and not any(_matches(module, pattern) for pattern in scheme.skip))


def unpack(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[rows, ...]`` -> int8 ternary ``[4 * rows, ...]``, as transformers' ``unpack_weights`` lays them."""
    codes = np.asarray(packed, dtype=np.uint8)
    return np.concatenate([((codes >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(PER_BYTE)])


def ternarize(weight: np.ndarray) -> np.ndarray:
    """A float master weight as transformers' online ``WeightQuant`` uses it, in float32: ``round(w * s).clip(-1,
    1) / s`` with ``s = 1 / max(mean |w|, 1e-5)``."""
    w = np.asarray(weight, dtype=np.float32)
    scale = np.float32(1) / max(np.float32(np.abs(w).mean(dtype=np.float32)), np.float32(1e-5))
    return np.clip(np.round(w * scale), -1, 1) / scale


def scale_name(name: str) -> str:
    """Where the scale of a converted layer's ``weight`` or ``bias`` is stored (an offline checkpoint's)."""
    return f"{name.rsplit('.', 1)[0]}.{SCALE}"


def _scale_value(scale: np.ndarray, where: str) -> np.float32:
    if np.asarray(scale).size != 1:
        raise CheckpointError(f"{where}: {SCALE} must be one number, got shape {list(np.asarray(scale).shape)}")
    return np.asarray(scale, dtype=np.float32).reshape(())


def scaled_bias(bias: np.ndarray, scale: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """An offline converted layer's bias in float32, times its scale: transformers scales ``x W + b`` as a whole
    (online layers have no scale and add theirs as it is)."""
    if tuple(bias.shape) != tuple(shape):
        raise CheckpointError(f"{where}: bias {list(bias.shape)}, but config.json implies {list(shape)}")
    return np.asarray(bias, dtype=np.float32) * _scale_value(scale, where)


def decode(weight: np.ndarray, scale: np.ndarray | None, scheme: BitnetScheme, shape: tuple[int, ...],
           where: str) -> np.ndarray:
    """The float32 weight one converted layer runs with: an online master weight ternarized, or an offline packed
    one unpacked and times its scale."""
    if scheme.online:
        if scale is not None or weight.dtype == np.uint8:
            raise CheckpointError(f"{where}: config.json says BitNet 'online' (float weights), but the weight is "
                                  f"{weight.dtype} with a {SCALE}: the checkpoint is packed ('offline')")
        return ternarize(weight)
    if weight.dtype != np.uint8 or scale is None:
        raise CheckpointError(f"{where}: an offline BitNet weight is uint8 [out / 4, in] with a {SCALE} beside it; "
                              f"got {weight.dtype} {list(weight.shape)}" + ("" if scale is not None else
                                                                             f" and no {SCALE}"))
    if (weight.shape[0] * PER_BYTE, *weight.shape[1:]) != tuple(shape):
        raise CheckpointError(f"{where}: packed BitNet weight {list(weight.shape)} does not hold a {list(shape)} "
                              f"matrix (four rows a byte)")
    return unpack(weight).astype(np.float32) * _scale_value(scale, where)


def quantized_inputs(ops: Any, placed: Any) -> Any:
    """A placed weight (:class:`ferrum.weights.Placed`) whose linear reads its input quantized per token."""
    inner = placed.linear

    def linear(x: Any, weight: Any, bias: Any) -> Any:
        return inner(ops.quantize_activations(x, LEVELS), weight, bias)

    return replace(placed, linear=linear)
