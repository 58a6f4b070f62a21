"""Packed affine low-bit weights (Ferrum's one packed form, MLX's layout) kept packed on the device.

Each call unpacks the bitstream and applies ``scales * q + biases`` inside the jitted matmul, so the
float matrix exists only transiently in XLA's buffers, never as a resident weight. One generic
unpacking serves every width: element ``i`` is stream bits ``[i*bits, (i+1)*bits)`` of its row,
LSB first, possibly straddling two uint32 words (3, 5 and 6 bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from ferrum import hookimpl

from ferrum_jax.arrays import DEVICE, dtype_of
from ferrum_jax.dense import F32, matmul_t


@dataclass(frozen=True)
class PackedMatrix:
    """``packed`` uint32 ``[N, K*bits/32]``, ``scales`` / ``biases`` ``[N, K/group_size]`` (their checkpoint dtype)."""

    packed: jax.Array
    scales: jax.Array
    biases: jax.Array
    bits: int
    group_size: int
    dtype: str  # the compute dtype of results

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes


@hookimpl
def quantized_upload(name, weight, dtype, role):
    put = partial(jax.device_put, device=DEVICE)
    return PackedMatrix(put(weight.packed), put(weight.scales), put(weight.biases), weight.bits,
                        weight.group_size, dtype)


def _dequantize(packed, scales, biases, bits: int, group_size: int):
    """``[N, K]`` float32 from the packed rows."""
    words = packed.shape[-1]
    k = words * 32 // bits
    start = jnp.arange(k, dtype=jnp.uint32) * bits
    word, shift = start // 32, start % 32
    low = packed[..., word] >> shift
    straddles = shift + bits > 32
    high = jnp.where(straddles, packed[..., jnp.minimum(word + 1, words - 1)] << ((32 - shift) % 32), 0)
    q = ((low | high) & ((1 << bits) - 1)).astype(F32)
    groups = q.reshape(*q.shape[:-1], k // group_size, group_size)
    w = groups * scales.astype(F32)[..., None] + biases.astype(F32)[..., None]
    return w.reshape(q.shape)


@partial(jax.jit, static_argnames=("bits", "group_size"))
def _qlinear(x, packed, scales, biases, bias, bits, group_size):
    out = matmul_t(x.astype(F32), _dequantize(packed, scales, biases, bits, group_size))
    if bias is not None:
        out = out + bias.astype(F32)
    return out.astype(x.dtype)


@hookimpl
def quantized_linear(x, weight, bias):
    return _qlinear(x, weight.packed, weight.scales, weight.biases, bias, bits=weight.bits,
                    group_size=weight.group_size)


@partial(jax.jit, static_argnames=("bits", "group_size", "dtype"))
def _qrows(packed, scales, biases, ids, bits, group_size, dtype):
    rows = _dequantize(packed[ids], scales[ids], biases[ids], bits, group_size)
    return rows.astype(dtype)


@hookimpl
def quantized_embedding(weight, ids):
    return _qrows(weight.packed, weight.scales, weight.biases, ids, bits=weight.bits,
                  group_size=weight.group_size, dtype=dtype_of(weight.dtype))
