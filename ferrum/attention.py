"""Host-side description of one forward pass's tokens, shared by all layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np


#: Query x key count from which a prefill item attends in a call of its own (:meth:`AttentionBatch.alone`):
#: eight prompts of 128-512 tokens padded into one call cost ~2.3x the keys they need.
ALONE_PAIRS = 128 * 128


@dataclass
class AttentionBatch:
    """Where each query token of a mixed batch belongs.

    Built once per forward pass by the model from the KV manager's block
    tables; every layer's attention reads it. All arrays are host numpy int32.
    ``prepared`` holds whatever the backend's ``prepare_attention_batch`` made
    of it (device copies, say), so no layer converts metadata again.
    """

    positions: np.ndarray  # [T] position of each query token in its item (its sequence; a chunked view's chunk)
    slot_mapping: np.ndarray  # [T] KV slot each new token is written to
    cu_seqlens_q: np.ndarray  # [items + 1] prefix sums of query lengths
    seq_lens: np.ndarray  # [items] KV length of each item after this step
    block_tables: np.ndarray  # [items, max_blocks] block ids, padded with 0
    block_size: int
    prepared: Any = field(default=None, repr=False)
    #: The batch this one keeps some query rows of (:meth:`narrowed`), else None.
    parent: "AttentionBatch | None" = field(default=None, repr=False)
    #: The batch this one is a view of, its items split at chunk boundaries (:meth:`chunked`), else None; then
    #: ``view_items`` is each item's item there and ``key_starts`` the position there of the item's first key.
    view_of: "AttentionBatch | None" = field(default=None, repr=False)
    view_items: np.ndarray | None = field(default=None, repr=False)
    key_starts: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_items(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens_q[-1])

    @cached_property
    def query_lengths(self) -> np.ndarray:
        """``[items]`` query tokens of each item."""
        return np.diff(self.cu_seqlens_q)

    @cached_property
    def token_items(self) -> np.ndarray:
        """``[T]`` the item each query token belongs to."""
        return np.repeat(np.arange(self.num_items), self.query_lengths)

    @cached_property
    def decoding(self) -> np.ndarray:
        """The items that feed one token (ascending): decode steps, or one-token prompts and chunks."""
        return np.flatnonzero(self.query_lengths == 1)

    def query_range(self, item: int) -> tuple[int, int]:
        return int(self.cu_seqlens_q[item]), int(self.cu_seqlens_q[item + 1])

    def block_ids(self, item: int) -> np.ndarray:
        """The blocks item ``item`` needs for its current KV length."""
        used = -(-int(self.seq_lens[item]) // self.block_size)
        return self.block_tables[item, :used]

    def narrowed(self, keep: np.ndarray) -> "AttentionBatch":
        """The same items' KV with only the query rows ``keep``: what the last layer attends when only
        those rows' outputs are wanted (their logits), so its attention and MLP skip the others.

        ``keep`` (ascending) must hold a suffix of each item's rows, as the last position of a final
        chunk is; an item none of whose rows is kept is left out.
        """
        keep = np.asarray(keep, dtype=np.int64)
        item_of = self.token_items[keep]
        items, counts = np.unique(item_of, return_counts=True)
        cu = np.zeros(len(items) + 1, dtype=np.int32)
        np.cumsum(counts, out=cu[1:])
        if (np.diff(keep) <= 0).any() or (keep[cu[:-1]] != self.cu_seqlens_q[items + 1] - counts).any():
            raise ValueError("kept rows must be, for each item, its last ones, ascending")
        return AttentionBatch(self.positions[keep], self.slot_mapping[keep], cu, self.seq_lens[items],
                              self.block_tables[items], self.block_size, parent=self)

    def chunked(self, chunk: int) -> "AttentionBatch":
        """The same query rows attending only within their chunks of ``chunk`` positions (chunked local attention,
        ``LayerSpec.chunk``): each item split at the chunk boundaries its queries cross, each piece an item whose
        KV starts at its chunk's first position (its block table shifted by ``chunk / block_size`` blocks per
        chunk), so any causal attention over it is the chunked one. ``chunk`` must be a multiple of
        ``block_size``. The batch itself where no item reaches past its first chunk.

        The view names the batch it splits (``view_of``), so a backend's mirrors of the batch's sequences
        (:mod:`ferrum.kv_mirror`) serve its items too: a piece's keys are a suffix of its sequence's."""
        if chunk % self.block_size:
            raise ValueError(f"chunk {chunk} is not a multiple of the block size {self.block_size}")
        if int(self.seq_lens.max(initial=0)) <= chunk:
            return self
        starts, q_ranges, kv_lens, tables, items = [], [], [], [], []
        per_chunk = chunk // self.block_size
        for item in range(self.num_items):
            q0, q1 = self.query_range(item)
            end = int(self.seq_lens[item])
            first = end - (q1 - q0)  # position of the item's first query
            for c in range(first // chunk, (end - 1) // chunk + 1):
                lo, hi = max(first, c * chunk), min(end, (c + 1) * chunk)
                q_ranges.append(hi - lo)
                kv_lens.append(hi - c * chunk)
                tables.append(self.block_tables[item, c * per_chunk:])
                starts.append(c * chunk)
                items.append(item)
        cu = np.zeros(len(q_ranges) + 1, dtype=np.int32)
        np.cumsum(q_ranges, out=cu[1:])
        width = max(1, max(len(t) for t in tables))
        block_tables = np.zeros((len(tables), width), dtype=np.int32)
        for row, table in enumerate(tables):
            block_tables[row, :len(table)] = table
        shift = np.repeat(np.asarray(starts, dtype=np.int32), q_ranges)
        return AttentionBatch(self.positions - shift, self.slot_mapping, cu, np.asarray(kv_lens, dtype=np.int32),
                              block_tables, self.block_size, view_of=self, view_items=np.asarray(items, np.int64),
                              key_starts=np.asarray(starts, np.int64))

    def alone(self, alone_pairs: int | None = None) -> np.ndarray:
        """``[items]`` bool: the items that attend in a call of their own (a causal mask, no padding).

        An item with more than one query token whose query x key count reaches ``alone_pairs``
        (default :data:`ALONE_PAIRS`); the other prefill items share one padded call
        (:meth:`attention_calls`). Padding prompts of mixed lengths into one call costs each the
        longest one's work, while a call per short item costs more to issue than it computes. A
        batch of one item is one call either way (all False).
        """
        q_len = self.query_lengths.astype(np.int64)
        pairs = ALONE_PAIRS if alone_pairs is None else alone_pairs
        return (q_len > 1) & (q_len * self.seq_lens >= pairs) & (self.num_items > 1)

    def attention_calls(self, alone_pairs: int | None = None) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Items grouped into attention calls, and the order that puts the calls' rows back.

        Each :meth:`alone` item gets a call; the other prefill items share one padded call, and the
        items decoding one token another (last), which a backend may attend over its mirrors
        (:mod:`ferrum.kv_mirror`). Returns each call's item indices (ascending), and the permutation
        taking the calls' concatenated output rows to token order (None when they are in token
        order already).
        """
        q_len = self.query_lengths
        alone, decoding = self.alone(alone_pairs), q_len == 1
        calls = [np.array([i]) for i in np.flatnonzero(alone)]
        calls += [items for items in (np.flatnonzero(~alone & ~decoding), np.flatnonzero(decoding)) if len(items)]
        if len(calls) == 1:
            return calls, None
        emitted = np.concatenate([np.flatnonzero(np.isin(self.token_items, items)) for items in calls])
        return calls, np.argsort(emitted)

    @cached_property
    def padded_calls(self) -> "PaddedCalls":
        """:meth:`attention_calls` with each call's items padded to one ``[items, max_q]`` / ``[items, max_kv]``
        batch, for an attention written out over whole arrays; built once per pass."""
        calls, order = self.attention_calls()
        return PaddedCalls([PaddedCall.of(self, items) for items in calls], order)


@dataclass
class PaddedCall:
    """Items attended in one padded call: every array host int64, ``[items, max_q]`` or ``[items, max_kv]``.

    ``query_pos``: each query slot's position among its item's keys, key ``j`` at ``j`` (padding: 0, so that it
    sees one key and its softmax stays finite); ``q_rows``: its token row (padding: the item's first), or None
    when the slots are the batch's rows in order (a batch of decode steps); ``kv_slots``: each key's pool slot
    (padding: 0, past every query of its item, so a causal mask hides it); ``out_rows``: the valid slots,
    row-major, or None when none is padding.
    """

    query_pos: np.ndarray
    q_rows: np.ndarray | None
    kv_slots: np.ndarray
    out_rows: np.ndarray | None

    @classmethod
    def of(cls, batch: AttentionBatch, items: np.ndarray) -> "PaddedCall":
        q_len = batch.query_lengths[items].astype(np.int64)
        kv_len = batch.seq_lens[items].astype(np.int64)
        i, j, bs = np.arange(int(q_len.max())), np.arange(int(kv_len.max())), batch.block_size
        valid = i[None, :] < q_len[:, None]
        starts = batch.cu_seqlens_q[:-1][items].astype(np.int64)[:, None]
        q_rows = np.where(valid, starts + i, starts)
        in_order = q_rows.size == batch.num_tokens and (q_rows.reshape(-1) == np.arange(q_rows.size)).all()
        tables = batch.block_tables[items].astype(np.int64)
        slots = tables[:, np.minimum(j // bs, tables.shape[1] - 1)] * bs + j % bs
        return cls(np.where(valid, (kv_len - q_len)[:, None] + i, 0), None if in_order else q_rows,
                   np.where(j[None, :] < kv_len[:, None], slots, 0), None if valid.all() else np.flatnonzero(valid))


@dataclass
class PaddedCalls:
    """:attr:`AttentionBatch.padded_calls`: the calls, the permutation taking their concatenated output rows to token
    order (None when they are in order), and ``device``, a backend's cache of its copies of them."""

    calls: list[PaddedCall]
    order: np.ndarray | None
    device: dict = field(default_factory=dict, repr=False)
