"""The recurrent ops written once for numpy-like array frameworks (MLX, torch, JAX): the backends' native
``causal_conv1d``, ``gated_delta_rule``, ``selective_scan``, ``rg_lru`` and ``wkv7`` without a host round trip.

The host reads only ``cu_seqlens`` (already a host array) and turns it into index arrays; everything else is
array ops on the device, so MLX's graph stays lazy. Segments are padded to a ``[B, L]`` batch whose padding
neither decays nor writes the state (``g = 0``, ``beta = 0``, ``k = 0``; the selective scan's step 0; the RG-LRU's
decay 1 and input 0; RWKV-7's ``w = 0``, ``k = 0``, ``b = 0``). The selective scan and the RG-LRU run one vectorised
step per token. The delta rules (Gated DeltaNet's, RWKV-7's) run one vectorised step per token for short segments (a
decode step is one), or, from ``CHUNK`` tokens on, in chunks: within a chunk the WY form (the corrections or reads
``u`` solve a unit lower-triangular system, inverted by forward substitution, which stays stable where keys nearly
repeat; a doubling inverse loses them), across chunks one state update each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

#: Tokens per chunk of the chunked delta rule, and the segment length from which it is used: on CPUs (torch,
#: MLX) 16 runs a 512-token prompt as fast as 32 and 1.3-1.4x faster than 64, a 16-token one 1.7-1.9x faster than
#: token steps.
CHUNK = 16
#: The most numbers the chunked form's decays may hold at once (``[B, H, chunks, C, C, 1 or Dk]``, float32: 64 MB):
#: a longer batch runs that many chunks at a time, the state carried between. Kimi Delta Attention's decay per key
#: channel would otherwise hold ~0.5 GB per layer for a 2k-token prompt of Kimi-Linear-48B (32 heads of 128).
DECAY_BUDGET = 1 << 24
#: The blocks of RWKV-7's chunks whose pairs of tokens decay one by one (:func:`_decayed_pairs`): for a 512-token
#: prompt of 4 heads of 64, chunks of 16 in blocks of 4 ran 1.2x (torch) and 1.3x (MLX) faster than token steps on
#: the CPU; blocks of 8 or 16 and chunks of 32 or 64 ran slower.
WKV7_SUB = 4


def python_scan(fn: Callable, carry: Any, xs: tuple) -> tuple[Any, Any]:
    """``lax.scan``'s contract by a Python loop over the leading axis: ``(carry, [ys...])``."""
    ys = []
    for i in range(xs[0].shape[0]):
        carry, y = fn(carry, tuple(x[i] for x in xs))
        ys.append(y)
    return carry, ys


@dataclass(frozen=True)
class Framework:
    """What differs between the frameworks: ``xp`` (their numpy-like namespace: einsum, exp, cumsum, ...),
    uploading a host array, casting, the loop over time (``scan`` returns the outputs stacked or as a list,
    ``stack`` makes them one array either way), ``jit(fn, static_argnames)`` where device parts compile,
    ``bucket(n)``, the size ``n`` tokens or sequences are padded up to where each new shape costs a compile, and
    ``softmax(x)`` over the last axis (:mod:`ferrum.arch.alibi` needs it; the recurrent ops do not), and ``take(a,
    index)``, ``a[index]`` along the first axis, where the framework has a faster way (torch's ``index_select``
    gathers a paged pool's keys ~4x faster on the CPU than its indexing)."""

    xp: Any
    put: Callable[[np.ndarray], Any]
    astype: Callable[[Any, Any], Any]
    scan: Callable = python_scan
    jit: Callable | None = None
    bucket: Callable[[int], int] | None = None
    softmax: Callable[[Any], Any] | None = None
    take: Callable[[Any, Any], Any] | None = None

    def stack(self, ys: Any) -> Any:
        return self.xp.stack(ys) if isinstance(ys, list) else ys

    def rows(self, a: Any, index: Any) -> Any:
        """``a[index]``: the rows of ``a`` that the integer array ``index`` (any shape) names."""
        return a[index] if self.take is None else self.take(a, index)


@functools.cache
def _device_part(fw: Framework, fn: Callable, static: str | tuple[str, ...]) -> Callable:
    bound = functools.partial(fn, fw)
    return bound if fw.jit is None else fw.jit(bound, static_argnames=static)


# ----------------------------------------------------------------------------------------------------------
# Host plans
# ----------------------------------------------------------------------------------------------------------


def bucketed(fw: Framework, cu_seqlens: Any, rows: list, state: list) -> tuple[np.ndarray, list, list]:
    """Where ``fw.bucket`` is set, the batch padded to bucketed sizes: zero token rows (a decode batch: more
    one-token segments; else one more segment holding them) and zero state rows for segments of no tokens."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if fw.bucket is None:
        return cu, rows, state
    tokens, lengths = int(cu[-1]), list(np.diff(cu))
    if lengths and all(n == 1 for n in lengths):
        lengths += [1] * (fw.bucket(tokens) - tokens)
    else:
        extra = fw.bucket(tokens) - tokens
        lengths += [extra] * (extra > 0)
        lengths += [0] * (fw.bucket(len(lengths)) - len(lengths))
    xp, added = fw.xp, (sum(lengths) - tokens, len(lengths) - len(cu) + 1)

    def pad(t: Any, n: int) -> Any:
        return xp.concatenate([t, xp.zeros((n, *t.shape[1:]), dtype=t.dtype)]) if n else t

    padded_cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return padded_cu, [pad(t, added[0]) for t in rows], [pad(t, added[1]) for t in state]


@dataclass(frozen=True)
class ConvPlan:
    """Rows of ``concat(state rows, x)`` that each output's taps read, and each segment's new state; ``None``
    when every segment is one token (each window is its state then its row)."""

    taps: np.ndarray | None  # [T, K]
    state: np.ndarray | None  # [B, K - 1]


def conv_plan(cu_seqlens: Any, taps: int) -> ConvPlan:
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    batch, keep = len(cu) - 1, taps - 1
    lengths = np.diff(cu)
    if batch and (lengths == 1).all():
        return ConvPlan(None, None)
    # window b: its state's rows (b * keep ...), then its inputs (offset by all the state rows)
    windows = [np.concatenate([b * keep + np.arange(keep), batch * keep + np.arange(cu[b], cu[b + 1])])
               for b in range(batch)]
    rows = [w[np.arange(n)[:, None] + np.arange(taps)] for w, n in zip(windows, lengths)]
    tap_rows = np.concatenate(rows) if rows else np.zeros((0, taps), np.int64)
    state_rows = np.stack([w[len(w) - keep:] for w in windows]) if batch else np.zeros((0, keep), np.int64)
    return ConvPlan(tap_rows.astype(np.int32), state_rows.astype(np.int32))


@dataclass(frozen=True)
class DeltaPlan:
    """A varlen batch as ``[B, L]``: the token each slot reads (``gather``, 0 for padding), which slots are real
    (``valid``) and the slot each token's output is in (``scatter``); all ``None`` when every segment is one
    token (the rows already are the batch)."""

    gather: np.ndarray | None  # [B, L]
    valid: np.ndarray | None  # [B, L] float32
    scatter: np.ndarray | None  # [T]
    chunked: bool


def delta_plan(cu_seqlens: Any, chunk: int = CHUNK, bucket: Callable[[int], int] = int) -> DeltaPlan:
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    lengths = np.diff(cu)
    if len(lengths) and (lengths == 1).all():
        return DeltaPlan(None, None, None, False)
    longest = int(lengths.max(initial=0))
    chunked = bool(chunk) and longest >= chunk  # chunk 0: never
    width = bucket(-(-longest // chunk)) * chunk if chunked else bucket(max(longest, 1))
    slot = np.arange(width)
    valid = slot[None, :] < lengths[:, None]
    gather = np.where(valid, cu[:-1, None] + slot[None, :], 0)
    scatter = np.concatenate([b * width + np.arange(n) for b, n in enumerate(lengths)] + [np.zeros(0, np.int64)])
    return DeltaPlan(gather.astype(np.int32), valid.astype(np.float32), scatter.astype(np.int32), chunked)


# ----------------------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------------------


def causal_conv1d(fw: Framework, x: Any, weight: Any, state: Any, cu_seqlens: Any, silu: bool) -> tuple[Any, Any]:
    """``ferrum.hookspec.causal_conv1d``: every output row's ``K`` taps gathered at once, summed in float32."""
    tokens, batch = x.shape[0], state.shape[0]
    cu, (x,), (state,) = bucketed(fw, cu_seqlens, [x], [state])
    plan = conv_plan(cu, weight.shape[1])
    conv = _device_part(fw, convolve, "silu")
    y, new_state = conv(x, weight, state, *(None if i is None else fw.put(i) for i in (plan.taps, plan.state)),
                        silu=silu)
    return (y, new_state) if fw.bucket is None else (y[:tokens], new_state[:batch])


def convolve(fw: Framework, x: Any, weight: Any, state: Any, taps: Any, state_rows: Any,
             silu: bool) -> tuple[Any, Any]:
    """The device part of :func:`causal_conv1d` for a :class:`ConvPlan`'s uploaded arrays."""
    xp, f32 = fw.xp, fw.xp.float32
    if taps is None:  # one token each: window [B, C, K]
        window = xp.concatenate([fw.astype(state, f32), fw.astype(x, f32)[..., None]], axis=-1)
        y = (window * fw.astype(weight, f32)).sum(-1)
        new_state = fw.astype(window[..., 1:], state.dtype)
    else:
        rows = fw.astype(xp.swapaxes(state, 1, 2), f32).reshape(-1, x.shape[1])  # [B * (K - 1), C]
        source = xp.concatenate([rows, fw.astype(x, f32)])
        y = (source[taps] * xp.swapaxes(fw.astype(weight, f32), 0, 1)).sum(1)  # [T, K, C] x [K, C]
        new_state = fw.astype(xp.swapaxes(source[state_rows], 1, 2), state.dtype)
    if silu:
        y = y / (1.0 + xp.exp(-y))
    return fw.astype(y, x.dtype), new_state


def _l2_normed(xp: Any, x: Any) -> Any:
    return x / xp.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def _per_value_head(xp: Any, x: Any, heads: int) -> Any:
    """``[..., Hk, D] -> [..., Hv, D]``: q/k head ``i`` serves value heads ``i * Hv / Hk`` on."""
    *lead, hk, d = x.shape
    if hk == heads:
        return x
    return xp.broadcast_to(x[..., None, :], (*lead, hk, heads // hk, d)).reshape(*lead, heads, d)


def gated_delta_rule(fw: Framework, q: Any, k: Any, v: Any, a: Any, b: Any, a_log: Any, dt_bias: Any, state: Any,
                     cu_seqlens: Any, beta_scale: float = 1.0, lower_bound: float | None = None,
                     chunk: int = CHUNK) -> tuple[Any, Any]:
    """``ferrum.hookspec.gated_delta_rule`` (its per-key-channel gate and bounded log-decay too); returns ``(out in
    v's dtype, new float32 state)``."""
    tokens, batch = v.shape[0], state.shape[0]
    cu, (q, k, v, a, b), (state,) = bucketed(fw, cu_seqlens, [q, k, v, a, b], [state])
    plan = delta_plan(cu, chunk, fw.bucket or int)
    gather, scatter, valid = (None if i is None else fw.put(i) for i in (plan.gather, plan.scatter, plan.valid))
    rule = _device_part(fw, delta_rule, ("chunk", "beta_scale", "lower_bound"))
    out, new_state = rule(q, k, v, a, b, a_log, dt_bias, state, gather, scatter, valid,
                          chunk=chunk if plan.chunked else 0, beta_scale=float(beta_scale),
                          lower_bound=None if lower_bound is None else float(lower_bound))
    return (out, new_state) if fw.bucket is None else (out[:tokens], new_state[:batch])


def delta_rule(fw: Framework, q: Any, k: Any, v: Any, a: Any, b: Any, a_log: Any, dt_bias: Any, state: Any,
               gather: Any, scatter: Any, valid: Any, chunk: int, beta_scale: float = 1.0,
               lower_bound: float | None = None) -> tuple[Any, Any]:
    """The device part of :func:`gated_delta_rule` for a :class:`DeltaPlan`'s uploaded arrays (pure: JAX jits
    it with ``chunk``, ``beta_scale`` and ``lower_bound`` static); ``chunk`` 0 steps token by token. The log-decay
    ``g`` carries a key-channel axis, ``[..., H, 1]`` (one per head) or ``[..., H, Dk]`` (Kimi Delta Attention's, per
    channel)."""
    xp, f32 = fw.xp, fw.xp.float32
    heads, dk = v.shape[1], q.shape[2]
    qf = _per_value_head(xp, _l2_normed(xp, fw.astype(q, f32)) * dk ** -0.5, heads)
    kf = _per_value_head(xp, _l2_normed(xp, fw.astype(k, f32)), heads)
    vf = fw.astype(v, f32)
    x = fw.astype(a, f32) + fw.astype(dt_bias, f32)
    x = x if x.ndim == 3 else x[..., None]  # [T, H, Dk] per key channel, or [T, H, 1]
    rate = xp.exp(fw.astype(a_log, f32))[:, None]
    if lower_bound is None:
        g = -rate * xp.logaddexp(x, xp.zeros_like(x))  # log of the decay
    else:  # Ling 3's safe gate: bounded below by lower_bound
        g = lower_bound / (1.0 + xp.exp(-rate * x))
    beta = beta_scale / (1.0 + xp.exp(-fw.astype(b, f32)))
    state = fw.astype(state, f32)
    if gather is None:  # every segment one token: one step over the batch
        out, new_state = _step(xp, state, (qf, kf, vf, g, beta))
        return fw.astype(out, v.dtype), new_state
    qf, kf, vf, g, beta = (t[gather] for t in (qf, kf, vf, g, beta))  # [B, L, ...]
    kf, g, beta = kf * valid[..., None, None], g * valid[..., None, None], beta * valid[..., None]
    if chunk:
        out, new_state = _chunked(fw, _chunks, state, (qf, kf, vf, g, beta), chunk, g.shape[-1])
    else:
        new_state, outs = fw.scan(lambda s, xs: _step(xp, s, xs)[::-1], state,
                                  tuple(xp.swapaxes(t, 0, 1) for t in (qf, kf, vf, g, beta)))
        out = xp.swapaxes(fw.stack(outs), 0, 1)
    out = out.reshape(-1, *out.shape[2:])[scatter]
    return fw.astype(out, v.dtype), new_state


def _row_times(x: Any, state: Any) -> Any:
    """``[B, H, D] x [B, H, D, E] -> [B, H, E]`` as a batched matmul (torch's CPU einsum of this is 100x slower)."""
    return (x[..., None, :] @ state)[..., 0, :]


def _step(xp: Any, state: Any, xs: tuple) -> tuple[Any, Any]:
    """One token of every sequence: ``q, k [B, H, Dk]``, ``v [B, H, Dv]``, ``g [B, H, 1 or Dk]``, ``beta [B, H]``."""
    q, k, v, g, beta = xs
    state = state * xp.exp(g)[..., None]
    delta = (v - _row_times(k, state)) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return _row_times(q, state), state


def _chunked(fw: Framework, chunks: Callable, state: Any, xs: tuple, chunk: int, width: int) -> tuple[Any, Any]:
    """``chunks(fw, state, *xs, chunk)`` over ``[B, L]`` tokens, as many chunks at a time as :data:`DECAY_BUDGET`
    allows for decays of ``width`` numbers per pair of tokens (1, Dk or more)."""
    batch, length, heads = xs[0].shape[:3]
    step = chunk * max(1, DECAY_BUDGET // (batch * heads * chunk * chunk * width))
    outs = []
    for start in range(0, length, step):
        out, state = chunks(fw, state, *(t[:, start:start + step] for t in xs), chunk)
        outs.append(out)
    return (outs[0] if len(outs) == 1 else fw.xp.concatenate(outs, axis=1)), state


def _unit_lower_inverse(fw: Framework, system: Any, chunk: int) -> Any:
    """``(I + A)^-1`` of a strictly lower-triangular ``A [..., C, C]`` by forward substitution on ``I``, column by
    column (``[C, C]`` rows: cheaper than on the right-hand sides; stable where keys nearly repeat, which a doubling
    inverse is not)."""
    inverse = fw.put(np.eye(chunk, dtype=np.float32))
    for j in range(chunk - 1):
        inverse = inverse - system[..., :, j:j + 1] * inverse[..., j:j + 1, :]
    return inverse


def _chunks(fw: Framework, state: Any, q: Any, k: Any, v: Any, g: Any, beta: Any, chunk: int) -> tuple[Any, Any]:
    """The delta rule over ``[B, N * C]`` tokens, chunk by chunk: with ``G`` the running sum of ``g`` in a chunk
    and ``D[i, j] = exp(G_i - G_j)`` (``j <= i``), the state after token ``i`` is ``exp(G_i) S + sum_j D[i, j]
    k_j u_j``, where ``(I + A) u = beta (v - exp(G) k S)``, ``A[i, j] = beta_i D[i, j] k_i . k_j`` (``j < i``).
    Heads go before time, so every product is a batched matmul over ``[B, H, N]``. A decay per key channel (Kimi
    Delta Attention) makes ``D`` one per channel, inside the products: ``A[i, j] = beta_i sum_c D[i, j, c] k_ic
    k_jc``, held as ``[B, H, N, C, C, Dk]`` (each exponent ``G_i - G_j <= 0``, so none overflows, as transformers'
    chunked form holds it)."""
    xp = fw.xp
    batch, length, heads, _ = k.shape
    n = length // chunk
    q, k, v, g = (xp.swapaxes(t, 1, 2).reshape(batch, heads, n, chunk, -1) for t in (q, k, v, g))
    beta = xp.swapaxes(beta, 1, 2).reshape(batch, heads, n, chunk)
    cum = xp.cumsum(g, axis=-2)  # G [B, H, N, C, 1 or Dk]
    lower = np.tril(np.ones((chunk, chunk), np.float32))
    within, strict = fw.put(lower), fw.put(lower - np.eye(chunk, dtype=np.float32))
    mask = within[..., None]
    decay = xp.exp((cum[..., :, None, :] - cum[..., None, :, :]) * mask) * mask  # D [B, H, N, C, C, 1 or Dk]
    k_t = xp.swapaxes(k, -1, -2)
    if decay.shape[-1] == 1:  # one decay per head: D outside the products
        keys, attend = (k @ k_t) * decay[..., 0], (q @ k_t) * decay[..., 0]
    else:
        keys = (k[..., :, None, :] * k[..., None, :, :] * decay).sum(-1)
        attend = (q[..., :, None, :] * k[..., None, :, :] * decay).sum(-1)
    inverse = _unit_lower_inverse(fw, keys * beta[..., None] * strict, chunk)  # (I + A)^-1
    u0 = inverse @ (v * beta[..., None])  # u = u0 - w S
    w = inverse @ (k * xp.exp(cum) * beta[..., None])
    q_decayed = q * xp.exp(cum)
    last = cum[..., -1:, :]  # [B, H, N, 1, 1 or Dk]
    k_to_end_t = xp.swapaxes(k * xp.exp(last - cum), -1, -2)

    def one_chunk(s: Any, xs: tuple) -> tuple[Any, Any]:
        u0_n, w_n, attend_n, q_n, k_n_t, last_n = xs
        u = u0_n - w_n @ s
        out = q_n @ s + attend_n @ u
        return s * xp.exp(xp.swapaxes(last_n, -1, -2)) + k_n_t @ u, out

    parts = (u0, w, attend, q_decayed, k_to_end_t, last)
    state, outs = fw.scan(one_chunk, state, tuple(xp.moveaxis(t, 2, 0) for t in parts))
    out = xp.moveaxis(fw.stack(outs), 0, 2).reshape(batch, heads, length, -1)  # [B, H, L, Dv]
    return xp.swapaxes(out, 1, 2), state


def wkv7(fw: Framework, r: Any, w: Any, k: Any, v: Any, a: Any, b: Any, state: Any, cu_seqlens: Any,
         chunk: int = CHUNK) -> tuple[Any, Any]:
    """``ferrum.hookspec.wkv7``; returns ``(y in v's dtype, new float32 state)``."""
    tokens, batch = v.shape[0], state.shape[0]
    cu, (r, w, k, v, a, b), (state,) = bucketed(fw, cu_seqlens, [r, w, k, v, a, b], [state])
    plan = delta_plan(cu, chunk, fw.bucket or int)
    gather, scatter, valid = (None if i is None else fw.put(i) for i in (plan.gather, plan.scatter, plan.valid))
    rule = _device_part(fw, scan_wkv7, "chunk")
    y, new_state = rule(r, w, k, v, a, b, state, gather, scatter, valid, chunk=chunk if plan.chunked else 0)
    return (y, new_state) if fw.bucket is None else (y[:tokens], new_state[:batch])


def scan_wkv7(fw: Framework, r: Any, w: Any, k: Any, v: Any, a: Any, b: Any, state: Any, gather: Any, scatter: Any,
              valid: Any, chunk: int) -> tuple[Any, Any]:
    """The device part of :func:`wkv7` for a :class:`DeltaPlan`'s uploaded arrays (pure: JAX jits it with ``chunk``
    static); ``chunk`` 0 steps token by token. A padding slot neither decays nor writes (``w, k, b = 0``)."""
    xp, f32 = fw.xp, fw.xp.float32
    xs = tuple(fw.astype(t, f32) for t in (r, w, k, v, a, b))
    state = fw.astype(state, f32)
    if gather is None:  # every segment one token: one step over the batch
        y, new_state = _wkv7_step(xp, state, xs)
        return fw.astype(y, v.dtype), new_state
    r_, w_, k_, v_, a_, b_ = (t[gather] for t in xs)  # [B, L, H, D]
    mask = valid[..., None, None]
    xs = (r_, w_ * mask, k_ * mask, v_, a_, b_ * mask)
    if chunk:
        y, new_state = _chunked(fw, _wkv7_chunks, state, xs, chunk, w_.shape[-1])  # ~Dk numbers a pair
    else:
        new_state, ys = fw.scan(lambda s, x: _wkv7_step(xp, s, x)[::-1], state, tuple(xp.swapaxes(t, 0, 1)
                                                                                   for t in xs))
        y = xp.swapaxes(fw.stack(ys), 0, 1)
    y = y.reshape(-1, *y.shape[2:])[scatter]
    return fw.astype(y, v.dtype), new_state


def _wkv7_step(xp: Any, state: Any, xs: tuple) -> tuple[Any, Any]:
    """One token of every sequence: ``r, w, k, v, a, b [B, H, D]``, ``state [B, H, Dk, Dv]``."""
    r, w, k, v, a, b = xs
    read = _row_times(a, state)  # a S, before the decay
    state = state * xp.exp(w)[..., None] + k[..., None] * v[..., None, :] + b[..., None] * read[..., None, :]
    return _row_times(r, state), state


def _decayed_pairs(fw: Framework, x: Any, reach: Any, cum: Any, ys: tuple, mask: np.ndarray, sub: int) -> list:
    """For each ``y`` of ``ys``, ``P[i, j] = sum_c x_ic exp(reach_ic - cum_jc) y_jc`` where ``mask[i, j]`` (``[C,
    C]``, lower-triangular), all ``[..., C, Dk]``, ``reach_i <= cum_j`` wherever masked in and ``cum`` falling: exactly,
    yet mostly as matmuls. Within blocks of ``sub`` tokens each pair's decay is its own (``[..., C / sub, sub, sub,
    Dk]``); between blocks it splits at the end ``E_q`` of ``j``'s block, ``exp(reach_i - E_q) exp(E_q - cum_j)``,
    both exponents at most 0: no overflow whatever the decays, an underflow only where the product is below float32's
    range (a split at one point per chunk would overflow for strong decays)."""
    xp = fw.xp
    *lead, chunk, dk = x.shape
    blocks = chunk // sub

    def blocked(t: Any) -> Any:
        return t.reshape(*lead, blocks, sub, dk)

    ends = cum[..., sub - 1::sub, :]  # E [..., blocks, Dk]
    block = np.arange(chunk) // sub
    earlier = fw.put((np.arange(blocks)[None, :] < block[:, None]).astype(np.float32))[..., None]  # [C, blocks, 1]
    left = x[..., :, None, :] * xp.exp((reach[..., :, None, :] - ends[..., None, :, :]) * earlier) * earlier
    left = xp.swapaxes(left, -2, -3)  # [..., blocks, C, Dk]
    right = xp.exp(ends[..., :, None, :] - blocked(cum))  # [..., blocks, sub, Dk]
    inner = fw.put(mask[:sub, :sub])[..., None]
    decay = xp.exp((blocked(reach)[..., :, None, :] - blocked(cum)[..., None, :, :]) * inner) * inner
    within = blocked(x)[..., :, None, :] * decay  # [..., blocks, sub, sub, Dk]
    spread = fw.put(np.eye(blocks, dtype=np.float32)[:, None, :, None])  # a block's pairs onto the diagonal
    out = []
    for y in ys:
        between = xp.swapaxes(left @ xp.swapaxes(blocked(y) * right, -1, -2), -2, -3)  # [..., C, blocks, sub]
        diagonal = (within * blocked(y)[..., None, :, :]).sum(-1)[..., :, :, None, :] * spread
        out.append((between + diagonal.reshape(*lead, chunk, blocks, sub)).reshape(*lead, chunk, chunk))
    return out


def _wkv7_chunks(fw: Framework, state: Any, r: Any, w: Any, k: Any, v: Any, a: Any, b: Any,
                 chunk: int) -> tuple[Any, Any]:
    """RWKV-7's rule over ``[B, N * C]`` tokens, chunk by chunk. With ``G_i`` the running sum of ``w`` through token
    ``i`` of a chunk and ``D(x, j) = exp(x - G_j)`` per key channel, the state after token ``i`` is ``exp(G_i) S +
    sum_{j <= i} D(G_i, j) (k_j v_j + b_j u_j)``, where ``u_j = a_j S_{j-1}`` (the reads) solve ``(I - A) u =
    exp(G_{j-1}) a_j S + sum_{i < j} (a_j D(G_{j-1}, i) k_i) v_i``, ``A[j, i] = a_j D(G_{j-1}, i) b_i``: so ``u = W S +
    u0``, each output ``y = R S + y0`` and the chunk's last state ``M S + c``, all but ``M S`` (one matmul per chunk)
    computed for every chunk at once; the decayed products by :func:`_decayed_pairs`."""
    xp = fw.xp
    batch, length, heads, dk = k.shape
    n = length // chunk
    r, w, k, v, a, b = (xp.swapaxes(t, 1, 2).reshape(batch, heads, n, chunk, -1) for t in (r, w, k, v, a, b))
    cum = xp.cumsum(w, axis=-2)  # G [B, H, N, C, Dk]
    before = cum - w  # G_{j-1}
    lower = np.tril(np.ones((chunk, chunk), np.float32))
    sub = WKV7_SUB if chunk % WKV7_SUB == 0 else chunk
    reads_b, reads_k = _decayed_pairs(fw, a, before, cum, (b, k), lower - np.eye(chunk, dtype=np.float32), sub)
    to_b, to_k = _decayed_pairs(fw, r, cum, cum, (b, k), lower, sub)
    inverse = _unit_lower_inverse(fw, -reads_b, chunk)  # (I - A)^-1
    reads = inverse @ (a * xp.exp(before))  # W
    reads0 = inverse @ (reads_k @ v)  # u0
    outs = r * xp.exp(cum) + to_b @ reads  # R
    outs0 = to_k @ v + to_b @ reads0  # y0
    last = cum[..., -1:, :]  # [B, H, N, 1, Dk]
    to_end = xp.exp(last - cum)
    b_end_t = xp.swapaxes(b * to_end, -1, -2)
    carry = b_end_t @ reads + fw.put(np.eye(dk, dtype=np.float32)) * xp.swapaxes(xp.exp(last), -1, -2)  # M
    written = xp.swapaxes(k * to_end, -1, -2) @ v + b_end_t @ reads0  # c

    def one_chunk(s: Any, xs: tuple) -> tuple[Any, Any]:
        return xs[0] @ s + xs[1], s

    state, starts = fw.scan(one_chunk, state, (xp.moveaxis(carry, 2, 0), xp.moveaxis(written, 2, 0)))
    y = outs @ xp.moveaxis(fw.stack(starts), 0, 2) + outs0  # [B, H, N, C, Dv]
    return xp.swapaxes(y.reshape(batch, heads, length, -1), 1, 2), state


def selective_scan(fw: Framework, x: Any, dt: Any, a_log: Any, b: Any, c: Any, d: Any, dt_bias: Any, state: Any,
                   cu_seqlens: Any) -> tuple[Any, Any]:
    """``ferrum.hookspec.selective_scan``; returns ``(y in x's dtype, new float32 state)``."""
    tokens, batch = x.shape[0], state.shape[0]
    cu, (x, dt, b, c), (state,) = bucketed(fw, cu_seqlens, [x, dt, b, c], [state])
    plan = delta_plan(cu, 0, fw.bucket or int)
    gather, scatter, valid = (None if i is None else fw.put(i) for i in (plan.gather, plan.scatter, plan.valid))
    y, new_state = _device_part(fw, scan_selective, ())(x, dt, a_log, b, c, d, dt_bias, state, gather, scatter, valid)
    return (y, new_state) if fw.bucket is None else (y[:tokens], new_state[:batch])


def scan_selective(fw: Framework, x: Any, dt: Any, a_log: Any, b: Any, c: Any, d: Any, dt_bias: Any, state: Any,
                   gather: Any, scatter: Any, valid: Any) -> tuple[Any, Any]:
    """The device part of :func:`selective_scan` for a :class:`DeltaPlan`'s uploaded arrays (pure: JAX jits it):
    one step per token over ``[B, D, N]``, a padding slot's step 0 (no decay, no write)."""
    xp, f32 = fw.xp, fw.xp.float32
    xf = fw.astype(x, f32)
    raw = fw.astype(dt, f32) + fw.astype(dt_bias, f32)
    step = xp.logaddexp(raw, xp.zeros_like(raw))  # softplus
    a = -xp.exp(fw.astype(a_log, f32))
    bf, cf, state = fw.astype(b, f32), fw.astype(c, f32), fw.astype(state, f32)
    if gather is None:  # every segment one token: one step over the batch
        y, new_state = _selective_step(xp, a, state, (xf, step, bf, cf))
    else:
        xs = [t[gather] for t in (xf, step, bf, cf)]  # [B, L, ...]
        xs[1] = xs[1] * valid[..., None]
        new_state, ys = fw.scan(lambda s, inputs: _selective_step(xp, a, s, inputs)[::-1], state,
                                tuple(xp.swapaxes(t, 0, 1) for t in xs))
        y = xp.swapaxes(fw.stack(ys), 0, 1)
        y = y.reshape(-1, y.shape[-1])[scatter]
    y = y + xf * fw.astype(d, f32)
    return fw.astype(y, x.dtype), new_state


def _selective_step(xp: Any, a: Any, state: Any, inputs: tuple) -> tuple[Any, Any]:
    """One token of every sequence: ``x, step [B, D]``, ``b, c [B, N]``, ``state [B, D, N]``."""
    x, step, b, c = inputs
    state = state * xp.exp(step[..., None] * a) + (step * x)[..., None] * b[:, None, :]
    return (state @ c[..., None])[..., 0], state


def rg_lru(fw: Framework, x: Any, gate_x: Any, gate_a: Any, a_param: Any, state: Any, cu_seqlens: Any,
           starts: Any) -> tuple[Any, Any]:
    """``ferrum.hookspec.rg_lru``; returns ``(y in x's dtype, new float32 state)``. The segment starts become a
    per-token reset on the host (1 at a starting segment's first row)."""
    tokens, batch = x.shape[0], state.shape[0]
    if tokens == 0:  # nothing to scan (the gathers below would index empty arrays)
        return x, fw.astype(state, fw.xp.float32)
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    reset = np.zeros(tokens, np.float32)
    first = cu[:-1][(np.asarray(starts, dtype=bool)) & (np.diff(cu) > 0)]
    reset[first] = 1.0
    cu, (x, gate_x, gate_a, reset), (state,) = bucketed(fw, cu, [x, gate_x, gate_a, fw.put(reset)], [state])
    plan = delta_plan(cu, 0, fw.bucket or int)
    gather, scatter, valid = (None if i is None else fw.put(i) for i in (plan.gather, plan.scatter, plan.valid))
    y, new_state = _device_part(fw, scan_rg_lru, ())(x, gate_x, gate_a, a_param, state, reset, gather, scatter,
                                                      valid)
    return (y, new_state) if fw.bucket is None else (y[:tokens], new_state[:batch])


def scan_rg_lru(fw: Framework, x: Any, gate_x: Any, gate_a: Any, a_param: Any, state: Any, reset: Any, gather: Any,
                scatter: Any, valid: Any) -> tuple[Any, Any]:
    """The device part of :func:`rg_lru` for a :class:`DeltaPlan`'s uploaded arrays (pure): per token ``h = a h +
    b``, where a reset row has ``a = 0`` and its input unnormalized, a padding slot ``a = 1`` and ``b = 0``."""
    xp, f32 = fw.xp, fw.xp.float32
    xf, gx, ga = (fw.astype(t, f32) for t in (x, gate_x, gate_a))
    ap = fw.astype(a_param, f32)
    log_a = -8.0 / (1.0 + xp.exp(-ga)) * xp.logaddexp(ap, xp.zeros_like(ap))
    keep = 1.0 - reset[:, None]
    decay = xp.exp(log_a) * keep
    scale = keep * xp.sqrt(1.0 - xp.exp(2.0 * log_a)) + reset[:, None]
    inputs = scale * xf / (1.0 + xp.exp(-gx))
    state = fw.astype(state, f32)
    if gather is None:  # every segment one token: one step over the batch
        new_state = decay * state + inputs
        return fw.astype(new_state, x.dtype), new_state
    mask = valid[..., None]
    decay, inputs = decay[gather] * mask + (1.0 - mask), inputs[gather] * mask  # [B, L, W]

    def step(h: Any, xs: tuple) -> tuple[Any, Any]:
        h = xs[0] * h + xs[1]
        return h, h

    new_state, ys = fw.scan(step, state, (xp.swapaxes(decay, 0, 1), xp.swapaxes(inputs, 0, 1)))
    y = xp.swapaxes(fw.stack(ys), 0, 1)
    y = y.reshape(-1, y.shape[-1])[scatter]
    return fw.astype(y, x.dtype), new_state
