"""Causal GQA attention: dense for one sequence, and native paged attention over the KV pool.

Both run one kernel, :func:`_attend`, on items padded to a common shape: ``q [items, q_len, heads, d]``
against ``k, v [items, kv_len, kv_heads, d]``, each query masked by its own position and its item's
KV length. A paged batch runs one call per group of items the core groups (decodes, prefill chunks, a
long chunk alone), each padded to power-of-two buckets (tokens, items, queries per item, blocks per item),
so a decode step compiles once per bucket as its sequences grow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ferrum import hookimpl

from ferrum_jax.arrays import DEVICE
from ferrum_jax.buckets import bucket

F32 = jnp.float32
#: A masked score: finite, so a padding query that sees no key gets a harmless uniform softmax, not NaN.
_MASKED = -1e30


def _attend(q, k, v, q_pos, kv_len, scale, window, softcap, sinks, alibi=None):
    """``q [n, Q, H, D]``, ``k, v [n, L, KVH, D]``, ``q_pos [n, Q]`` (position of each query, -1 for
    padding), ``kv_len [n]``; query at position p sees keys ``j <= p``, ``j < kv_len`` (and ``j > p - window``).
    ``sinks [H]`` or None: each head's value-less extra logit (gpt-oss), a column that joins the softmax
    and leaves. ``alibi [H]`` or None: head ``h``'s score of key ``j`` gains ``alibi[h] * (j - p)`` (BLOOM, MPT)."""
    n, q_len, heads, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(n, q_len, kv_heads, heads // kv_heads, d).astype(F32)
    scores = jnp.einsum("nqkgd,nlkd->nkgql", qg, k.astype(F32)) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    key = jnp.arange(k.shape[1])[None, None, :]
    pos = q_pos[:, :, None]
    if alibi is not None:
        scores = scores + alibi.astype(F32).reshape(kv_heads, -1, 1, 1) * (key - pos).astype(F32)[:, None, None]
    allowed = (key <= pos) & (key < kv_len[:, None, None])
    if window is not None:
        allowed &= key > pos - window
    scores = jnp.where(allowed[:, None, None], scores, _MASKED)
    if sinks is not None:
        column = jnp.broadcast_to(sinks.astype(F32).reshape(kv_heads, -1, 1, 1), (*scores.shape[:-1], 1))
        scores = jnp.concatenate([scores, column], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)[..., : k.shape[1]]
    out = jnp.einsum("nkgql,nlkd->nqkgd", probs, v.astype(F32))
    return out.reshape(n, q_len, heads, d).astype(q.dtype)


@partial(jax.jit, static_argnames=("window", "softcap"))
def _dense(q, k, v, scale, sinks, alibi, window, softcap):
    q_len, kv_len = q.shape[0], k.shape[0]
    q_pos = jnp.arange(kv_len - q_len, kv_len)[None]
    return _attend(q[None], k[None], v[None], q_pos, jnp.array([kv_len]), scale, window, softcap, sinks, alibi)[0]


@hookimpl
def attention(q, k, v, scale, sliding_window, softcap=None, sinks=None, alibi_slopes=None):
    return _dense(q, k, v, scale, sinks, alibi_slopes, window=sliding_window, softcap=softcap)


@dataclass(frozen=True)
class _Call:
    """One attention call's index arrays on the device, padded to buckets.

    ``q_rows [items_b, q_b]``: row of the batch's (padded) token array holding each item's i-th query;
    ``q_pos``: its position (-1 for padding); ``kv_slots [items_b, blocks_b * block_size]``: pool rows of each
    item's keys; ``kv_len [items_b]``; ``out_rows``: where the call's t-th token's output sits in the flattened
    ``[items_b * q_b]`` result (its first ``tokens`` rows are real).
    """

    tokens: int
    q_rows: jax.Array
    q_pos: jax.Array
    kv_slots: jax.Array
    kv_len: jax.Array
    out_rows: jax.Array


@dataclass(frozen=True)
class PreparedBatch:
    """A forward pass's attention calls, shared by every layer: the batch's items grouped as
    ``AttentionBatch.attention_calls`` groups them (decodes apart from prefill chunks, a long chunk alone), so a
    one-token decode is not padded to the longest chunk's queries and keys (60 decodes beside a 1,900-token prompt
    made a 12.8 GB score tensor). ``order`` puts the calls' concatenated rows back in token order (None: they are)."""

    tokens: int
    tokens_b: int
    calls: tuple[_Call, ...]
    order: jax.Array | None


def _call(batch, items: np.ndarray) -> _Call:
    q_len = np.diff(batch.cu_seqlens_q).astype(np.int64)[items]
    kv_len = batch.seq_lens.astype(np.int64)[items]
    starts = batch.cu_seqlens_q[:-1].astype(np.int64)[items]
    bs, count, tokens = batch.block_size, len(items), int(q_len.sum())
    items_b, q_b, tokens_b = bucket(count), bucket(int(q_len.max())), bucket(tokens, 8)
    width = -(-int(kv_len.max()) // bs)  # the blocks these items use, not the widest item's of the batch
    blocks_b = bucket(width)
    padding_row = bucket(batch.num_tokens, 8) - 1  # a padding row of the batch's token array

    i = np.arange(q_b)[None, :]
    real = i < q_len[:, None]
    q_rows = np.full((items_b, q_b), padding_row, dtype=np.int32)
    q_rows[:count] = np.where(real, starts[:, None] + i, padding_row)
    q_pos = np.full((items_b, q_b), -1, dtype=np.int32)
    q_pos[:count] = np.where(real, (kv_len - q_len)[:, None] + i, -1)

    tables = np.zeros((items_b, blocks_b), dtype=np.int64)
    tables[:count, :width] = batch.block_tables[items, :width]
    j = np.arange(blocks_b * bs)
    kv_slots = (tables[:, j // bs] * bs + j % bs).astype(np.int32)
    kv_len_b = np.zeros(items_b, dtype=np.int32)
    kv_len_b[:count] = kv_len

    item_of_token = np.repeat(np.arange(count), q_len)
    first_token = np.concatenate([[0], np.cumsum(q_len)[:-1]])
    out_rows = np.zeros(tokens_b, dtype=np.int32)
    out_rows[:tokens] = item_of_token * q_b + np.arange(tokens) - first_token[item_of_token]
    put = partial(jax.device_put, device=DEVICE)
    return _Call(tokens, put(q_rows), put(q_pos), put(kv_slots), put(kv_len_b), put(out_rows))


@hookimpl
def prepare_attention_batch(batch) -> PreparedBatch:
    groups, order = batch.attention_calls()
    calls = tuple(_call(batch, items) for items in groups)
    order = None if order is None else jax.device_put(order.astype(np.int32), DEVICE)
    return PreparedBatch(batch.num_tokens, bucket(batch.num_tokens, 8), calls, order)


@partial(jax.jit, static_argnames=("window", "softcap"))
def _paged(q, k_pool, v_pool, q_rows, q_pos, kv_slots, kv_len, out_rows, scale, sinks, alibi, window, softcap):
    items_b, q_b = q_rows.shape
    k, v = k_pool[kv_slots], v_pool[kv_slots]  # [items_b, L_b, KVH, D]
    out = _attend(q[q_rows], k, v, q_pos, kv_len, scale, window, softcap, sinks, alibi)  # [items_b, q_b, H, D]
    return out.reshape(items_b * q_b, *out.shape[2:])[out_rows]


@hookimpl
def paged_attention(q, pool, layer, batch, scale, sliding_window, softcap=None, sinks=None, alibi_slopes=None):
    prep: PreparedBatch = batch.prepared
    if prep.tokens_b != prep.tokens:
        q = jnp.pad(q, ((0, prep.tokens_b - prep.tokens), (0, 0), (0, 0)))
    outs = [_paged(q, pool.k[layer], pool.v[layer], call.q_rows, call.q_pos, call.kv_slots, call.kv_len,
                   call.out_rows, scale, sinks, alibi_slopes, window=sliding_window, softcap=softcap)[: call.tokens]
            for call in prep.calls]
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
    return out if prep.order is None else out[prep.order]
