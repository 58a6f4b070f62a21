"""ALiBi's per-head slopes (BLOOM, MPT): scores gain ``slope[h] * (key position - query position)``.

BLOOM's ``build_alibi_tensor`` and MPT's ``build_mpt_alibi_tensor`` (at alibi_bias_max 8, which transformers always
runs) compute the same numbers two ways; the family hands them to the model as data
(:attr:`ferrum.arch.spec.Architecture.alibi_slopes`). :func:`attend` is the attention with those biases written out
once for the numpy-like frameworks whose fused kernels take no bias per head (torch, MLX).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
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
    """One sequence's attention with ALiBi's biases, ``slopes[h] * (key - query position)``, scored in float32:
    ``q [q_len, H, d]``, ``k, v [kv_len, KVH, d]`` (the queries the last ``q_len`` positions), the queries ``chunk``
    at a time so that the scores held stay ``[H, chunk, kv_len]``; ``fw.softmax`` normalises them."""
    xp, f32 = fw.xp, fw.xp.float32
    q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[0], k.shape[1]
    group = heads // kv_heads
    keys = xp.swapaxes(xp.swapaxes(k, 0, 1), 1, 2)[:, None]  # [KVH, 1, d, L]
    values = xp.swapaxes(v, 0, 1)[:, None]  # [KVH, 1, L, d]
    key_pos, slopes = fw.put(np.arange(kv_len, dtype=np.int32)), fw.astype(slopes, f32).reshape(kv_heads, group, 1, 1)
    parts = []
    for start in range(0, q_len, chunk):
        rows = q[start : start + chunk]
        first = kv_len - q_len + start
        query_pos = key_pos[first : first + rows.shape[0]][:, None]
        grouped = xp.swapaxes(xp.swapaxes(rows.reshape(-1, kv_heads, group, d), 0, 1), 1, 2)  # [KVH, group, rows, d]
        scores = fw.astype(grouped @ keys, f32) * scale
        scores = scores + slopes * fw.astype(key_pos - query_pos, f32)  # [KVH, group, rows, L]
        allowed = key_pos <= query_pos
        if window is not None:
            allowed = allowed & (key_pos > query_pos - window)
        probs = fw.astype(fw.softmax(xp.where(allowed, scores, -math.inf)), v.dtype)
        parts.append(xp.swapaxes(xp.swapaxes(probs @ values, 1, 2), 0, 1).reshape(-1, heads, d))
    return parts[0] if len(parts) == 1 else xp.concatenate(parts)
