"""Contiguous per-sequence copies of the paged KV, so decode attends without re-gathering.

Why: a decode step that gathers every sequence's whole K/V from the pool, for
every layer, costs time that grows with the context. mlx-lm instead keeps each
sequence's K/V contiguous and appends one position per step. A backend can do
the same on top of the paged pool with a *mirror*: one row of a
``[rows, kv_heads, capacity, head_dim]`` arena per sequence, holding a copy of
positions ``[0, length)``; each step copies only the positions written since
(one per sequence while decoding) and attends over the row in place.

This module is the host-side bookkeeping, shared by the backends: which row
belongs to which sequence and which pool slots each step must copy. The KV
manager's sequence ids never reach the ops, so a sequence is recognised by its
block table (the block holding its last mirrored position, then the whole
table prefix is compared). A mirror stays exact because

* every batch's writes (``slot_mapping``) shorten any mirror whose mirrored
  positions they overwrite (freed blocks reused by another sequence, a
  truncated sequence rewritten, a forward retried after a failure), except in
  decoding's steady state, where each write lands just past its own mirror's end;
* a layer that was written more than once between two batches, or a batch whose
  layers were not all attended, means writes the book did not see: that layer
  is copied in full for the current batch and every mirror is dropped at the
  next one.

A view of the batch whose items are split at chunk boundaries (``AttentionBatch.chunked``, the chunked
local attention of Llama 4's rope layers) attends through the same mirrors: a piece that decodes one
token is one of the batch's decoding items, and its keys, its chunk's, are a suffix of that
sequence's, so its plan is the batch's with each item's first key (``MirrorPlan.starts``) moved to its
chunk's start. Layers attending the batch and layers attending the view thus keep one set of mirrors
across steps (each layer's row still holds the whole sequence), where keying the book on each object
would drop every mirror twice a step.

The cost is memory: the arena holds a second copy of the K/V of the sequences
decoding now (padded to the longest), as mlx-lm's batched cache does. A book made
with ``max_positions`` keeps the arena within that many positions (backends pass
their pool's size, so decoding never holds more than twice the pool's K/V): a
batch the arena cannot hold within it is refused a plan and attends the way a
prefill does, by gathering from the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np


@dataclass
class _Mirror:
    row: int
    blocks: np.ndarray  # int64 block ids covering positions [0, length)
    index: dict[int, int]  # block id -> its place in ``blocks``
    length: int  # positions [0, length) equal the pool's, in every layer

    def cover(self, table: np.ndarray, length: int, block_size: int) -> None:
        """Now mirroring ``[0, length)`` of the sequence with this block table (the index changes only
        when the blocks do; while decoding, once every ``block_size`` steps, by the one new block)."""
        blocks = table[: -(-length // block_size)]
        held = len(self.blocks)
        if len(blocks) != held or not (blocks == self.blocks).all():
            if len(blocks) > held and (blocks[:held] == self.blocks).all():
                self.index.update(zip(blocks[held:].tolist(), range(held, len(blocks))))
            else:
                self.index = dict(zip(blocks.tolist(), range(len(blocks))))
            self.blocks = blocks.copy()
        self.length = length


@dataclass
class MirrorPlan:
    """What one batch's decoding items do with the arena: every array is host int64.

    ``items``: the batch's items that decode one token (ascending), which the plan covers;
    ``tokens``: their query rows; ``whole``: they are the whole batch (otherwise the other
    items, prefill chunks, attend by gathering from the pool beside them).
    ``rows`` / ``lengths``: each covered item's arena row and KV length. ``src`` (pool
    slots) and ``dst_row`` / ``dst_pos`` (arena coordinates): the copies that
    bring every row up to date; ``full`` the same for whole rows, used by a
    layer whose writes the book could not account for. ``num_rows`` and
    ``capacity`` are the arena size this batch needs (``in_order``: item ``i``
    is in row ``i``, and no other row is in use); ``arena_shape`` the
    ``(rows, capacity)`` the backend's arena must have (at least as large,
    grown in steps, within the book's budget: resize to it, keeping what fits).
    ``device`` is the backend's cache of device copies of these arrays. ``fresh``: every
    copy is a position this batch writes, the covered items' own new tokens, in ``src``
    order (a backend may then copy from the K/V it was just given, not from the pool).
    ``starts``: each item's first key in its row where it does not see the row from position 0
    (the items of a chunked view, which start at their chunk's), else None; backends ask
    :meth:`first_keys` / :meth:`row_spans`, which also apply a sliding window.
    """

    items: np.ndarray
    tokens: np.ndarray
    whole: bool
    rows: np.ndarray
    lengths: np.ndarray
    src: np.ndarray
    dst_row: np.ndarray
    dst_pos: np.ndarray
    num_rows: int
    capacity: int
    arena_shape: tuple[int, int]
    fresh: bool
    _tables: np.ndarray
    _block_size: int
    device: dict[str, Any] = field(default_factory=dict)
    starts: np.ndarray | None = None

    def first_keys(self, window: int | None) -> np.ndarray:
        """``[items]`` each item's first visible key in its row: 0, its chunk's start, or past its window."""
        first = np.zeros_like(self.lengths) if self.starts is None else self.starts
        return first if window is None else np.maximum(first, self.lengths - window)

    def row_spans(self, window: int | None) -> tuple[int, np.ndarray, np.ndarray]:
        """``(offset, first, end)``: the arena columns ``[offset, capacity)`` hold every key an item sees, and row
        ``r`` sees keys ``[first[r], end[r])`` (``[num_rows]``, absolute columns); a row no item uses sees key
        ``offset`` alone, so that its softmax has a key (its output is not used)."""
        first = self.first_keys(window)
        offset = int(first.min())
        row_first = np.full(self.num_rows, offset, dtype=np.int64)
        row_end = np.full(self.num_rows, offset + 1, dtype=np.int64)
        row_first[self.rows], row_end[self.rows] = first, self.lengths
        return offset, row_first, row_end

    @cached_property  # asked by every layer's attention
    def in_order(self) -> bool:
        return self.num_rows == len(self.rows) and bool((self.rows == np.arange(self.num_rows)).all())

    def full(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(src, dst_row, dst_pos)`` copying every item's positions ``[0, length)``."""
        bs = self._block_size
        pos = [np.arange(n) for n in self.lengths]
        src = np.concatenate([t[p // bs] * bs + p % bs for t, p in zip(self._tables, pos)])
        dst_row = np.repeat(self.rows, self.lengths)
        return src.astype(np.int64), dst_row, np.concatenate(pos).astype(np.int64)


_NO_BLOCKS = np.zeros(0, dtype=np.int64)


class MirrorBook:
    """Rows of one KV pool's arena, and how far each is in step with the pool."""

    #: The arena grows by this many rows and positions at a time, so it is not resized every step.
    ROW_STEP, POS_STEP = 4, 256

    def __init__(self, num_layers: int, block_size: int, max_positions: int | None = None):
        self.num_layers = num_layers
        self.block_size = block_size
        self.max_positions = max_positions
        self.arena_shape = (0, 0)  # (rows, capacity) of the arena, as the last plan sized it
        self._by_block: dict[int, _Mirror] = {}  # block of a mirror's last position -> mirror
        self._mirrors: list[_Mirror] = []
        self._batch: Any = None
        self._plan: MirrorPlan | None = None
        self._attended: set[int] = set()  # layers attended with the current batch
        self._writes_seen = [0] * num_layers
        self._reset_next = False
        self._views: dict[int, tuple[Any, MirrorPlan | None]] = {}  # id -> (chunked view, its plan), this batch's

    # ------------------------------------------------------------ per batch
    def begin(self, batch: Any, layer: int, writes: int) -> tuple[MirrorPlan | None, str]:
        """Called by every ``paged_attention``: the plan for the batch's items that decode one
        token (None when none does) and which copies ``layer`` needs, ``"step"`` (the plan's)
        or ``"full"``.

        ``writes`` counts the pool's ``kv_write`` calls on ``layer`` so far: one
        since the last batch is this batch's own write; more were not described
        by any batch the book saw. A batch narrowed from another (the last layer's, see
        ``AttentionBatch.narrowed``) is that batch's; the model narrows only batches in which no
        item decodes, so it has no plan. A chunked view of a batch (``AttentionBatch.chunked``) is
        that batch's too, with the plan of :meth:`_view_plan`.
        """
        view = batch if getattr(batch, "view_of", None) is not None else None
        batch = batch if view is None else view.view_of
        narrowed = getattr(batch, "parent", None) is not None
        batch = batch.parent if narrowed else batch
        if batch is not self._batch:
            if self._reset_next or (self._batch is not None and len(self._attended) < self.num_layers):
                self._drop_all()
            self._batch, self._attended, self._views = batch, set(), {}
            decoding = batch.decoding
            plan = self._next_step(batch, decoding)
            if plan is None:
                self._forget_overwritten(batch)
                plan = self._make_plan(batch, decoding) if len(decoding) else None
            self._plan = plan
        unseen = writes - self._writes_seen[layer] > 1
        self._writes_seen[layer] = writes
        if narrowed and self._plan is not None:
            raise ValueError("only a batch in which no item decodes may be narrowed: its decoding items have mirrors")
        plan = self._plan if view is None or self._plan is None else self._view_plan(view, self._plan)
        if plan is not None or self._plan is None:  # else this layer's rows miss the batch's copies
            self._attended.add(layer)
        if unseen:
            self._reset_next = True
        return plan, "full" if unseen else "step"

    @property
    def arena_positions(self) -> int:
        """K/V positions per layer the arena holds (its memory: this x 2 x kv_heads x head_dim x layers)."""
        rows, capacity = self.arena_shape
        return rows * capacity

    # -------------------------------------------------------------- helpers
    def _view_plan(self, view: Any, plan: MirrorPlan) -> MirrorPlan | None:
        """The plan of a chunked view of the plan's batch: the same rows and copies, each item seeing its row from
        its chunk's start. None when the view's decoding items are not the batch's (a prompt's piece of one token
        past a chunk boundary): the view then attends from the pool, and the layer's rows fall behind (the book
        drops every mirror at the next batch, as for a layer not attended)."""
        cached = self._views.get(id(view))
        if cached is not None and cached[0] is view:
            return cached[1]
        items = np.searchsorted(view.view_items, plan.items)  # a decoding item is one piece, the first of its item
        derived = None
        if np.array_equal(items, view.decoding):
            derived = MirrorPlan(
                items, np.asarray(view.cu_seqlens_q, dtype=np.int64)[items], len(items) == view.num_items, plan.rows,
                plan.lengths, plan.src, plan.dst_row, plan.dst_pos, num_rows=plan.num_rows, capacity=plan.capacity,
                arena_shape=plan.arena_shape, fresh=plan.fresh, _tables=plan._tables, _block_size=plan._block_size,
                starts=np.asarray(view.key_starts, dtype=np.int64)[items],
            )
        self._views[id(view)] = (view, derived)
        return derived

    def _drop_all(self) -> None:
        self._mirrors.clear()
        self._by_block.clear()
        self._plan = None
        self._reset_next = False

    def _forget_overwritten(self, batch: Any) -> None:
        """Shorten mirrors whose mirrored positions this batch's writes overwrite."""
        if not self._mirrors:
            return
        bs = self.block_size
        slots = np.asarray(batch.slot_mapping, dtype=np.int64)
        written: dict[int, int] = {}  # block -> lowest offset written
        for block, offset in zip((slots // bs).tolist(), (slots % bs).tolist()):
            written[block] = min(offset, written.get(block, bs))
        for block, offset in written.items():
            for m in self._mirrors:
                index = m.index.get(block)
                if index is not None:
                    m.length = min(m.length, index * bs + offset)

    def _find(self, table: np.ndarray, length: int) -> _Mirror | None:
        """The mirror of the sequence with this block table, shortened to what still matches."""
        bs = self.block_size
        m = self._by_block.pop(int(table[(length - 2) // bs]), None) if length >= 2 else None
        if m is None:
            return None
        common = min(m.length, length - 1)
        nb = -(-common // bs)
        same = m.blocks[:nb] == table[:nb]
        if not same.all():
            common = min(common, int(np.argmin(same)) * bs)
        m.length = common
        return m

    def _arena_for(self, rows: int, capacity: int, have: tuple[int, int]) -> tuple[int, int] | None:
        """The shape of an arena that holds ``rows x capacity`` and all of ``have``: grown in
        steps as far as the budget allows (rows first given up, then positions: an arena grown
        one position per step would be copied every step); None if it cannot be held."""
        have_rows, have_capacity = have
        if rows <= have_rows and capacity <= have_capacity:
            return have
        budget = self.max_positions
        for r in (max(have_rows, -(-rows // self.ROW_STEP) * self.ROW_STEP), max(have_rows, rows)):
            c = max(have_capacity, -(-capacity // self.POS_STEP) * self.POS_STEP)
            if budget is not None:
                c = max(have_capacity, capacity, min(c, budget // r))
            if budget is None or r * c <= budget:
                return r, c
        return None

    def _match(self, tables: np.ndarray, lengths: np.ndarray) -> tuple[list[_Mirror], tuple[int, int] | None]:
        """Each item's mirror (matched, or new in a free row) and the arena shape they need.

        When growing the arena would break the budget, every mirror is dropped and the items
        are matched again to rows ``0..n-1`` of an arena just large enough (copied in full);
        the shape is None when even that is over the budget.
        """
        for fresh in (False, True):
            if fresh:
                self._drop_all()
            found = [self._find(t, n) for t, n in zip(tables, lengths.tolist())]
            taken = {m.row for m in found if m is not None}
            free = (r for r in range(len(found)) if r not in taken)
            mirrors = [m if m is not None else _Mirror(next(free), _NO_BLOCKS, {}, 0) for m in found]
            shape = self._arena_for(max(m.row for m in mirrors) + 1, int(lengths.max()),
                                    (0, 0) if fresh else self.arena_shape)
            if shape is not None:
                break
        return mirrors, shape

    def _next_step(self, batch: Any, items: np.ndarray) -> MirrorPlan | None:
        """The plan of a batch that is the last plan's one token on (decoding's steady state), else None.

        The same sequences in the same order, each one position longer, the blocks their mirrors hold
        unchanged: each writes its next position into its own last block, which no other sequence
        holds (shared blocks are full ones), so no mirror is overwritten and each row takes one copy.
        A few whole-batch comparisons stand in for matching every item again (``_make_plan``).
        """
        last, n = self._plan, len(items)
        if last is None or not last.whole or n != batch.num_items or n != len(last.items):
            return None
        lengths = np.asarray(batch.seq_lens, dtype=np.int64)
        if not np.array_equal(lengths, last.lengths + 1):
            return None
        bs = self.block_size
        tables = np.asarray(batch.block_tables, dtype=np.int64)
        held = -(-last.lengths // bs)  # blocks each mirror holds
        width = int(held.max())
        same = (tables[:, :width] == last._tables[:, :width]) | (np.arange(width)[None, :] >= held[:, None])
        if not same.all():
            return None
        positions = lengths - 1
        written = tables[np.arange(n), positions // bs]
        src = written * bs + positions % bs
        tokens = np.asarray(batch.cu_seqlens_q, dtype=np.int64)[items]
        shape = self._arena_for(last.num_rows, int(lengths.max()), self.arena_shape)
        if shape is None or not np.array_equal(src, np.asarray(batch.slot_mapping, dtype=np.int64)[tokens]):
            return None
        for i in np.flatnonzero(lengths > held * bs).tolist():  # a new block joins these mirrors
            self._mirrors[i].cover(tables[i], int(lengths[i]), bs)
        for m, length in zip(self._mirrors, lengths.tolist()):
            m.length = length
        self._by_block = dict(zip(written.tolist(), self._mirrors))
        self.arena_shape = shape
        return MirrorPlan(
            items, tokens, True, last.rows, lengths, src, last.rows, positions, num_rows=last.num_rows,
            capacity=int(lengths.max()), arena_shape=shape, fresh=True, _tables=tables, _block_size=bs,
        )

    def _make_plan(self, batch: Any, items: np.ndarray) -> MirrorPlan | None:
        """Match ``items`` to mirrors, drop the mirrors no item matched, give the rest free rows
        (None, and no mirrors kept, when the arena cannot hold them within the budget)."""
        bs = self.block_size
        tables = (batch.block_tables if len(items) == batch.num_items else batch.block_tables[items]).astype(np.int64)
        lengths = np.asarray(batch.seq_lens, dtype=np.int64)[items]
        mirrors, shape = self._match(tables, lengths)
        if shape is None:  # the arena keeps its memory (and shape) for a later batch that fits
            self._drop_all()
            return None
        self.arena_shape = shape
        self._mirrors = mirrors
        self._by_block = {}
        # Each item copies positions [its mirror's length, its length): all items' ranges at once.
        rows = np.array([m.row for m in mirrors], dtype=np.int64)
        starts = np.array([m.length for m in mirrors], dtype=np.int64)
        counts = lengths - starts
        item = np.repeat(np.arange(len(mirrors)), counts)
        dst_pos = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts - starts, counts)
        src = tables[item, dst_pos // bs] * bs + dst_pos % bs
        for m, table, length in zip(mirrors, tables, lengths.tolist()):
            m.cover(table, length, bs)
            self._by_block[int(m.blocks[-1])] = m
        tokens = np.asarray(batch.cu_seqlens_q, dtype=np.int64)[items]
        fresh = bool((counts == 1).all() and (src == np.asarray(batch.slot_mapping)[tokens]).all())
        return MirrorPlan(
            items, tokens, len(items) == batch.num_items, rows, lengths, src, rows[item], dst_pos,
            num_rows=max(m.row for m in mirrors) + 1, capacity=int(lengths.max()), arena_shape=shape,
            fresh=fresh, _tables=tables, _block_size=bs,
        )
