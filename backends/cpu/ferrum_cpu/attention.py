"""numpy attention: the paged KV pool, dense causal attention, and paged attention that decodes
over contiguous per-sequence mirrors of the pool instead of gathering each sequence's K/V.

Why mirrors: gathering a sequence's whole K/V from its blocks for every layer of every step
makes a decode step's cost grow with the context, and copies more bytes than the attention
itself reads. Which arena row mirrors which sequence, and which pool slots a step must copy,
is the core's bookkeeping (:mod:`ferrum.kv_mirror`); here it is applied to numpy arrays.
"""

from __future__ import annotations

import numpy as np

from ferrum.attention import AttentionBatch
from ferrum.kv_mirror import MirrorBook, MirrorPlan


class Arena:
    """Decoding sequences' K/V kept contiguous: per layer, keys ``[rows, kv_heads, head_dim, capacity]``
    and values ``[rows, kv_heads, capacity, head_dim]``.

    Keys are stored transposed so that a head's scores are ``q [group, d] @ K [d, length]``, a
    product BLAS runs fast (``q @ K.T`` on token-major keys measured 5-10x slower at 1,000
    tokens). Its shape is the one the mirror book sized within its budget (``plan.arena_shape``).
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: type):
        self.num_layers, self.kv_heads, self.head_dim, self.dtype = num_layers, kv_heads, head_dim, dtype
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.rows = self.capacity = 0

    def fit(self, rows: int, capacity: int) -> None:
        """Resize to ``rows x capacity`` positions, keeping what fits."""
        if (rows, capacity) == (self.rows, self.capacity):
            return
        kvh, d = self.kv_heads, self.head_dim
        r, c = min(rows, self.rows), min(capacity, self.capacity)
        self.k = [self._resized(old, (rows, kvh, d, capacity), np.s_[:r, :, :, :c]) for old in
                  self.k or [None] * self.num_layers]
        self.v = [self._resized(old, (rows, kvh, capacity, d), np.s_[:r, :, :c]) for old in
                  self.v or [None] * self.num_layers]
        self.rows, self.capacity = rows, capacity

    def _resized(self, old: np.ndarray | None, shape: tuple[int, ...], kept: tuple) -> np.ndarray:
        new = np.zeros(shape, dtype=self.dtype)
        if old is not None:
            new[kept] = old[kept]
        return new


class KVPool:
    """Per-layer K and V arrays ``[num_blocks, block_size, kv_heads, head_dim]``, their flat
    ``[slots, kv_heads, head_dim]`` views, and the decode mirrors."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: type):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.k = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.k_flat = [a.reshape(-1, num_kv_heads, head_dim) for a in self.k]
        self.v_flat = [a.reshape(-1, num_kv_heads, head_dim) for a in self.v]
        self.writes = [0] * num_layers  # kv_write calls per layer, for the mirror book
        self.mirrors = MirrorBook(num_layers, block_size, max_positions=num_blocks * block_size)
        self.arena = Arena(num_layers, num_kv_heads, head_dim, dtype)

    def write(self, layer: int, k: np.ndarray, v: np.ndarray, slots: np.ndarray) -> None:
        self.k_flat[layer][slots] = k
        self.v_flat[layer][slots] = v
        self.writes[layer] += 1

    def gather(self, layer: int, block_ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """One sequence's ``(k, v)``, each ``[length, kv_heads, head_dim]`` (a copy)."""
        shape = self.k_flat[layer].shape
        k = self.k[layer][block_ids].reshape(-1, *shape[1:])[:length]
        v = self.v[layer][block_ids].reshape(-1, *shape[1:])[:length]
        return k, v


def _scale_and_cap(scores: np.ndarray, scale: float, softcap: float | None) -> None:
    """``scores = softcap * tanh(scale * scores / softcap)``, in place (no cap: just the scale)."""
    if softcap is None:
        scores *= scale
        return
    scores *= scale / softcap
    np.tanh(scores, out=scores)
    scores *= softcap


def _weigh(scores: np.ndarray, values: np.ndarray, sinks: np.ndarray | None) -> np.ndarray:
    """``softmax(scores) @ values`` over the last axis (``scores`` overwritten); ``sinks``, broadcast
    against ``scores[..., :1]``, is each row's extra value-less logit (gpt-oss)."""
    top = scores.max(axis=-1, keepdims=True)
    if sinks is not None:
        top = np.maximum(top, sinks)
    scores -= top
    np.exp(scores, out=scores)
    out = scores @ values
    total = scores.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total += np.exp(sinks - top)
    out /= total
    return out


def _grouped_sinks(sinks: np.ndarray | None, kv_heads: int) -> np.ndarray | None:
    """Per-head sinks ``[heads]`` as ``[kv_heads, group, 1]``, the layout the scores group heads in."""
    return None if sinks is None else np.asarray(sinks, dtype=np.float32).reshape(kv_heads, -1, 1)


def _grouped_slopes(alibi: np.ndarray | None, kv_heads: int) -> np.ndarray | None:
    """ALiBi's per-head slopes ``[heads]`` as ``[kv_heads, group, 1]``."""
    return None if alibi is None else np.asarray(alibi, dtype=np.float32).reshape(kv_heads, -1, 1)


def _distances(key_pos: np.ndarray, query_pos: np.ndarray) -> np.ndarray:
    """``key - query`` positions in float32, keys along the last axis: what ALiBi's slopes multiply."""
    return (key_pos - query_pos).astype(np.float32)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, sliding_window: int | None,
                     softcap: float | None = None, sinks: np.ndarray | None = None,
                     alibi: np.ndarray | None = None) -> np.ndarray:
    """One sequence's attention (the ``attention`` op's contract), computed per kv head group."""
    q_len, heads, head_dim = q.shape
    kv_len, kv_heads, _ = k.shape
    group = heads // kv_heads
    qg = q.reshape(q_len, kv_heads, group, head_dim).transpose(1, 2, 0, 3)  # [kvh, g, q, d]
    keys = np.ascontiguousarray(k.transpose(1, 2, 0))  # [kvh, d, kv]: see Arena on why keys go d-major
    scores = qg @ keys[:, None]  # [kvh, g, q, kv]
    _scale_and_cap(scores, scale, softcap)
    query_pos = np.arange(kv_len - q_len, kv_len)[:, None]
    key_pos = np.arange(kv_len)[None, :]
    slopes = _grouped_slopes(alibi, kv_heads)
    if slopes is not None:
        scores += slopes[..., None] * _distances(key_pos, query_pos)
    hidden = key_pos > query_pos
    if sliding_window is not None:
        hidden |= key_pos <= query_pos - sliding_window
    if hidden.any():
        scores[..., hidden] = -np.inf
    sinks = _grouped_sinks(sinks, kv_heads)
    out = _weigh(scores, v.transpose(1, 0, 2)[:, None], None if sinks is None else sinks[..., None])  # [kvh, g, q, d]
    return out.transpose(2, 0, 1, 3).reshape(q_len, heads, head_dim).astype(q.dtype, copy=False)


def _mirrored_decode(q: np.ndarray, pool: KVPool, layer: int, plan: MirrorPlan, sync: str, scale: float,
                     sliding_window: int | None, softcap: float | None, sinks: np.ndarray | None,
                     alibi: np.ndarray | None) -> np.ndarray:
    """Every item decodes one token: bring its arena row up to date (the positions written
    since the last step, or the whole row when ``sync`` is ``"full"``), then attend over the
    row in place."""
    copies = plan.device.get(sync)
    if copies is None:
        copies = plan.device[sync] = (plan.src, plan.dst_row, plan.dst_pos) if sync == "step" else plan.full()
    arena = pool.arena
    arena.fit(*plan.arena_shape)
    k_rows, v_rows = arena.k[layer], arena.v[layer]
    src, dst_row, dst_pos = copies
    if len(src):
        k_rows[dst_row, :, :, dst_pos] = pool.k_flat[layer][src]
        v_rows[dst_row, :, dst_pos] = pool.v_flat[layer][src]
    _, heads, head_dim = q.shape
    kv_heads = arena.kv_heads
    sinks, slopes = _grouped_sinks(sinks, kv_heads), _grouped_slopes(alibi, kv_heads)
    if plan.in_order and len(q) > 1:
        return _attend_rows_together(q, k_rows, v_rows, plan, scale, sliding_window, softcap, sinks, slopes)
    out = np.empty_like(q)
    firsts = plan.first_keys(sliding_window).tolist()
    for i, (row, start, end) in enumerate(zip(plan.rows.tolist(), firsts, plan.lengths.tolist())):
        keys, values = k_rows[row, :, :, start:end], v_rows[row, :, start:end]  # [kvh, d, L], [kvh, L, d]
        scores = q[i].reshape(kv_heads, -1, head_dim) @ keys  # [kvh, g, L]
        _scale_and_cap(scores, scale, softcap)
        if slopes is not None:
            scores += slopes * _distances(np.arange(start, end), np.int64(end - 1))
        out[i] = _weigh(scores, values, sinks).reshape(heads, head_dim)  # [kvh, g, d]
    return out


def _attend_rows_together(q: np.ndarray, k_rows: np.ndarray, v_rows: np.ndarray, plan: MirrorPlan, scale: float,
                          sliding_window: int | None, softcap: float | None,
                          sinks: np.ndarray | None, slopes: np.ndarray | None) -> np.ndarray:
    """Items ``0..n-1`` in arena rows ``0..n-1``: one batched product per step of the softmax, over the
    positions from the first any item sees to the longest item's end, with the others' masked, instead of a
    dozen numpy calls per item."""
    n, heads, head_dim = q.shape
    kv_heads = k_rows.shape[1]
    longest = int(plan.lengths.max())
    hidden = plan.device.get(("hidden", sliding_window))
    if hidden is None:  # 0 where a key is visible, -inf where not: one add masks every item
        offset, first, end = plan.row_spans(sliding_window)
        kpos = np.arange(offset, longest)[None, :]
        visible = (kpos >= first[:, None]) & (kpos < end[:, None])
        hidden = np.where(visible, 0.0, -np.inf).astype(q.dtype)[:, None, None]
        plan.device[("hidden", sliding_window)] = hidden = (offset, hidden)
    offset, hidden = hidden
    keys, values = k_rows[:n, :, :, offset:longest], v_rows[:n, :, offset:longest]  # [n, kvh, d, L], [n, kvh, L, d]
    scores = q.reshape(n, kv_heads, -1, head_dim) @ keys  # [n, kvh, g, L]
    _scale_and_cap(scores, scale, softcap)
    scores += hidden
    if slopes is not None:  # each row's query sits at its last key
        _, _, end = plan.row_spans(sliding_window)
        scores += slopes * _distances(np.arange(offset, longest)[None, :], end[:, None] - 1)[:, None, None]
    return _weigh(scores, values, sinks).reshape(n, heads, head_dim)  # [n, kvh, g, d]


def paged_attention(q: np.ndarray, pool: KVPool, layer: int, batch: AttentionBatch, scale: float,
                    sliding_window: int | None, softcap: float | None = None,
                    sinks: np.ndarray | None = None, alibi: np.ndarray | None = None) -> np.ndarray:
    """Items decoding one token attend over the mirrors; items with a longer query (prefill chunks,
    verification) gather their K/V from their blocks."""
    plan, sync = pool.mirrors.begin(batch, layer, pool.writes[layer])
    features = (sliding_window, softcap, sinks, alibi)
    if plan is not None and plan.whole:
        return _mirrored_decode(q, pool, layer, plan, sync, scale, *features)
    out = np.empty_like(q)
    gathered = np.ones(batch.num_items, dtype=bool)
    if plan is not None:
        out[plan.tokens] = _mirrored_decode(q[plan.tokens], pool, layer, plan, sync, scale, *features)
        gathered[plan.items] = False
    for item in np.flatnonzero(gathered).tolist():
        start, end = batch.query_range(item)
        k, v = pool.gather(layer, batch.block_ids(item), int(batch.seq_lens[item]))
        out[start:end] = causal_attention(q[start:end], k, v, scale, *features)
    return out
