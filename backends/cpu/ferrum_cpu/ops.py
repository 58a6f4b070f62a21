"""numpy implementations of the Ferrum ops (float32 compute)."""

from __future__ import annotations

import os

import numpy as np

from ferrum.backends import BackendInfo
from ferrum.hookspec import hookimpl


@hookimpl
def backend_info() -> BackendInfo:
    return BackendInfo(
        name="cpu",
        device="cpu",
        dtypes=("float32",),
        default_dtype="float32",
        memory_bytes=_host_memory_bytes(),
    )


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


_DTYPES = {"float32": np.float32, "int32": np.int32, "int64": np.int64}


def _np_dtype(dtype: str) -> type:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"the numpy backend computes in float32; {dtype!r} is not available") from None


@hookimpl
def from_numpy(array, dtype):
    if dtype is None:
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array, dtype=_np_dtype(dtype))


@hookimpl
def to_numpy(x):
    return x.astype(np.float32) if x.dtype.kind == "f" and x.dtype != np.float32 else x


@hookimpl
def cast(x, dtype):
    return x.astype(_np_dtype(dtype))


@hookimpl
def reshape(x, shape):
    return x.reshape(shape)


@hookimpl
def take_rows(x, indices):
    return x[indices]


@hookimpl
def concat(parts):
    return np.concatenate(parts, axis=0)


@hookimpl
def add(a, b):
    return a + b


@hookimpl
def linear(x, weight, bias):
    out = x @ weight.T
    if bias is not None:
        out += bias
    return out


# The element-wise ops below write into the one array they return (``out=``): a decode
# step makes hundreds of these calls on small rows, where numpy's temporaries cost
# more than the arithmetic.


@hookimpl
def rms_norm(x, weight, eps):
    flat = x.reshape(-1, x.shape[-1])
    scale = np.einsum("ij,ij->i", flat, flat).reshape(*x.shape[:-1], 1)
    scale /= x.shape[-1]
    scale += eps
    np.sqrt(scale, out=scale)
    out = np.divide(x, scale)
    out *= weight
    return out


@hookimpl
def add_rms_norm(x, residual, weight, eps):
    summed = np.add(x, residual)
    return rms_norm(summed, weight, eps), summed


#: cos and sin tables of the last positions seen: a forward rotates q and k of every layer by them.
_rope_tables: list = [None, None, None, None]


def _cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cached_pos, cached_freq, cos, sin = _rope_tables
    if cached_pos is not positions or cached_freq is not inv_freq:
        angles = positions[:, None].astype(np.float32) * inv_freq[None, :]  # [T, half]
        cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
        _rope_tables[:] = [positions, inv_freq, cos, sin]
    return cos, sin


@hookimpl
def rope(x, positions, inv_freq):
    half = x.shape[-1] // 2
    cos, sin = _cos_sin(positions, inv_freq)
    x1, x2 = x[..., :half], x[..., half:]
    out = np.empty_like(x)
    np.multiply(x1, cos, out=out[..., :half])
    out[..., :half] -= x2 * sin
    np.multiply(x2, cos, out=out[..., half:])
    out[..., half:] += x1 * sin
    return out


@hookimpl
def silu_mul(gate, up):
    out = np.negative(gate)
    np.exp(out, out=out)
    out += 1.0
    np.divide(gate, out, out=out)
    out *= up
    return out


class KVPool:
    """Per-layer K and V arrays ``[num_blocks, block_size, kv_heads, head_dim]``."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.k = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]


@hookimpl
def kv_alloc(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype):
    return KVPool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, _np_dtype(dtype))


@hookimpl
def kv_write(pool, layer, k, v, slot_mapping):
    k_flat = pool.k[layer].reshape(-1, *pool.k[layer].shape[2:])
    v_flat = pool.v[layer].reshape(-1, *pool.v[layer].shape[2:])
    k_flat[slot_mapping] = k
    v_flat[slot_mapping] = v


@hookimpl
def kv_gather(pool, layer, block_ids, length):
    k = pool.k[layer][block_ids].reshape(-1, *pool.k[layer].shape[2:])[:length]
    v = pool.v[layer][block_ids].reshape(-1, *pool.v[layer].shape[2:])[:length]
    return k, v


@hookimpl
def attention(q, k, v, scale, sliding_window, softcap=None):
    q_len, heads, _ = q.shape
    kv_len, kv_heads, _ = k.shape
    group = heads // kv_heads
    qg = q.reshape(q_len, kv_heads, group, -1).transpose(1, 2, 0, 3)  # [kvh, g, q, d]
    kt = k.transpose(1, 2, 0)  # [kvh, d, kv]
    scores = (qg @ kt[:, None]) * scale  # [kvh, g, q, kv]
    if softcap is not None:
        scores = np.tanh(scores / softcap) * softcap
    query_pos = np.arange(kv_len - q_len, kv_len)[:, None]
    key_pos = np.arange(kv_len)[None, :]
    allowed = key_pos <= query_pos
    if sliding_window is not None:
        allowed &= key_pos > query_pos - sliding_window
    scores = np.where(allowed, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = probs @ v.transpose(1, 0, 2)[:, None]  # [kvh, g, q, d]
    return out.transpose(2, 0, 1, 3).reshape(q_len, heads, -1).astype(q.dtype, copy=False)

