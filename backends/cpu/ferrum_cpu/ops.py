"""numpy implementations of the Ferrum ops (float32 compute).

A decode step of a small model makes hundreds of op calls on single rows, where
numpy's per-call cost and temporaries weigh more than the arithmetic: the ops below
make as few numpy calls as their math allows and write into the one array they
return. Matrix products go to BLAS whole (one ``linear`` per fused projection).
"""

from __future__ import annotations

import os

import numpy as np

from ferrum.backends import BackendInfo
from ferrum.hookspec import API_VERSION, hookimpl
from ferrum.recurrent import kernels as _recurrent
from ferrum.reference_ops import fake_quantized, quantized_rows
from ferrum_cpu import attention as _attention
from ferrum_cpu.matmul import matmul_t


@hookimpl
def backend_info() -> BackendInfo:
    return BackendInfo(
        name="cpu",
        device="cpu",
        dtypes=("float32",),
        default_dtype="float32",
        memory_bytes=_host_memory_bytes(),
        api_version=API_VERSION,  # a built-in speaks the version of the core it ships with
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
def upload_weight(name, array, dtype):
    # Same shape [out, in], column-major memory: the products stream ``w.T`` row by row (ferrum_cpu.matmul).
    return np.asfortranarray(array, dtype=_np_dtype(dtype)) if array.ndim == 2 else from_numpy(array, dtype)


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
def split(x, sizes):
    parts, start = [], 0
    for size in sizes:
        parts.append(x[..., start : start + size])
        start += size
    return parts


@hookimpl
def add(a, b):
    return a + b


@hookimpl
def linear(x, weight, bias):
    out = matmul_t(x, weight)
    if bias is not None:
        out += bias
    return out


@hookimpl
def rms_norm(x, weight, eps):
    rms = np.sqrt(np.vecdot(x, x) / x.shape[-1] + eps)  # sum of squares accumulated in float32
    out = np.divide(x, rms[..., None])
    out *= weight
    return out


@hookimpl
def layer_norm(x, weight, bias, eps):
    out = np.subtract(x, x.mean(axis=-1, keepdims=True))
    deviation = np.sqrt(np.vecdot(out, out) / x.shape[-1] + eps)
    out /= deviation[..., None]
    if weight is not None:
        out *= weight
    if bias is not None:
        out += bias
    return out


@hookimpl
def mul(a, b):
    return np.multiply(a, b, dtype=a.dtype)


@hookimpl
def relu_squared(x):
    out = np.maximum(x, 0)
    return np.square(out, out=out)


@hookimpl
def relu(x):
    return np.maximum(x, np.zeros((), x.dtype))


@hookimpl
def quantize_activations(x, levels):
    return quantized_rows(np.asarray(x, dtype=np.float32), levels).astype(x.dtype, copy=False)


@hookimpl
def fake_quantize(x, scale, low, high):
    return fake_quantized(x, scale, low, high).astype(x.dtype, copy=False)


@hookimpl
def xielu(x, alpha_p, alpha_n, beta, eps):
    ap, an, b, e = (np.asarray(v, dtype=x.dtype) for v in (alpha_p, alpha_n, beta, eps))
    linear = b * x
    positive = ap * x * x + linear
    negative = (np.expm1(np.minimum(x, e)) - x) * an + linear
    return np.where(x > 0, positive, negative).astype(x.dtype, copy=False)


@hookimpl
def sigmoid_mul(gate, x):
    return _recurrent.sigmoid_mul(gate, x)


@hookimpl
def softplus_mul(gate, x):
    return _recurrent.softplus_mul(gate, x).astype(x.dtype)


@hookimpl
def causal_conv1d(x, weight, state, cu_seqlens, silu):
    return _recurrent.causal_conv1d(x, weight, state, cu_seqlens, silu)


@hookimpl
def gated_delta_rule(q, k, v, a, b, a_log, dt_bias, state, cu_seqlens, beta_scale=1.0, lower_bound=None):
    return _recurrent.gated_delta_rule(q, k, v, a, b, a_log, dt_bias, state, cu_seqlens, beta_scale, lower_bound)


@hookimpl
def ssd_update(x, dt, a_log, b, c, d, dt_bias, state, cu_seqlens, dt_min, dt_max):
    return _recurrent.ssd_update(x, dt, a_log, b, c, d, dt_bias, state, cu_seqlens, dt_min, dt_max)


@hookimpl
def selective_scan(x, dt, a_log, b, c, d, dt_bias, state, cu_seqlens):
    return _recurrent.selective_scan(x, dt, a_log, b, c, d, dt_bias, state, cu_seqlens)


@hookimpl
def rg_lru(x, gate_x, gate_a, a_param, state, cu_seqlens, starts):
    return _recurrent.rg_lru(x, gate_x, gate_a, a_param, state, cu_seqlens, starts)


@hookimpl
def wkv7(r, w, k, v, a, b, state, cu_seqlens):
    return _recurrent.wkv7(r, w, k, v, a, b, state, cu_seqlens)


@hookimpl
def clip(x, limit):
    return np.clip(x, -limit, limit).astype(x.dtype, copy=False)


@hookimpl
def add_rms_norm(x, residual, weight, eps):
    summed = np.add(x, residual)
    return rms_norm(summed, weight, eps), summed


#: Per rope (keyed by its ``inv_freq`` array): the positions last seen and their tables. A
#: forward rotates q and k of every layer with the same positions, so the tables are built once.
_rope_tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def _rope_table(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cos [T, 1, 2, half]`` and the signed ``sin`` (``-sin`` then ``sin``) that rotate half pairs."""
    hit = _rope_tables.get(id(inv_freq))
    if hit is not None and hit[0] is positions and hit[1] is inv_freq:
        return hit[2], hit[3]
    angles = positions[:, None].astype(np.float32) * inv_freq[None, :]  # [T, half]
    cos, sin = np.cos(angles), np.sin(angles)
    cos2 = np.stack([cos, cos], axis=1)[:, None]
    sin2 = np.stack([-sin, sin], axis=1)[:, None]
    if len(_rope_tables) > 8:  # ropes of models no longer loaded
        _rope_tables.clear()
    _rope_tables[id(inv_freq)] = (positions, inv_freq, cos2, sin2)
    return cos2, sin2


@hookimpl
def rope(x, positions, inv_freq):
    cos2, sin2 = _rope_table(positions, inv_freq)
    halves = x.reshape(*x.shape[:-1], 2, -1)  # [T, heads, 2, half]: (x1, x2)
    out = halves * cos2
    out += halves[..., ::-1, :] * sin2  # (x2, x1) * (-sin, sin)
    return out.reshape(x.shape)


@hookimpl
def silu_mul(gate, up):
    out = np.negative(gate)
    np.exp(out, out=out)
    out += 1.0
    np.divide(gate, out, out=out)
    out *= up
    return out


@hookimpl
def kv_alloc(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype):
    return _attention.KVPool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, _np_dtype(dtype))


@hookimpl
def kv_write(pool, layer, k, v, slot_mapping):
    pool.write(layer, k, v, slot_mapping)


@hookimpl
def kv_gather(pool, layer, block_ids, length):
    return pool.gather(layer, block_ids, length)


@hookimpl
def attention(q, k, v, scale, sliding_window, softcap=None, sinks=None, alibi_slopes=None):
    return _attention.causal_attention(q, k, v, scale, sliding_window, softcap, sinks, alibi_slopes)


@hookimpl
def paged_attention(q, pool, layer, batch, scale, sliding_window, softcap=None, sinks=None, alibi_slopes=None):
    return _attention.paged_attention(q, pool, layer, batch, scale, sliding_window, softcap, sinks, alibi_slopes)
