"""GGUF quantized blocks rewritten into the packed affine form exactly, never going through float.

Every GGUF type below is an affine code per block or sub-block, so its bytes
map onto ``scales * q + biases`` with the same ``q`` and parameters that
reproduce llama.cpp's values bit for bit (evaluated in float32):

========  =====  ==========  ==========================================  ==============
type      bits   group size  scale, bias                                 stored as
========  =====  ==========  ==========================================  ==============
Q4_0      4      32          ``d``, ``-8d``                              float16 [1]_
Q4_1      4      32          ``d``, ``m``                                float16
Q5_0      5      32          ``d``, ``-16d``                             float16 [1]_
Q5_1      5      32          ``d``, ``m``                                float16
Q8_0      8      32          ``d``, ``-128d`` (``q`` = int8 + 128)       float16 [1]_
Q2_K      2      16          ``d*sc_j``, ``-dmin*m_j``                   float32
Q3_K      3      16          ``d*sc_j``, ``-4*d*sc_j`` [2]_              float32
Q4_K      4      32          ``d*sc_j``, ``-dmin*m_j``                   float32
Q5_K      5      32          ``d*sc_j``, ``-dmin*m_j``                   float32
Q6_K      6      16          ``d*sc_j``, ``-32*d*sc_j``                  float32
IQ4_NL    8      32          ``d``, ``-128d`` (``q`` = code + 128) [3]_  float16 [1]_
IQ4_XS    8      32          ``d*sc_j``, ``-128*d*sc_j`` [3]_            float32
========  =====  ==========  ==========================================  ==============

MXFP4 (gpt-oss's experts) is no affine code but one of MLX's float modes: its
E2M1 codes and E8M0 block exponents are kept as they are, reordered into MLX's
mxfp4 layout (``FloatCodes``), which every backend reads (:mod:`ferrum.quant.float_modes`).

.. [1] unless a bias overflows float16 (``|d|`` above 65504 / 8, / 16 or / 128):
   then that tensor's scales and biases are float32.
.. [2] ``sc_j`` signed (6 bits less 32); ``q`` = the two low bits + 4 * the
   ``hmask`` bit, which llama.cpp writes as "subtract 4 unless the bit is set".
.. [3] IQ4's 16 levels are not evenly spaced, so no 4-bit affine code holds
   them; but each is an integer in [-127, 113] times the (sub-)block scale,
   which 8 bits hold, exactly: twice the memory of the file's 4 bits. (IQ4_XS's
   ``d * sc_j * q`` is at most 11 + 5 + 8 significant bits: exact in float32.)

K-quant scales are an 11-bit float16 significand times a 6-bit (or signed
8-bit) integer, up to 19 significant bits: exact in float32 only. GGUF packs
values half-block by half-block (low nibbles, then high nibbles); the packed
form wants consecutive values, so ``q`` is unpacked and packed again. Other
GGUF types (the IQ1/IQ2/IQ3 lattice codebooks, TQ*) have no such form and are
refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.quant.affine import FloatCodes, QuantizedWeight, pack
from ferrum.quant.config import AFFINE

#: GGUF types kept as they are (dense), with their numpy dtype names.
DENSE_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class _BlockType:
    block: int  # values per block
    nbytes: int  # bytes per block
    bits: int
    group_size: int
    k_quant: bool  # parameters need float32
    scalars: tuple[int, ...]  # byte offsets of the block's float16 parameters (d, and m / dmin)


_TYPES = {
    "Q4_0": _BlockType(32, 18, 4, 32, False, (0,)),
    "Q4_1": _BlockType(32, 20, 4, 32, False, (0, 2)),
    "Q5_0": _BlockType(32, 22, 5, 32, False, (0,)),
    "Q5_1": _BlockType(32, 24, 5, 32, False, (0, 2)),
    "Q8_0": _BlockType(32, 34, 8, 32, False, (0,)),
    "Q2_K": _BlockType(256, 84, 2, 16, True, (80, 82)),
    "Q3_K": _BlockType(256, 110, 3, 16, True, (108,)),
    "Q4_K": _BlockType(256, 144, 4, 32, True, (0, 2)),
    "Q5_K": _BlockType(256, 176, 5, 32, True, (0, 2)),
    "Q6_K": _BlockType(256, 210, 6, 16, True, (208,)),
    "IQ4_NL": _BlockType(32, 18, 8, 32, False, (0,)),
    "IQ4_XS": _BlockType(256, 136, 8, 32, True, (0,)),
}
#: GGUF types kept as one of MLX's float modes: block, bytes per block (a uint8 E8M0 exponent, then 16 bytes
#: of E2M1 codes, low nibbles first), bits and group size.
_FLOAT_CODED = {"MXFP4": ("mxfp4", _BlockType(32, 17, 4, 32, False, ()))}
#: GGUF types repacked exactly, with their (bits, group size).
SUPPORTED_TYPES = {name: (t.bits, t.group_size) for name, t in (*_TYPES.items(),
                                                                 *((n, k) for n, (_, k) in _FLOAT_CODED.items()))}

#: The float16 bias ``-c * d`` of the types whose bias is a multiple of ``d``.
_BIAS_FACTOR = {"Q4_0": 8.0, "Q5_0": 16.0, "Q8_0": 128.0, "IQ4_NL": 128.0}
#: Values repacked per step, to bound temporary memory on large tensors.
_CHUNK_VALUES = 1 << 22


@dataclass(frozen=True)
class StoredForm:
    """How one GGUF tensor is stored in the checkpoint: packed (``bits`` set) or dense."""

    shape: tuple[int, ...]  # the dense tensor's numpy shape (``[E, N, K]`` for a stack of experts)
    dtype: str  # scale/bias dtype when packed, the tensor's dtype when dense
    bits: int | None = None
    group_size: int | None = None
    mode: str = AFFINE  # or one of MLX's float modes: uint32 codes and uint8 scales, no biases

    @property
    def packed(self) -> bool:
        return self.bits is not None

    def parts(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(suffix, dtype, shape)`` per stored array: ``weight`` (uint32), ``scales``, ``biases``; or ``weight``."""
        if self.bits is None:
            return [("weight", self.dtype, self.shape)]
        *lead, k = self.shape  # a matrix, or a stack of them (experts)
        groups = (*lead, k // self.group_size)
        packed = ("weight", "uint32", (*lead, k * self.bits // 32))
        if self.mode != AFFINE:
            return [packed, ("scales", "uint8", groups)]
        return [packed, ("scales", self.dtype, groups), ("biases", self.dtype, groups)]


def _unsupported(type_name: str, tensor: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(
        f"tensor {tensor} is stored as GGUF {type_name}, which Ferrum cannot import exactly; supported: "
        f"{', '.join(SUPPORTED_TYPES)} (packed) and {', '.join(DENSE_TYPES)} (dense). Re-quantize the model "
        "to one of them (llama.cpp's llama-quantize, e.g. Q4_K_M), or import it through float with "
        "ferrum.gguf_import.convert_gguf(..., dequantize_to='float32')"
    )


def describe(raw: np.ndarray, type_name: str, shape: tuple[int, ...], tensor: str) -> StoredForm:
    """Check one tensor (type, whole blocks, finite parameters) and say how :func:`repack` will store it.

    ``raw`` is the tensor's data as GGUF holds it (block bytes for quantized
    types), ``shape`` its numpy shape ``(N, K)``. Reads only each block's
    parameters, so checking a whole file is quick.
    """
    if type_name in DENSE_TYPES:
        return StoredForm(tuple(shape), DENSE_TYPES[type_name])
    if type_name in _FLOAT_CODED:
        mode, kind = _FLOAT_CODED[type_name]
        _check_blocks_per_row(kind, type_name, shape, tensor)
        if (_blocks(raw, kind, shape, tensor)[:, 0] == 0xFF).any():  # E8M0's NaN
            raise CheckpointError(f"tensor {tensor} ({type_name}) holds NaN block scales; the file is damaged")
        return StoredForm(tuple(shape), "uint8", kind.bits, kind.group_size, mode)
    kind = _TYPES.get(type_name)
    if kind is None:
        raise _unsupported(type_name, tensor)
    _check_blocks_per_row(kind, type_name, shape, tensor)
    blocks = _blocks(raw, kind, shape, tensor)
    scalars = [_f16(blocks, at) for at in kind.scalars]
    _check_finite(tensor, type_name, *scalars)
    if kind.k_quant:
        return StoredForm(tuple(shape), "float32", kind.bits, kind.group_size)
    factor = _BIAS_FACTOR.get(type_name)
    if factor is not None:
        bias = -factor * scalars[0].astype(np.float32)
        with np.errstate(over="ignore"):  # an overflow is what is being checked for
            as_f16 = bias.astype(np.float16).astype(np.float32)
        if not np.array_equal(as_f16, bias):
            return StoredForm(tuple(shape), "float32", kind.bits, kind.group_size)
    return StoredForm(tuple(shape), "float16", kind.bits, kind.group_size)


def _check_blocks_per_row(kind: _BlockType, type_name: str, shape: tuple[int, ...], tensor: str) -> None:
    if len(shape) != 2 or shape[1] % kind.block:
        raise CheckpointError(
            f"tensor {tensor} ({type_name}, shape {tuple(shape)}) is not a matrix of whole {kind.block}-value "
            f"blocks per row; {type_name} rows must hold a multiple of {kind.block} values"
        )


def repack(raw: np.ndarray, type_name: str, shape: tuple[int, ...], tensor: str
           ) -> QuantizedWeight | FloatCodes | np.ndarray:
    """One GGUF tensor in the packed affine form (quantized types), as MLX float-mode codes (MXFP4) or as its
    dense array (F32/F16/BF16).

    ``dequantize`` of the result equals ``gguf.quants.dequantize`` of ``raw``
    exactly, both evaluated in float32.
    """
    form = describe(raw, type_name, shape, tensor)
    if not form.packed:
        return _dense(raw, form.dtype, form.shape, tensor)
    if form.mode != AFFINE:
        blocks = _blocks(raw, _FLOAT_CODED[type_name][1], form.shape, tensor)
        n, k = form.shape
        codes = pack(_halves(blocks[:, 1:]).reshape(n, k), form.bits)  # values in order, lowest bits first
        return FloatCodes(codes, np.ascontiguousarray(blocks[:, 0]).reshape(n, k // form.group_size), form.mode)
    kind = _TYPES[type_name]
    n, k = form.shape
    blocks = _blocks(raw, kind, form.shape, tensor)
    per_row = k // kind.block
    store = np.float16 if form.dtype == "float16" else np.float32
    packed = np.empty((n, k * kind.bits // 32), dtype=np.uint32)
    scales = np.empty((n, k // kind.group_size), dtype=store)
    biases = np.empty_like(scales)
    step = max(1, _CHUNK_VALUES // k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        q, scale, bias = _DECODERS[type_name](blocks[start * per_row : stop * per_row])
        packed[start:stop] = pack(q.reshape(stop - start, k), kind.bits)
        scales[start:stop] = scale.reshape(stop - start, -1)
        biases[start:stop] = bias.reshape(stop - start, -1)
    return QuantizedWeight(packed, scales, biases, kind.bits, kind.group_size)


# ------------------------------------------------------------------ reading blocks


def _dense(raw: np.ndarray, dtype: str, shape: tuple[int, ...], tensor: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        np_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        np_dtype = np.dtype(dtype)
    data = np.ascontiguousarray(raw)
    if data.dtype != np_dtype:
        data = data.view(np.uint8).view(np_dtype)
    if data.size != int(np.prod(shape)):
        raise CheckpointError(
            f"tensor {tensor} holds {data.size} {dtype} values but its shape {tuple(shape)} needs {int(np.prod(shape))}"
        )
    return data.reshape(shape)


def _blocks(raw: np.ndarray, kind: _BlockType, shape: tuple[int, ...], tensor: str) -> np.ndarray:
    """``raw`` as ``uint8 [N * K / block, bytes per block]``."""
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    count = shape[0] * shape[1] // kind.block
    if data.size != count * kind.nbytes:
        raise CheckpointError(
            f"tensor {tensor} holds {data.size} bytes but {count} blocks of its type need {count * kind.nbytes}"
        )
    return data.reshape(count, kind.nbytes)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of every block, as ``[blocks, 1]``."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view("<f2")


def _check_finite(tensor: str, type_name: str, *params: np.ndarray) -> None:
    for p in params:
        if not np.isfinite(p).all():
            raise CheckpointError(
                f"tensor {tensor} ({type_name}) holds NaN or infinite block scales; the file is damaged"
            )


# ------------------------------------------------------------------ q, scale, bias per type
# Each decoder takes uint8 blocks [B, bytes] and returns q [B, block] (uint8, the
# values in order), scale and bias [B, groups per block] (float32, exact).


def _halves(qs: np.ndarray) -> np.ndarray:
    """Low nibbles first, then high nibbles: GGUF's order of 4-bit values within a run of bytes."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(blocks: np.ndarray, at: int) -> np.ndarray:
    """Q5_0/Q5_1's 32-bit ``qh``: bit ``i`` is value ``i``'s bit 4, as ``[B, 32]`` 0/16."""
    qh = np.ascontiguousarray(blocks[:, at : at + 4]).view("<u4")
    return (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(blocks, 0).astype(np.float32)
    return _halves(blocks[:, 2:18]), d, -8.0 * d


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _halves(blocks[:, 4:20]), _f16(blocks, 0).astype(np.float32), _f16(blocks, 2).astype(np.float32)


def _q5_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(blocks, 0).astype(np.float32)
    return _halves(blocks[:, 6:22]) | _fifth_bits(blocks, 2), d, -16.0 * d


def _q5_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = _halves(blocks[:, 8:24]) | _fifth_bits(blocks, 4)
    return q, _f16(blocks, 0).astype(np.float32), _f16(blocks, 2).astype(np.float32)


def _q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(blocks, 0).astype(np.float32)
    return blocks[:, 2:34] ^ np.uint8(0x80), d, -128.0 * d  # int8 + 128 = flip the sign bit


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low 2 bits: per 32-byte half, bits ``2s, 2s+1`` of byte ``l`` are value ``32s + l``."""
    b = qs.shape[0]
    halves = qs.reshape(b, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    return (halves & 3).reshape(b, 256)


def _q2_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sc = blocks[:, 0:16]  # per sub-block: scale in the low nibble, min in the high one
    d, dmin = _f16(blocks, 80).astype(np.float32), _f16(blocks, 82).astype(np.float32)
    return _crumbs(blocks[:, 16:80]), d * (sc & 0x0F).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32))


def _q3_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = blocks.shape[0]
    hmask = blocks[:, 0:32]  # bit i of byte l: bit 2 of value 32i + l
    high = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = _crumbs(blocks[:, 32:96]) | (high.reshape(b, 256) << 2)
    s = blocks[:, 96:108]  # 16 six-bit scales: low nibbles in bytes 0-7 (then their high nibbles), top 2 bits in 8-11
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    top = ((s[:, None, 8:12] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3).reshape(b, 16)
    scale = _f16(blocks, 108).astype(np.float32) * ((low | (top << 4)).astype(np.float32) - 32.0)
    return q, scale, -4.0 * scale


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K sub-block scales: ``d * sc_j`` and ``-dmin * m_j``, ``[B, 8]`` float32 (exact)."""
    s = blocks[:, 4:16]
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    d, dmin = _f16(blocks, 0).astype(np.float32), _f16(blocks, 2).astype(np.float32)
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low 4 bits: per 32-byte chunk ``c``, low nibbles are sub-block 2c, high 2c+1."""
    chunks = qs.reshape(qs.shape[0], 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(qs.shape[0], 256)


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _k_nibbles(blocks[:, 16:144]), *_k_scales(blocks)


def _q5_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    qh = blocks[:, 16:48]  # bit j of byte l: bit 4 of value l of sub-block j
    fifth = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
    q = _k_nibbles(blocks[:, 48:176]) | fifth.reshape(blocks.shape[0], 256)
    return q, *_k_scales(blocks)


def _q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(b, 2, 64)  # per 128-value half: values l (low) and 64 + l (high)
    qh = blocks[:, 128:192].reshape(b, 2, 32)  # bits 2i, 2i+1 of byte l: top bits of value 32i + l
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)
    high = (qh[:, :, None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    q = (low | (high.reshape(b, 2, 128) << 4)).reshape(b, 256)
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    scale = _f16(blocks, 208).astype(np.float32) * sc
    return q, scale, -32.0 * scale


#: IQ4's 16 levels (llama.cpp's ``kvalues_iq4nl``) as unsigned 8-bit codes: level + 128.
_IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_IQ4_CODES = (np.array(_IQ4_LEVELS) + 128).astype(np.uint8)


def _iq4_nl(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(blocks, 0).astype(np.float32)
    return _IQ4_CODES[_halves(blocks[:, 2:18])], d, -128.0 * d


def _iq4_xs(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eight sub-blocks of 32: 6-bit scales (low nibbles in bytes 4-7, top 2 bits in the uint16 at 2), less 32."""
    b = blocks.shape[0]
    low = blocks[:, 4:8]
    low = np.stack([low & 0x0F, low >> 4], axis=2).reshape(b, 8)
    top = (np.ascontiguousarray(blocks[:, 2:4]).view("<u2") >> np.arange(0, 16, 2, dtype=np.uint16)) & 3
    scale = _f16(blocks, 0).astype(np.float32) * ((low | (top.astype(np.uint8) << 4)).astype(np.float32) - 32.0)
    codes = _IQ4_CODES[_halves(blocks[:, 8:136].reshape(b, 8, 16))]  # per sub-block: low nibbles, then high
    return codes.reshape(b, 256), scale, -128.0 * scale


_DECODERS = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
}
