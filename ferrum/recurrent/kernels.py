"""The recurrent mixers' ops on host float32 arrays: what ``ferrum.reference_ops`` means by them, and the numpy
backend's own (vectorised over channels and heads, one step per token).

Each works on a flattened varlen batch: segment ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` and carries
row ``b`` of the state in and out.
"""

from __future__ import annotations

import numpy as np


def causal_conv1d(x: np.ndarray, weight: np.ndarray, state: np.ndarray, cu_seqlens: np.ndarray,
                  silu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Depthwise causal convolution ``y[t, c] = sum_j window[t + j, c] * weight[c, j]`` over each segment's inputs
    after its state's ``K - 1`` earlier ones (SiLU on the result where ``silu``); the new state is each window's
    last ``K - 1`` inputs, ``[B, C, K - 1]``."""
    x = np.asarray(x, dtype=np.float32)
    w = np.asarray(weight, dtype=np.float32).T  # [K, C]
    taps = w.shape[0]
    y = np.empty_like(x)
    new_state = np.empty_like(np.asarray(state, dtype=np.float32))
    for b in range(len(cu_seqlens) - 1):
        lo, hi = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        window = np.concatenate([np.asarray(state[b], dtype=np.float32).T, x[lo:hi]])  # [K - 1 + n, C]
        out = y[lo:hi]
        out[:] = window[:hi - lo] * w[0]
        for j in range(1, taps):
            out += window[j:j + hi - lo] * w[j]
        new_state[b] = window[hi - lo:].T
    if silu:
        y = y / (1.0 + np.exp(-y))
    return y, new_state


def gated_delta_rule(q: np.ndarray, k: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray,
                     a_log: np.ndarray, dt_bias: np.ndarray, state: np.ndarray, cu_seqlens: np.ndarray,
                     beta_scale: float = 1.0, lower_bound: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gated DeltaNet's recurrence (``ferrum.hookspec.gated_delta_rule``): ``q, k [T, Hk, Dk]``, ``v [T, Hv, Dv]``,
    ``a, b [T, Hv]`` (or, Kimi Delta Attention, ``a [T, Hv, Dk]`` with ``dt_bias [Hv, Dk]``: a decay per key
    channel), ``state [B, Hv, Dk, Dv]``; the log-decay bounded by ``lower_bound`` where set (Ling 3's safe gate);
    returns ``(out [T, Hv, Dv], new_state)`` in float32."""
    q, k, v = (np.asarray(t, dtype=np.float32) for t in (q, k, v))
    heads = v.shape[1]
    group = heads // q.shape[1]
    q = q * (1.0 / np.sqrt((q * q).sum(-1, keepdims=True) + np.float32(1e-6))) / np.float32(np.sqrt(q.shape[-1]))
    k = k * (1.0 / np.sqrt((k * k).sum(-1, keepdims=True) + np.float32(1e-6)))
    if group > 1:  # each q/k head serves ``group`` consecutive value heads
        q, k = np.repeat(q, group, axis=1), np.repeat(k, group, axis=1)
    x = np.asarray(a, dtype=np.float32) + np.asarray(dt_bias, dtype=np.float32)
    rate = np.exp(np.asarray(a_log, dtype=np.float32))
    rate = rate[:, None] if x.ndim == 3 else rate  # a rate per head, over its key channels
    if lower_bound is None:
        decay = np.exp(-rate * np.logaddexp(np.float32(0), x))  # exp(g): [T, Hv], or [T, Hv, Dk] per key channel
    else:
        with np.errstate(over="ignore"):  # exp(-rate * x) past float32's range: a sigmoid of 0, as it should be
            decay = np.exp(np.float32(lower_bound) / (1.0 + np.exp(-rate * x)))
    decay = decay[..., None] if decay.ndim == 3 else decay[..., None, None]  # over the state's [Dk, Dv]
    beta = np.float32(beta_scale) / (1.0 + np.exp(-np.asarray(b, dtype=np.float32)))
    out = np.empty_like(v)
    new_state = np.array(state, dtype=np.float32)
    for s in range(len(cu_seqlens) - 1):
        S = new_state[s]  # [Hv, Dk, Dv], updated in place
        for t in range(int(cu_seqlens[s]), int(cu_seqlens[s + 1])):
            S *= decay[t]
            kt = k[t][:, :, None]
            delta = (v[t] - (S * kt).sum(1)) * beta[t][:, None]
            S += kt * delta[:, None, :]
            out[t] = np.einsum("hk,hkv->hv", q[t], S)
    return out, new_state


def ssd_update(x: np.ndarray, dt: np.ndarray, a_log: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray,
               dt_bias: np.ndarray, state: np.ndarray, cu_seqlens: np.ndarray, dt_min: float,
               dt_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Mamba-2's selective state-space recurrence (``ferrum.hookspec.ssd_update``): ``x [T, H, P]``, ``dt [T, H]``,
    ``b, c [T, G, N]``, ``state [B, H, P, N]``; returns ``(y [T, H, P], new_state)`` in float32."""
    x = np.asarray(x, dtype=np.float32)
    heads, groups = x.shape[1], np.shape(b)[1]
    b, c = (np.repeat(np.asarray(t, dtype=np.float32), heads // groups, axis=1) for t in (b, c))  # [T, H, N]
    step = np.logaddexp(np.float32(0), np.asarray(dt, dtype=np.float32) + np.asarray(dt_bias, dtype=np.float32))
    step = np.clip(step, np.float32(dt_min), np.float32(dt_max)).astype(np.float32)
    decay = np.exp(step * -np.exp(np.asarray(a_log, dtype=np.float32)))  # [T, H]
    skip = x * np.asarray(d, dtype=np.float32)[:, None]
    y = np.empty_like(x)
    new_state = np.array(state, dtype=np.float32)
    for s in range(len(cu_seqlens) - 1):
        S = new_state[s]  # [H, P, N], updated in place
        for t in range(int(cu_seqlens[s]), int(cu_seqlens[s + 1])):
            S *= decay[t][:, None, None]
            S += (step[t][:, None] * x[t])[:, :, None] * b[t][:, None, :]
            y[t] = np.einsum("hpn,hn->hp", S, c[t])
    return y + skip, new_state


def selective_scan(x: np.ndarray, dt: np.ndarray, a_log: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray,
                   dt_bias: np.ndarray, state: np.ndarray, cu_seqlens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mamba-1's selective scan (``ferrum.hookspec.selective_scan``): ``x, dt [T, D]``, ``b, c [T, N]``,
    ``a_log [D, N]``, ``state [B, D, N]``; returns ``(y [T, D], new_state)`` in float32."""
    x = np.asarray(x, dtype=np.float32)
    step = np.logaddexp(np.float32(0), np.asarray(dt, dtype=np.float32) + np.asarray(dt_bias, dtype=np.float32))
    a = -np.exp(np.asarray(a_log, dtype=np.float32))  # [D, N]
    b, c = (np.asarray(t, dtype=np.float32) for t in (b, c))
    y = np.empty_like(x)
    new_state = np.array(state, dtype=np.float32)
    for s in range(len(cu_seqlens) - 1):
        S = new_state[s]  # [D, N], updated in place
        for t in range(int(cu_seqlens[s]), int(cu_seqlens[s + 1])):
            S *= np.exp(step[t][:, None] * a)
            S += (step[t] * x[t])[:, None] * b[t]
            y[t] = S @ c[t]
    return y + x * np.asarray(d, dtype=np.float32), new_state


def softplus_mul(gate: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x * softplus(gate)``, ``softplus(g) = log(1 + exp(g))``."""
    return np.asarray(x, dtype=np.float32) * np.logaddexp(np.float32(0), np.asarray(gate, dtype=np.float32))


def rg_lru(x: np.ndarray, gate_x: np.ndarray, gate_a: np.ndarray, a_param: np.ndarray, state: np.ndarray,
           cu_seqlens: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Griffin's RG-LRU (``ferrum.hookspec.rg_lru``): ``x, gate_x, gate_a [T, W]``, ``a_param [W]``, ``state
    [B, W]``, ``starts [B]``; returns ``(y [T, W], new_state)`` in float32."""
    x, gate_x, gate_a = (np.asarray(t, dtype=np.float32) for t in (x, gate_x, gate_a))
    log_a = np.float32(-8.0) / (1.0 + np.exp(-gate_a)) * np.logaddexp(np.float32(0), np.asarray(a_param, np.float32))
    a = np.exp(log_a)
    scaled = np.sqrt(1.0 - np.exp(2.0 * log_a)) * x / (1.0 + np.exp(-gate_x))  # sqrt(1 - a^2) * sigmoid(gx) * x
    y = np.empty_like(x)
    new_state = np.array(state, dtype=np.float32)
    for s in range(len(cu_seqlens) - 1):
        lo, hi = int(cu_seqlens[s]), int(cu_seqlens[s + 1])
        h = new_state[s]  # [W], updated in place
        for t in range(lo, hi):
            if t == lo and starts[s]:  # the sequence's first token: no past, the input unnormalized
                h[:] = x[t] / (1.0 + np.exp(-gate_x[t]))
            else:
                h[:] = a[t] * h + scaled[t]
            y[t] = h
    return y, new_state


def wkv7(r: np.ndarray, w: np.ndarray, k: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray,
         state: np.ndarray, cu_seqlens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RWKV-7's generalized delta rule (``ferrum.hookspec.wkv7``): ``r, w, k, v, a, b [T, H, D]`` (``w`` the
    log-decay), ``state [B, H, Dk, Dv]``; returns ``(y [T, H, Dv], new_state)`` in float32."""
    r, k, v, a, b = (np.asarray(t, dtype=np.float32) for t in (r, k, v, a, b))
    decay = np.exp(np.asarray(w, dtype=np.float32))[..., None]  # over the state's Dv
    y = np.empty_like(v)
    new_state = np.array(state, dtype=np.float32)
    for s in range(len(cu_seqlens) - 1):
        S = new_state[s]  # [H, Dk, Dv], updated in place
        for t in range(int(cu_seqlens[s]), int(cu_seqlens[s + 1])):
            removed = np.einsum("hk,hkv->hv", a[t], S)  # the state's read at a, before the decay
            S *= decay[t]
            S += k[t][:, :, None] * v[t][:, None, :] + b[t][:, :, None] * removed[:, None, :]
            y[t] = np.einsum("hk,hkv->hv", r[t], S)
    return y, new_state


def sigmoid_mul(gate: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(gate)``."""
    return np.asarray(x, dtype=np.float32) / (1.0 + np.exp(-np.asarray(gate, dtype=np.float32)))
