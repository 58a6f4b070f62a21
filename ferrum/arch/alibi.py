"""ALiBi's per-head slopes (BLOOM, MPT): scores gain ``slope[h] * (key position - query position)``.

BLOOM's ``build_alibi_tensor`` and MPT's ``build_mpt_alibi_tensor`` (at alibi_bias_max 8, which transformers always
runs) compute the same numbers two ways; the family hands them to the model as data
(:attr:`ferrum.arch.spec.Architecture.alibi_slopes`). :func:`attend` and :func:`paged_attend` are the attention with
those biases written out once for the numpy-like frameworks whose fused kernels take no bias per head (torch, MLX).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ferrum.attention import AttentionBatch
    from ferrum.kv_mirror import MirrorPlan
    from ferrum.recurrent.batched import Framework

#: The plugin API from which ``attention`` and ``paged_attention`` take ``alibi_slopes``.
ALIBI_SINCE = (1, 21)


def alibi_slopes(heads: int) -> tuple[float, ...]:
    """``2 ** (-8 i / n)`` for ``i = 1..n``, ``n`` the largest power of two not above ``heads``, then, for the heads
    past it, the odd powers of the next power of two's base (BLOOM's formula)."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** power for power in range(1, closest + 1)]
    if closest != heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** power for power in range(1, 2 * min(closest, heads - closest), 2)]
    return tuple(slopes)


def attend(fw: Framework, q: Any, k: Any, v: Any, scale: float, window: int | None, slopes: Any, chunk: int) -> Any:
    """One sequence's attention with ALiBi's biases: ``q [q_len, H, d]``, ``k, v [kv_len, KVH, d]``, the queries the
    last ``q_len`` positions (:func:`attend_padded` of a batch of one)."""
    q_len, kv_len = q.shape[0], k.shape[0]
    query_pos = fw.put(np.arange(kv_len - q_len, kv_len, dtype=np.int32)[None])
    keys, values = (fw.xp.swapaxes(a, 0, 1)[None] for a in (k, v))
    return attend_padded(fw, q[None], keys, values, query_pos, scale, window, slopes, chunk)[0]


def attend_padded(fw: Framework, q: Any, k: Any, v: Any, query_pos: Any, scale: float, window: int | None,
                  slopes: Any, chunk: int) -> Any:
    """A padded batch's attention with ALiBi's biases, ``slopes[h] * (key - query position)``, scored in float32:
    ``q [B, Lq, H, d]``, ``k, v [B, KVH, Lk, d]`` (key ``j`` at position ``j``), ``query_pos [B, Lq]`` each query's
    position. A query sees the keys up to its own (within ``window``), so keys padding an item past its length are
    never seen. The queries go ``chunk`` at a time so that the scores held stay ``[B, H, chunk, Lk]``, a KV head's
    query heads the rows of one product; ``fw.softmax`` normalises them."""
    xp, f32 = fw.xp, fw.xp.float32
    batch, q_len, heads, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    keys = xp.swapaxes(k, 2, 3)  # [B, KVH, d, Lk]
    key_pos, slopes = fw.put(np.arange(kv_len, dtype=np.int32)), fw.astype(slopes, f32).reshape(kv_heads, group, 1, 1)
    parts = []
    for start in range(0, q_len, chunk):
        rows = q[:, start : start + chunk]
        n = rows.shape[1]
        grouped = xp.swapaxes(xp.swapaxes(rows.reshape(batch, n, kv_heads, group, d), 1, 2), 2, 3)
        scores = fw.astype(grouped.reshape(batch, kv_heads, group * n, d) @ keys, f32) * scale
        query = query_pos[:, start : start + n, None]  # [B, rows, 1]
        relative = fw.astype((key_pos - query)[:, None, None], f32)  # [B, 1, 1, rows, Lk]
        scores = scores.reshape(batch, kv_heads, group, n, kv_len) + slopes * relative
        allowed = key_pos <= query
        if window is not None:
            allowed = allowed & (key_pos > query - window)
        probs = fw.astype(fw.softmax(xp.where(allowed[:, None, None], scores, -math.inf)), v.dtype)
        out = (probs.reshape(batch, kv_heads, group * n, kv_len) @ v).reshape(batch, kv_heads, group, n, d)
        parts.append(xp.swapaxes(xp.swapaxes(out, 2, 3), 1, 2).reshape(batch, n, heads, d))
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=1)


def paged_attend(fw: Framework, q: Any, k_pool: Any, v_pool: Any, batch: AttentionBatch, scale: float,
                 window: int | None, slopes: Any, chunk: int, plan: MirrorPlan | None = None,
                 rows: tuple[Any, Any] | None = None) -> Any:
    """``paged_attention`` with ALiBi over a pool stored flat (``k_pool, v_pool [slots, KVH, d]``). A batch of
    decode steps with a mirror plan (:mod:`ferrum.kv_mirror`) attends over the arena ``rows`` (K, V ``[rows, KVH,
    capacity, d]``, brought up to date by the backend) in place; otherwise each call of
    :attr:`ferrum.attention.AttentionBatch.padded_calls` attends in one :func:`attend_padded` over its items' keys
    gathered head-major (``[items, KVH, Lk, d]``, the layout its products read without a copy) by the rows ``slot *
    KVH + head`` of the pool."""
    if rows is not None and plan.whole and plan.starts is None:
        return _mirrored(fw, q, *rows, plan, scale, window, slopes)
    padded, kv_heads, d = batch.padded_calls, k_pool.shape[1], k_pool.shape[2]
    dev = padded.device.get((fw, kv_heads))
    if dev is None:  # uploaded once per pass, for every layer
        put = lambda a: None if a is None else fw.put(a.astype(np.int32))  # noqa: E731
        heads = np.arange(kv_heads)[:, None]
        dev = padded.device[fw, kv_heads] = (
            [(put(c.query_pos), put(c.q_rows), put(c.kv_slots[:, None] * kv_heads + heads), put(c.out_rows))
             for c in padded.calls], put(padded.order))
    calls, order = dev
    k_rows, v_rows = k_pool.reshape(-1, d), v_pool.reshape(-1, d)
    parts = []
    for call, (query_pos, q_rows, kv_rows, out_rows) in zip(padded.calls, calls):
        queries = q.reshape(*call.query_pos.shape, *q.shape[1:]) if q_rows is None else fw.rows(q, q_rows)
        out = attend_padded(fw, queries, fw.rows(k_rows, kv_rows), fw.rows(v_rows, kv_rows), query_pos, scale,
                            window, slopes, chunk)
        out = out.reshape(-1, *q.shape[1:])
        parts.append(out if out_rows is None else fw.rows(out, out_rows))
    out = parts[0] if len(parts) == 1 else fw.xp.concatenate(parts)
    return out if order is None else fw.rows(out, order)


def _mirrored(fw: Framework, q: Any, k_rows: Any, v_rows: Any, plan: MirrorPlan, scale: float, window: int | None,
              slopes: Any) -> Any:
    """Decode steps over their arena rows, column ``j`` position ``j``: the rows in use as they are where item ``i``
    is in row ``i`` (``plan.in_order``), else the items' rows taken out."""
    dev = plan.device.get("alibi")
    if dev is None:
        dev = plan.device["alibi"] = (fw.put((plan.lengths - 1).astype(np.int32)[:, None]),
                                      None if plan.in_order else fw.put(plan.rows.astype(np.int32)))
    query_pos, items = dev
    n = q.shape[0]
    k, v = (a[:n] if items is None else fw.rows(a, items) for a in (k_rows, v_rows))
    k, v = k[:, :, : plan.capacity], v[:, :, : plan.capacity]
    return attend_padded(fw, q[:, None], k, v, query_pos, scale, window, slopes, 1)[:, 0]
