"""The packed affine form: ``w = scales * q + biases`` per group of ``group_size`` inputs.

This is MLX's affine quantization, bit for bit, so mlx-community checkpoints
load without conversion:

* ``q`` holds unsigned integers in ``[0, 2**bits)``. Each row is one
  little-endian, least-significant-bit-first bit stream: element ``i`` of a
  row occupies stream bits ``[i*bits, (i+1)*bits)``, and every 32 stream bits
  form one ``uint32`` word. At 4 bits, byte ``j`` of a row holds elements
  ``2j`` (low nibble) and ``2j + 1`` (high nibble). At 3, 5 and 6 bits values
  straddle words.
* A ``[N, K]`` matrix (``N`` outputs, ``K`` inputs, checkpoint order) packs to
  ``packed`` ``uint32 [N, K * bits / 32]``; ``scales`` and ``biases`` are
  ``[N, K / group_size]``, groups running along ``K``, in a float dtype
  (float16, bfloat16 or float32; mlx-lm writes the model's dtype, GGUF imports
  keep the file's exact values).
* Scales may be negative and biases need not be the group's minimum.

Group size 16 is allowed besides MLX's 32/64/128: it expresses GGUF's 16-value
K-quant sub-blocks (Q6_K) exactly. Backends declare which (bits, group size)
pairs they run natively; the core's reference composition runs the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ferrum.errors import CheckpointError, InvalidRequestError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
#: MLX's kernel group sizes.
MLX_GROUP_SIZES = (32, 64, 128)
#: 16 exists for GGUF's K-quant sub-blocks.
SUPPORTED_GROUP_SIZES = (16, *MLX_GROUP_SIZES)
SCALE_DTYPES = ("float16", "bfloat16", "float32")

#: Rows processed at once when packing or unpacking, to bound temporary memory.
_ROW_CHUNK = 1024


def check_format(bits: int, group_size: int, where: str = "quantization") -> None:
    """Refuse a (bits, group size) pair the packed form does not define."""
    if bits not in SUPPORTED_BITS:
        raise InvalidRequestError(f"{where}: {bits}-bit weights are not supported; use one of {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise InvalidRequestError(
            f"{where}: group size {group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}"
        )


def _dtype_name(array: np.ndarray) -> str:
    return "bfloat16" if array.dtype.name == "bfloat16" else array.dtype.name


@dataclass(frozen=True)
class FloatCodes:
    """The same matrix as a checkpoint stored it in one of MLX's float modes (:mod:`ferrum.quant.float_modes`):
    a backend with kernels for ``mode`` may run these instead of the affine form, to the same values."""

    packed: np.ndarray  # uint32 [N, K * bits / 32] codes
    scales: np.ndarray  # uint8 [N, K / group_size]
    mode: str  # "mxfp4" or "nvfp4"

    def take_rows(self, rows: np.ndarray | slice) -> "FloatCodes":
        return FloatCodes(self.packed[rows], self.scales[rows], self.mode)


@dataclass(frozen=True)
class QuantizedWeight:
    """A host-side packed matrix: what loaders produce and ``quantized_upload`` receives.

    ``float_codes``, where set, is the same matrix in the float mode it was loaded from; operations that change
    values (scaling) drop it, those that move whole rows keep it.
    """

    packed: np.ndarray  # uint32 [N, K * bits / 32]
    scales: np.ndarray  # [N, K / group_size], float16 / bfloat16 / float32
    biases: np.ndarray  # same shape and dtype as scales
    bits: int
    group_size: int
    float_codes: FloatCodes | None = None

    def __post_init__(self) -> None:
        check_format(self.bits, self.group_size)
        if self.float_codes is not None and self.float_codes.packed.shape[0] != self.packed.shape[0]:
            raise CheckpointError(f"float-mode codes of {self.float_codes.packed.shape[0]} rows for a matrix of "
                                  f"{self.packed.shape[0]}")
        p, s, b = self.packed, self.scales, self.biases
        if p.dtype != np.uint32 or p.ndim != 2:
            raise CheckpointError(f"packed weights must be a 2-D uint32 array, got {p.dtype} {p.shape}")
        if s.shape != b.shape or s.ndim != 2 or s.shape[0] != p.shape[0]:
            raise CheckpointError(
                f"scales {s.shape} and biases {b.shape} must both be [{p.shape[0]}, groups] for packed {p.shape}"
            )
        if _dtype_name(s) not in SCALE_DTYPES or s.dtype != b.dtype:
            raise CheckpointError(
                f"scales and biases must share one of {SCALE_DTYPES}, got {_dtype_name(s)} / {_dtype_name(b)}"
            )
        k = s.shape[1] * self.group_size
        if p.shape[1] * 32 != k * self.bits:
            raise CheckpointError(
                f"packed {p.shape} at {self.bits} bits holds {p.shape[1] * 32 // self.bits} inputs per row, "
                f"but scales {s.shape} at group size {self.group_size} describe {k}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """The dense matrix's ``(N, K)``."""
        return self.packed.shape[0], self.scales.shape[1] * self.group_size

    @property
    def scale_dtype(self) -> str:
        return _dtype_name(self.scales)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes

    def take_rows(self, rows: np.ndarray | slice) -> "QuantizedWeight":
        """The same form restricted to some output rows (row order is free to change)."""
        codes = None if self.float_codes is None else self.float_codes.take_rows(rows)
        return QuantizedWeight(self.packed[rows], self.scales[rows], self.biases[rows], self.bits, self.group_size,
                               codes)


# ------------------------------------------------------------------ bit streams


def _run_shape(bits: int) -> tuple[int, int, str]:
    """The fewest values that fill whole bytes at ``bits`` bits, those bytes (3 bits: 8 values in 3 bytes), and
    the little-endian word a run fits in."""
    values = 8 // math.gcd(8, bits)
    return values, values * bits // 8, "<u4" if values * bits <= 32 else "<u8"


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``q [..., K]`` (values below ``2**bits``) into ``uint32 [..., K * bits / 32]``."""
    q = np.asarray(q)
    k = q.shape[-1]
    if (k * bits) % 32:
        raise InvalidRequestError(f"a row of {k} values at {bits} bits does not fill whole 32-bit words")
    rows = q.reshape(-1, k)
    if bits in _BYTE_TABLES:  # whole values per byte: or the shifted values into bytes
        per_byte = 8 // bits
        values = rows.astype(np.uint8).reshape(rows.shape[0], -1, per_byte)
        as_bytes = values[..., 0].copy()
        for i in range(1, per_byte):
            as_bytes |= values[..., i] << np.uint8(i * bits)
        return as_bytes.view("<u4").reshape(*q.shape[:-1], k * bits // 32)
    # 3, 5, 6 bits: each run of values or-ed into one little-endian uint64, whose low bytes are the run's bytes
    per_run, run_bytes, word_type = _run_shape(bits)
    out = np.empty((rows.shape[0], k * bits // 8), dtype=np.uint8)
    for start in range(0, rows.shape[0], _ROW_CHUNK):
        runs = rows[start : start + _ROW_CHUNK].astype(word_type).reshape(-1, k // per_run, per_run)
        word = runs[..., 0].copy()
        for i in range(1, per_run):
            word |= runs[..., i] << word.dtype.type(i * bits)
        as_bytes = word.view(np.uint8).reshape(*word.shape, word.itemsize)
        out[start : start + _ROW_CHUNK] = as_bytes[..., :run_bytes].reshape(word.shape[0], -1)
    return out.view("<u4").reshape(*q.shape[:-1], k * bits // 32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``uint8 [..., K]`` from ``uint32 [..., K * bits / 32]``."""
    packed = np.ascontiguousarray(packed, dtype="<u4")
    words = packed.shape[-1]
    k = words * 32 // bits
    rows = packed.reshape(-1, words)
    if bits in (2, 4, 8):  # whole values per byte: shift each byte
        per_byte = 8 // bits
        as_bytes = rows.view(np.uint8)
        shifts = (np.arange(per_byte, dtype=np.uint8) * bits)
        q = (as_bytes[..., None] >> shifts) & np.uint8((1 << bits) - 1)
        return q.reshape(*packed.shape[:-1], k)
    per_run, run_bytes, word_type = _run_shape(bits)
    word_bytes = np.dtype(word_type).itemsize
    shifts = (np.arange(per_run) * bits).astype(word_type)
    mask = np.dtype(word_type).type((1 << bits) - 1)
    out = np.empty((rows.shape[0], k), dtype=np.uint8)
    for start in range(0, rows.shape[0], _ROW_CHUNK):
        runs = rows[start : start + _ROW_CHUNK].view(np.uint8).reshape(-1, k // per_run, run_bytes)
        padded = np.zeros((*runs.shape[:2], word_bytes), dtype=np.uint8)  # each run's bytes as one word
        padded[..., :run_bytes] = runs
        word = padded.view(word_type)  # [rows, runs, 1]
        out[start : start + _ROW_CHUNK] = ((word >> shifts) & mask).reshape(runs.shape[0], k)
    return out.reshape(*packed.shape[:-1], k)


# ------------------------------------------------------------------ the formula


def dequantize(weight: QuantizedWeight, out: np.ndarray | None = None) -> np.ndarray:
    """``scales * q + biases`` as float32 ``[N, K]``, evaluated in float32 (written into ``out`` if given)."""
    n, k = weight.shape
    gs, bits = weight.group_size, weight.bits
    if out is None:
        out = np.empty((n, k), dtype=np.float32)
    if bits in _BYTE_TABLES:  # whole values per byte: one table lookup per byte
        table = _BYTE_TABLES[bits]
        as_bytes = np.ascontiguousarray(weight.packed, dtype="<u4").view(np.uint8)
        np.take(table, as_bytes, axis=0, out=out.reshape(n, -1, table.shape[1]))
    else:
        out[...] = unpack(weight.packed, bits)
    view = out.reshape(n, k // gs, gs)
    view *= weight.scales.astype(np.float32)[..., None]
    view += weight.biases.astype(np.float32)[..., None]
    return out


def _byte_table(bits: int) -> np.ndarray:
    """``[256, 8 // bits]`` float32: the values one byte holds, first element first."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte) * bits
    return ((np.arange(256)[:, None] >> shifts) & ((1 << bits) - 1)).astype(np.float32)


_BYTE_TABLES = {bits: _byte_table(bits) for bits in (2, 4, 8)}


def quantize(
    w: np.ndarray, bits: int = 4, group_size: int = 64, scale_dtype: str | None = None
) -> QuantizedWeight:
    """Round a float matrix ``[N, K]`` to the packed form, choosing each group's scale and bias.

    The rule is MLX's: the range ``[min, max]`` spread over ``2**bits - 1``
    steps, the extreme of larger magnitude taken as the bias (``q = 0``), and
    the scale nudged so that an integer number of steps reaches zero, which
    keeps 0.0 exact. ``q`` is then rounded with the scales and biases as
    stored in ``scale_dtype`` (default: ``w``'s float dtype, float32 for
    others), so the stored form is the best fit of what is actually kept.
    """
    check_format(bits, group_size)
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] % group_size:
        raise InvalidRequestError(
            f"can only quantize a 2-D matrix whose input size is a multiple of {group_size}, got {w.shape}"
        )
    scale_dtype = scale_dtype or (_dtype_name(w) if _dtype_name(w) in SCALE_DTYPES else "float32")
    if scale_dtype not in SCALE_DTYPES:
        raise InvalidRequestError(f"scale dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
    store = _numpy_float(scale_dtype)
    n, k = w.shape
    groups = w.astype(np.float32).reshape(n, k // group_size, group_size)
    steps = float((1 << bits) - 1)
    hi, lo = groups.max(axis=-1), groups.min(axis=-1)
    low_is_larger = np.abs(lo) > np.abs(hi)
    scale = np.maximum((hi - lo) / steps, 1e-7)
    scale = np.where(low_is_larger, scale, -scale)
    edge = np.where(low_is_larger, lo, hi)
    steps_to_zero = np.rint(edge / scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(steps_to_zero != 0, edge / steps_to_zero, scale)
    bias = np.where(steps_to_zero == 0, 0.0, edge)
    scales = scale.astype(store)
    biases = bias.astype(store)
    s32, b32 = scales.astype(np.float32)[..., None], biases.astype(np.float32)[..., None]
    q = np.clip(np.rint((groups - b32) / s32), 0, steps).astype(np.uint8).reshape(n, k)
    return QuantizedWeight(pack(q, bits), scales, biases, bits, group_size)


def _numpy_float(name: str) -> type:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return {"float16": np.float16, "float32": np.float32}[name]
