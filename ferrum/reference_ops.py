"""Reference compositions of the optional ops out of the required ones.

Each function takes the ops table first; :class:`ferrum.ops.OpsTable` binds
it when a plugin leaves the op out. They define the semantics a native
implementation must match.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ferrum.quant.reference import Dequantized, HostQuantized, upload
from ferrum.moe import reference as moe_reference
from ferrum.recurrent import kernels
from ferrum.sampling import DeviceSample, sample_numpy


def cast(ops: Any, x: Any, dtype: str) -> Any:
    return ops.from_numpy(ops.to_numpy(x), dtype)


def upload_weight(ops: Any, name: str, array: Any, dtype: str) -> Any:
    return ops.from_numpy(np.ascontiguousarray(array, dtype=np.float32), dtype)


def embedding(ops: Any, weight: Any, ids: Any) -> Any:
    return ops.take_rows(weight, ids)


def add_rms_norm(ops: Any, x: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
    summed = ops.add(x, residual)
    return ops.rms_norm(summed, weight, eps), summed


def prepare_attention_batch(ops: Any, batch: Any) -> Any:
    return None


def paged_attention(
    ops: Any, q: Any, pool: Any, layer: int, batch: Any, scale: float, sliding_window: int | None,
    softcap: float | None = None, sinks: Any = None, alibi_slopes: Any = None,
) -> Any:
    """Item by item: gather the item's KV from its blocks, then dense attention."""
    if batch.num_items == 1:
        k, v = ops.kv_gather(pool, layer, batch.block_ids(0), int(batch.seq_lens[0]))
        return ops.attention(q, k, v, scale, sliding_window, softcap, sinks, alibi_slopes)
    outputs = []
    for item in range(batch.num_items):
        start, end = batch.query_range(item)
        k, v = ops.kv_gather(pool, layer, batch.block_ids(item), int(batch.seq_lens[item]))
        rows = ops.from_numpy(np.arange(start, end, dtype=np.int32), None)
        outputs.append(ops.attention(ops.take_rows(q, rows), k, v, scale, sliding_window, softcap, sinks,
                                     alibi_slopes))
    return ops.concat(outputs)


def dtype_name(x: Any) -> str:
    """The Ferrum dtype name of a backend array whose ``dtype`` prints as one (numpy, torch, MLX do), else float32."""
    name = str(getattr(x, "dtype", "float32")).rsplit(".", 1)[-1]
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def _on_host(ops: Any, x: Any, fn: Any) -> Any:
    """``fn`` of ``x`` computed on the host in float32, returned in ``x``'s dtype."""
    return ops.from_numpy(fn(np.asarray(ops.to_numpy(x), dtype=np.float32)), dtype_name(x))


def _gelu_tanh(g: np.ndarray) -> np.ndarray:
    return 0.5 * g * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (g + 0.044715 * g**3)))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu_exact(g: np.ndarray) -> np.ndarray:
    return (0.5 * g * (1.0 + _erf(g / np.sqrt(2.0)))).astype(np.float32)


def gelu_tanh_mul(ops: Any, gate: Any, up: Any) -> Any:
    u = np.asarray(ops.to_numpy(up), dtype=np.float32)
    return _on_host(ops, gate, lambda g: _gelu_tanh(g) * u)


def layer_norm(ops: Any, x: Any, weight: Any, bias: Any, eps: float) -> Any:
    w, b = (None if p is None else np.asarray(ops.to_numpy(p), dtype=np.float32) for p in (weight, bias))

    def fn(a: np.ndarray) -> np.ndarray:
        centered = a - a.mean(axis=-1, keepdims=True)
        out = centered / np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + np.float32(eps))
        out = out if w is None else out * w
        return out if b is None else out + b

    return _on_host(ops, x, fn)


def gelu(ops: Any, x: Any, tanh: bool) -> Any:
    return _on_host(ops, x, _gelu_tanh if tanh else _gelu_exact)


def relu_squared(ops: Any, x: Any) -> Any:
    return _on_host(ops, x, lambda a: np.square(np.maximum(a, np.float32(0))))


def relu(ops: Any, x: Any) -> Any:
    return _on_host(ops, x, lambda a: np.maximum(a, np.float32(0)))


def xielu(ops: Any, x: Any, alpha_p: float, alpha_n: float, beta: float, eps: float) -> Any:
    ap, an, b, e = (np.float32(v) for v in (alpha_p, alpha_n, beta, eps))
    return _on_host(ops, x, lambda a: np.where(a > 0, ap * a * a + b * a,
                                               (np.expm1(np.minimum(a, e)) - a) * an + b * a))


def sigmoid_mul(ops: Any, gate: Any, x: Any) -> Any:
    g = np.asarray(ops.to_numpy(gate), dtype=np.float32)
    return _on_host(ops, x, lambda a: kernels.sigmoid_mul(g, a))


def softplus_mul(ops: Any, gate: Any, x: Any) -> Any:
    g = np.asarray(ops.to_numpy(gate), dtype=np.float32)
    return _on_host(ops, x, lambda a: kernels.softplus_mul(g, a))


def _host(ops: Any, x: Any) -> np.ndarray:
    return np.asarray(ops.to_numpy(x), dtype=np.float32)


def causal_conv1d(ops: Any, x: Any, weight: Any, state: Any, cu_seqlens: Any, silu: bool) -> tuple[Any, Any]:
    y, new_state = kernels.causal_conv1d(_host(ops, x), _host(ops, weight), _host(ops, state),
                                         np.asarray(cu_seqlens), silu)
    return ops.from_numpy(y, dtype_name(x)), ops.from_numpy(new_state, dtype_name(state))


def gated_delta_rule(ops: Any, q: Any, k: Any, v: Any, a: Any, b: Any, a_log: Any, dt_bias: Any, state: Any,
                     cu_seqlens: Any, beta_scale: float = 1.0, lower_bound: float | None = None) -> tuple[Any, Any]:
    out, new_state = kernels.gated_delta_rule(*(_host(ops, t) for t in (q, k, v, a, b, a_log, dt_bias, state)),
                                              np.asarray(cu_seqlens), beta_scale, lower_bound)
    return ops.from_numpy(out, dtype_name(v)), ops.from_numpy(new_state, "float32")


def ssd_update(ops: Any, x: Any, dt: Any, a_log: Any, b: Any, c: Any, d: Any, dt_bias: Any, state: Any,
               cu_seqlens: Any, dt_min: float, dt_max: float) -> tuple[Any, Any]:
    y, new_state = kernels.ssd_update(*(_host(ops, t) for t in (x, dt, a_log, b, c, d, dt_bias, state)),
                                      np.asarray(cu_seqlens), dt_min, dt_max)
    return ops.from_numpy(y, dtype_name(x)), ops.from_numpy(new_state, "float32")


def selective_scan(ops: Any, x: Any, dt: Any, a_log: Any, b: Any, c: Any, d: Any, dt_bias: Any, state: Any,
                   cu_seqlens: Any) -> tuple[Any, Any]:
    y, new_state = kernels.selective_scan(*(_host(ops, t) for t in (x, dt, a_log, b, c, d, dt_bias, state)),
                                          np.asarray(cu_seqlens))
    return ops.from_numpy(y, dtype_name(x)), ops.from_numpy(new_state, "float32")


def rg_lru(ops: Any, x: Any, gate_x: Any, gate_a: Any, a_param: Any, state: Any, cu_seqlens: Any,
           starts: Any) -> tuple[Any, Any]:
    y, new_state = kernels.rg_lru(*(_host(ops, t) for t in (x, gate_x, gate_a, a_param, state)),
                                  np.asarray(cu_seqlens), np.asarray(starts, dtype=bool))
    return ops.from_numpy(y, dtype_name(x)), ops.from_numpy(new_state, "float32")


def wkv7(ops: Any, r: Any, w: Any, k: Any, v: Any, a: Any, b: Any, state: Any, cu_seqlens: Any) -> tuple[Any, Any]:
    y, new_state = kernels.wkv7(*(_host(ops, t) for t in (r, w, k, v, a, b, state)), np.asarray(cu_seqlens))
    return ops.from_numpy(y, dtype_name(v)), ops.from_numpy(new_state, "float32")


def mul_scalar(ops: Any, x: Any, factor: float) -> Any:
    rounded = np.asarray(ops.to_numpy(ops.from_numpy(np.array([factor], dtype=np.float32), dtype_name(x))))[0]
    return _on_host(ops, x, lambda a: a * np.float32(rounded))


def softcap(ops: Any, x: Any, cap: float) -> Any:
    return _on_host(ops, x, lambda a: np.float32(cap) * np.tanh(a / np.float32(cap)))


def flush(ops: Any) -> None:
    return None


def clip(ops: Any, x: Any, limit: float) -> Any:
    return _on_host(ops, x, lambda a: np.clip(a, -np.float32(limit), np.float32(limit)))


def mul(ops: Any, a: Any, b: Any) -> Any:
    other = np.asarray(ops.to_numpy(b), dtype=np.float32)
    return _on_host(ops, a, lambda x: x * other)


def quantized_rows(a: np.ndarray, levels: int) -> np.ndarray:
    """:func:`ferrum.hookspec.quantize_activations` in numpy, float32 in and out."""
    scale = np.float32(levels) / np.maximum(np.abs(a).max(axis=-1, keepdims=True), np.float32(1e-5))
    return np.clip(np.round(a * scale), -levels - 1, levels) / scale


def quantize_activations(ops: Any, x: Any, levels: int) -> Any:
    return _on_host(ops, x, lambda a: quantized_rows(a, levels))


def fake_quantized(a: np.ndarray, scale: float, low: int, high: int) -> np.ndarray:
    """:func:`ferrum.hookspec.fake_quantize` in numpy, float32 in and out."""
    step = np.float32(scale)
    return np.clip(np.rint(np.asarray(a, dtype=np.float32) / step), low, high) * step


def fake_quantize(ops: Any, x: Any, scale: float, low: int, high: int) -> Any:
    return _on_host(ops, x, lambda a: fake_quantized(a, scale, low, high))


def lora_apply(ops: Any, y: Any, x: Any, a: Any, b: Any, batch: Any) -> Any:
    """Segment by segment on the host: ``y[rows] += (x[rows] @ a[slot].T) @ b[slot]``."""
    xh = np.asarray(ops.to_numpy(x), dtype=np.float32)
    ah, bh = np.asarray(ops.to_numpy(a), dtype=np.float32), np.asarray(ops.to_numpy(b), dtype=np.float32)
    delta = np.zeros((xh.shape[0], bh.shape[2]), dtype=np.float32)
    for slot, start, count in batch.segments:
        rows = batch.order[start : start + count]
        delta[rows] = (xh[rows] @ ah[slot].T) @ bh[slot]
    return _on_host(ops, y, lambda yh: yh + delta)


def split(ops: Any, x: Any, sizes: tuple[int, ...]) -> list[Any]:
    host, dtype = ops.to_numpy(x), dtype_name(x)
    return [ops.from_numpy(np.ascontiguousarray(part), dtype)
            for part in np.split(host, np.cumsum(sizes)[:-1], axis=-1)]


def compile_fn(ops: Any, fn: Any) -> Any:
    return fn


def sample(ops: Any, logits: Any, batch: Any) -> Any:
    return sample_numpy(ops.to_numpy(logits), batch)


def sample_on_device(ops: Any, logits: Any, batch: Any) -> DeviceSample:
    result = ops.sample(logits, batch)
    return DeviceSample(ops.from_numpy(result.tokens.astype(np.int32), None), lambda: result)


def quantized_upload(ops: Any, name: str, weight: Any, dtype: str, role: str) -> HostQuantized | Dequantized:
    return upload(ops, name, weight, dtype)


def quantized_linear(ops: Any, x: Any, weight: HostQuantized | Dequantized, bias: Any) -> Any:
    return ops.linear(x, weight.dense(ops), bias)


def quantized_embedding(ops: Any, weight: HostQuantized | Dequantized, ids: Any) -> Any:
    return weight.rows(ops, ids)


moe_route = moe_reference.moe_route
upload_experts = moe_reference.upload_experts
moe_experts = moe_reference.moe_experts
