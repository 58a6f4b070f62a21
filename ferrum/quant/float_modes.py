"""MLX's float quantization modes (mxfp4, nvfp4, mxfp8) read into the forms every backend runs.

mlx-lm writes them as it writes affine checkpoints, with ``"mode"`` set in the
quantization section, a ``uint32`` packed ``weight`` (codes packed as affine
``q`` is), ``uint8`` ``scales`` and no ``biases``. A value is a small float code
times its group's scale:

=======  ====  =====  ==========================  ===================================
mode     bits  group  code                        scale
=======  ====  =====  ==========================  ===================================
mxfp4    4     32     E2M1: 0, ±0.5, ±1 ... ±6    E8M0: ``2 ** (s - 127)``
nvfp4    4     16     E2M1                        E4M3 (up to 448, 4 significant bits)
mxfp8    8     32     E4M3                        E8M0
=======  ====  =====  ==========================  ===================================

An E2M1 code is a half-integer in [-6, 6], so ``2 * v + 12`` is an integer in
[0, 24]: five affine bits with ``scale = s / 2`` and ``bias = -12 * scale`` hold
the fp4 modes exactly (``q * scale + bias`` is ``(q - 12) * scale`` with no
rounding: mxfp4's scales are powers of two, kept in bfloat16, which has
float32's range; nvfp4's are kept in float32). No affine code of eight bits
holds E4M3's 16 octaves, so mxfp8 is decoded to dense float32 weights (exact),
which the backend casts to its compute dtype like any float checkpoint, and so
is an fp4 matrix whose rows' five-bit codes would not fill whole words (an
nvfp4 input size that is a multiple of 16 but not of 32). Stacked experts are
decoded expert by expert (:mod:`ferrum.moe.loading`).

An fp4 matrix also keeps the file's codes and scales (``QuantizedWeight.float_codes``),
so a backend with kernels for the mode (MLX's) runs them at the file's 4.25 or
4.5 bits a weight instead of the affine form's 6 (mxfp4) or 9 (nvfp4).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ferrum.errors import CheckpointError
from ferrum.quant.affine import FloatCodes, QuantizedWeight, unpack
from ferrum.quant.config import FLOAT_MODES

#: E2M1 code -> ``2 * value + 12``: the affine ``q`` of the fp4 modes (code 8 is -0).
_FP4_AS_Q = np.array([12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0], dtype=np.uint8)
#: Four fp4 codes (a uint16, the lowest first) -> their four affine codes in 20 bits, packed as ``pack`` packs.
_FP4_QUAD = sum(_FP4_AS_Q[(np.arange(1 << 16) >> (4 * i)) & 15].astype(np.uint32) << np.uint32(5 * i)
                for i in range(4))


def _fp4_as_affine(packed: np.ndarray) -> np.ndarray:
    """uint32 fp4 codes ``[N, K / 8]`` -> ``pack(_FP4_AS_Q[codes], 5)``: each code word's eight values are the
    five bytes of one run of the 5-bit stream, so two table lookups a word replace unpacking and packing
    (gpt-oss-20b's experts: ~20x faster)."""
    n, words = packed.shape
    runs = _FP4_QUAD[packed & 0xFFFF].astype(np.uint64) | (_FP4_QUAD[packed >> 16].astype(np.uint64) << np.uint64(20))
    return np.ascontiguousarray(runs.view(np.uint8).reshape(n, words, 8)[..., :5]).reshape(n, words * 5).view("<u4")


def _scales(scales: np.ndarray, mode: str, where: str) -> np.ndarray:
    """The groups' scales as float32: E8M0 for the mx modes, E4M3 for nvfp4 (both refused where NaN)."""
    kind = ml_dtypes.float8_e4m3fn if mode == "nvfp4" else ml_dtypes.float8_e8m0fnu
    values = np.ascontiguousarray(scales, dtype=np.uint8).view(kind).astype(np.float32)
    if not np.isfinite(values).all():
        byte = int(np.asarray(scales).flat[int(np.argmin(np.isfinite(values)))])
        raise CheckpointError(f"{where}: a {mode} scale is NaN (byte {byte}); the checkpoint is damaged")
    return values


def checked_scales(packed: np.ndarray, scales: np.ndarray, mode: str, shape: tuple[int, int], where: str) -> np.ndarray:
    """The float32 group scales of one ``[N, K]`` matrix of a float mode, after checking its codes' and scales'
    forms and, for the fp4 modes, that its affine form's biases (``-6 * scale``) are finite."""
    bits, group_size = FLOAT_MODES[mode]
    n, k = shape
    if (packed.dtype != np.uint32 or packed.shape != (n, k * bits // 32) or scales.dtype != np.uint8
            or scales.shape != (n, k // group_size) or k % group_size):
        raise CheckpointError(
            f"{where}: a {mode} [{n}, {k}] matrix is uint32 [{n}, {k * bits // 32}] with uint8 scales "
            f"[{n}, {k // group_size}]; got {packed.dtype} {tuple(packed.shape)} and {scales.dtype} "
            f"{tuple(scales.shape)}"
        )
    scale = _scales(scales, mode, where)
    if mode != "mxfp8" and not np.isfinite(scale * np.float32(6)).all():
        raise CheckpointError(f"{where}: a {mode} scale ({float(np.max(scale)):g}) is too large for float32")
    return scale


def fp4_affine(packed: np.ndarray, scale: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact 5-bit affine ``(packed, scales, biases)`` of fp4 codes ``packed [N, K / 8]`` whose float32 group
    scales are ``scale`` (:func:`checked_scales`)."""
    half = scale / 2
    dtype = ml_dtypes.bfloat16 if mode == "mxfp4" else np.float32
    return _fp4_as_affine(packed), half.astype(dtype), (half * -12).astype(dtype)


def has_affine_form(mode: str, k: int) -> bool:
    """Whether ``[N, K]`` matrices of ``mode`` have the exact 5-bit affine form: fp4 rows whose ``5 * K`` bits
    fill whole uint32 words."""
    return mode != "mxfp8" and k % 32 == 0


def decode(packed: np.ndarray, scales: np.ndarray, mode: str, shape: tuple[int, int],
           where: str) -> QuantizedWeight | np.ndarray:
    """One ``[N, K]`` matrix of a float mode: exact 5-bit affine where :func:`has_affine_form`, else dense
    float32 (exact too)."""
    scale = checked_scales(packed, scales, mode, shape, where)
    if not has_affine_form(mode, shape[1]):
        n, k = shape
        bits, group_size = FLOAT_MODES[mode]
        if mode == "mxfp8":
            values = unpack(packed, bits).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
            if not np.isfinite(values).all():  # E4M3 has NaN codes; E2M1 has none
                raise CheckpointError(f"{where}: an mxfp8 weight is NaN; the checkpoint is damaged")
        else:
            values = (_FP4_AS_Q[unpack(packed, bits)].astype(np.float32) - 12) / 2
        values = values.reshape(n, -1, group_size)
        return (values * scale[..., None]).reshape(n, k)
    return QuantizedWeight(*fp4_affine(packed, scale, mode), 5, FLOAT_MODES[mode][1], FloatCodes(packed, scales, mode))
