"""Quantized weights: the one packed affine form, reading it (and the formats rewritten into it) from checkpoints,
and writing it (`ferrum quantize`)."""

from ferrum.quant.affine import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantizedWeight,
    dequantize,
    pack,
    quantize,
    unpack,
)
from ferrum.quant.config import QuantConfig
from ferrum.quant.convert import quantize_checkpoint

__all__ = [
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "QuantConfig",
    "QuantizedWeight",
    "dequantize",
    "pack",
    "quantize",
    "quantize_checkpoint",
    "unpack",
]
