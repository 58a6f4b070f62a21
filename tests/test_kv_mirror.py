"""Decode through a backend's paged attention over many steps, against a float64 reference, while
blocks are shared, reused by another sequence, rewritten after a truncation (speculative rollback,
preemption) and written behind the batch's back: the cases in which a backend that keeps contiguous
copies (ferrum.kv_mirror) could go stale; and the arena's memory budget."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.attention import AttentionBatch
from ferrum.backends import load_backend
from ferrum.kv_mirror import MirrorBook

from support import attention_batch, paged_reference, runnable_backends

BS, BLOCKS, LAYERS, HEADS, KV_HEADS, D = 4, 24, 2, 6, 2, 8


class Scenario:
    """A pool and its host copy; each step writes new K/V and compares every layer's attention."""

    def __init__(self, backend: str, window: int | None, softcap: float | None = None, blocks: int = BLOCKS,
                 chunk: int | None = None):
        self.ops = load_backend(backend).ops
        self.window, self.softcap, self.chunk = window, softcap, chunk  # chunk: odd layers attend in chunks
        self.rng = np.random.default_rng(0)
        self.pool = self.ops.kv_alloc(LAYERS, blocks, BS, KV_HEADS, D, "float32")
        self.host = np.zeros((LAYERS, 2, blocks * BS, KV_HEADS, D), dtype=np.float32)

    def write(self, layer: int, slots: np.ndarray) -> None:
        kv = self.rng.standard_normal((2, len(slots), KV_HEADS, D)).astype(np.float32)
        self.host[layer, :, slots] = kv.transpose(1, 0, 2, 3)
        put = lambda a: self.ops.from_numpy(a, "float32")  # noqa: E731
        self.ops.kv_write(self.pool, layer, put(kv[0]), put(kv[1]), self.ops.from_numpy(slots.astype(np.int32), None))

    def step(self, items: list[tuple[list[int], int, int]], layers: int = LAYERS) -> None:
        """``items``: (block table, kv length after the step, query length); the first ``layers`` run."""
        batch = attention_batch(items, BS)
        cu, slots = batch.cu_seqlens_q, batch.slot_mapping
        batch.prepared = self.ops.prepare_attention_batch(batch)
        chunked = batch if self.chunk is None else batch.chunked(self.chunk)  # as the model attends chunked layers
        if chunked is not batch:
            chunked.prepared = self.ops.prepare_attention_batch(chunked)
        q = self.rng.standard_normal((int(cu[-1]), HEADS, D)).astype(np.float32)
        for layer in range(layers):
            self.write(layer, slots)
            attended = chunked if layer % 2 else batch
            got = self.ops.to_numpy(
                self.ops.paged_attention(self.ops.from_numpy(q, "float32"), self.pool, layer, attended, D**-0.5,
                                         self.window, self.softcap)
            )
            ref = paged_reference(q, self.host[layer, 0], self.host[layer, 1], attended.cu_seqlens_q,
                                  attended.seq_lens, attended.block_tables, BS, D**-0.5, self.window, self.softcap)
            np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
        book = getattr(self.pool, "mirrors", None)
        if book is not None and book.max_positions is not None:  # the arena's memory stays in its budget
            assert book.arena_positions <= book.max_positions
            arena = getattr(self.pool, "arena", None)  # the numpy backend's own arrays
            if hasattr(arena, "capacity"):
                assert arena.rows * arena.capacity <= book.max_positions


@pytest.mark.parametrize("window, softcap", [(None, None), (3, None), (None, 1.0)])
@pytest.mark.parametrize("backend", runnable_backends())
def test_decode_steps_match_the_reference_as_blocks_change_hands(backend, window, softcap):
    s = Scenario(backend, window, softcap)
    a = [3, 7, 1]
    s.step([(a, 9, 9)])  # prefill A
    for n in range(10, 15):  # decode A across a block boundary (its table grows)
        if n == 13:
            a.append(9)
        s.step([(a, n, 1)])
    b = [3, 7, 12, 14, 15]
    s.step([(b, 10, 2)])  # B shares A's first two blocks
    a.append(5)
    for n in range(3):
        s.step([(a, 15 + n, 1), (b, 11 + n, 1)])
    s.step([(b, 14, 1), (a, 18, 1)])  # items swap places
    c = list(a)  # A is released; C gets A's very blocks and fills them with other K/V
    s.step([(c, 12, 12)])
    s.step([(c, 13, 1)])
    s.step([(c, 14, 1), (b, 15, 1)])
    s.step([(c, 11, 1)])  # C truncated to 10 tokens, then position 10 rewritten
    s.step([(c, 12, 1)])
    s.write(0, np.array([c[0] * BS + 2]))  # a write no batch describes (a second one on layer 0)
    s.step([(c, 13, 1)])
    s.step([(c, 14, 1), (b, 16, 1)])
    s.step([(b, 17, 1), (c, 15, 3)])  # a mixed batch, then decode again
    s.step([(b, 18, 1), (c, 16, 1)])


@pytest.mark.parametrize("window, softcap", [(None, None), (3, None)])
@pytest.mark.parametrize("backend", runnable_backends())
def test_items_decoding_beside_prefills_attend_over_their_mirrors(backend, window, softcap):
    """Batches mixing decodes with prefill chunks: the decoding items keep their mirrors step after step."""
    s = Scenario(backend, window, softcap)
    a, b, c, d = [1, 2, 3, 4], [5, 6, 7], [8, 9, 10], [11, 12, 13]
    s.step([(a, 9, 9)])
    s.step([(a, 10, 1), (b, 6, 6)])  # A decodes beside B's prompt
    s.step([(b, 7, 1), (a, 11, 1), (c, 5, 5)])  # both decode beside C's first chunk
    s.step([(a, 12, 1), (c, 8, 3), (b, 8, 1)])  # C's second chunk between them
    s.step([(a, 13, 1), (b, 9, 1), (c, 9, 1)])  # all decode
    s.step([(d, 6, 6), (c, 10, 1), (a, 14, 1)])  # A's table grows beside D's prompt
    s.step([(c, 11, 1), (d, 7, 1), (b, 10, 1), (a, 15, 1)])


@pytest.mark.parametrize("backend", runnable_backends())
def test_an_interrupted_batch_is_not_trusted(backend):
    """A forward that failed after some layers (the model rolls its KV back) leaves layers behind."""
    s = Scenario(backend, None)
    t = [2, 4]
    s.step([(t, 5, 5)])
    s.step([(t, 6, 1)])
    s.step([(t, 7, 1)], layers=1)  # fails after layer 0
    s.step([(t, 7, 1)])  # the retry
    s.step([(t, 8, 1)])


@pytest.mark.parametrize("window, softcap", [(None, None), (5, None), (None, 1.0)])
@pytest.mark.parametrize("backend", runnable_backends())
def test_long_decode_matches_the_reference_at_every_length(backend, window, softcap):
    """Three sequences of different lengths decode 40 steps each over scattered blocks, crossing
    block boundaries at different steps; one leaves halfway and another takes its place."""
    s = Scenario(backend, window, softcap, blocks=64)
    tables = [list(range(40, 1, -3))[:14], list(range(41, 0, -3))[:14], list(range(0, 64, 3))[:14]]
    lengths = [1, 6, 13]
    s.step([(t, n, n) for t, n in zip(tables, lengths)])
    for step in range(40):
        if step == 20:  # the second leaves; a new one, partly on its freed blocks, joins with a prefill
            tables[1], lengths[1] = [62, 59, 56, 53, 50, 47, 44, 23, 20, 17, 14, 11, 8, 5], 0
            q_lens = [1, 3, 1]
        else:
            q_lens = [1, 1, 1]
        lengths = [n + q for n, q in zip(lengths, q_lens)]
        s.step([(t, n, q) for t, n, q in zip(tables, lengths, q_lens)])


@pytest.mark.parametrize("backend", runnable_backends())
def test_a_batch_over_the_arena_budget_attends_from_the_pool(backend):
    """A pool of 24 blocks x 4 holds 96 positions, so the arena may hold no more: three rows
    padded to the longest sequence soon do not fit, two do again once one sequence leaves."""
    s = Scenario(backend, None)
    a, b, c = list(range(12)), list(range(12, 18)), list(range(18, 24))
    s.step([(a, 30, 30), (b, 10, 10), (c, 10, 10)])
    for step in range(1, 6):  # 3 x 31 and 3 x 32 positions: mirrored; then over the budget: gathered
        s.step([(a, 30 + step, 1), (b, 10 + step, 1), (c, 10 + step, 1)])
    for step in range(1, 4):  # C leaves; 2 x 36: mirrored again, in an arena rebuilt to fit
        s.step([(a, 35 + step, 1), (b, 15 + step, 1)])


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", runnable_backends())
def test_layers_attending_a_chunked_view_keep_the_batchs_mirrors(backend, window):
    """Llama 4's layout: one layer attends the batch, the next its chunked view (``AttentionBatch.chunked``), with
    decode steps crossing chunk boundaries. Both keep the one set of mirrors from step to step (each step copies
    one position a sequence), except after a prompt's piece of one token past a boundary (attended from the pool)."""
    s = Scenario(backend, window, chunk=8, blocks=32)
    a, b, c = [3, 7, 1, 9, 5, 16, 17], [2, 4, 6, 8, 10, 18, 19], [11, 12, 13, 14]
    book = getattr(s.pool, "mirrors", None)
    s.step([(a, 6, 6), (b, 11, 11)])  # a prompt within its first chunk, another across a boundary
    for n in range(1, 14):  # decoding: A crosses the boundaries at 8 and 16, B the one at 16
        s.step([(a, 6 + n, 1), (b, 11 + n, 1)])
        if book is not None and n > 1:
            assert len(book._plan.src) == 2 and book._plan.items.tolist() == [0, 1]  # one copy each: kept
    s.step([(a, 20, 1), (c, 9, 9), (b, 25, 1)])  # C's prompt ends one token into its second chunk: a piece of one
    s.step([(a, 21, 1), (c, 11, 2), (b, 26, 1)])
    s.step([(a, 22, 1), (c, 12, 1), (b, 27, 1)])
    s.step([(a, 23, 1), (c, 13, 1), (b, 28, 1)])
    if book is not None:
        assert len(book._plan.src) == 3  # kept again


def _decode_batch(tables: list[list[int]], lengths: list[int]) -> AttentionBatch:
    n = len(lengths)
    table = np.array(tables, dtype=np.int32)
    slots = np.array([t[(m - 1) // 4] * 4 + (m - 1) % 4 for t, m in zip(tables, lengths)], dtype=np.int32)
    return AttentionBatch(np.array(lengths, dtype=np.int32) - 1, slots, np.arange(n + 1, dtype=np.int32),
                          np.array(lengths, dtype=np.int32), table, 4)


def test_the_book_sizes_the_arena_within_its_budget():
    book = MirrorBook(num_layers=1, block_size=4, max_positions=64)
    plan, _ = book.begin(_decode_batch([[0, 1, 2], [3, 4, 5]], [10, 10]), 0, 1)
    assert plan.arena_shape == (4, 16) and len(plan.src) == 20  # 4 rows; positions up to the budget, not 256
    plan, _ = book.begin(_decode_batch([[0, 1, 2], [3, 4, 5]], [11, 11]), 0, 2)
    assert plan.arena_shape == (4, 16) and plan.dst_pos.tolist() == [10, 10]  # only the new positions
    four = [[i, i + 1, i + 2, i + 3, i + 4] for i in range(0, 20, 5)]
    plan, _ = book.begin(_decode_batch(four, [20, 20, 20, 20]), 0, 3)
    assert plan is None and book.arena_shape == (4, 16)  # 4 x 20 positions: refused, the arena as it was
    plan, _ = book.begin(_decode_batch([list(range(20, 30))], [40]), 0, 4)
    assert plan.arena_shape == (1, 64) and plan.rows.tolist() == [0] and len(plan.src) == 40  # rebuilt: one row
    assert book.arena_positions == 64
    unbounded = MirrorBook(num_layers=1, block_size=4)
    plan, _ = unbounded.begin(_decode_batch([[0, 1, 2], [3, 4, 5]], [10, 10]), 0, 1)
    assert plan.arena_shape == (MirrorBook.ROW_STEP, MirrorBook.POS_STEP)


def test_long_prefills_get_attention_calls_of_their_own_and_rows_come_back_in_order():
    # items: decode (1 x 9), long prompt (6 x 6), short prompt (2 x 2), chunk after a cached prefix (3 x 10)
    q_len, seq_lens = np.array([1, 6, 2, 3]), np.array([9, 6, 2, 10], dtype=np.int32)
    cu = np.concatenate([[0], np.cumsum(q_len)]).astype(np.int32)
    tokens = int(cu[-1])
    batch = AttentionBatch(np.zeros(tokens, np.int32), np.zeros(tokens, np.int32), cu, seq_lens,
                           np.zeros((4, 3), np.int32), 4)
    assert batch.alone(alone_pairs=30).tolist() == [False, True, False, True]
    calls, order = batch.attention_calls(alone_pairs=30)
    assert [c.tolist() for c in calls] == [[1], [3], [2], [0]]  # alone ones, other prefills, then decodes
    # The calls emit item 1's tokens, item 3's, item 2's, then item 0's.
    emitted = np.array([1, 2, 3, 4, 5, 6, 9, 10, 11, 7, 8, 0])
    assert emitted[order].tolist() == list(range(tokens))
    calls, order = batch.attention_calls(alone_pairs=10**6)
    assert [c.tolist() for c in calls] == [[1, 2, 3], [0]]
    assert np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0])[order].tolist() == list(range(tokens))
    prefills = AttentionBatch(np.zeros(8, np.int32), np.zeros(8, np.int32), np.array([0, 6, 8], np.int32),
                              np.array([6, 2], np.int32), np.zeros((2, 2), np.int32), 4)
    calls, order = prefills.attention_calls(alone_pairs=10**6)
    assert [c.tolist() for c in calls] == [[0, 1]] and order is None


def test_a_narrowed_batch_keeps_each_items_last_rows_and_counts_as_its_parent_in_the_book():
    # items: prompt (5 x 5), chunk after a cached prefix (3 x 7), prompt (2 x 2)
    cu, seq_lens = np.array([0, 5, 8, 10], np.int32), np.array([5, 7, 2], np.int32)
    tables = np.array([[1, 2], [3, 4], [5, 0]], np.int32)
    batch = AttentionBatch(np.arange(10, dtype=np.int32), np.arange(10, dtype=np.int32) + 40, cu, seq_lens, tables, 4)
    last = batch.narrowed(np.array([4, 9]))  # the last row of items 0 and 2; item 1 has none
    assert last.cu_seqlens_q.tolist() == [0, 1, 2] and last.seq_lens.tolist() == [5, 2]
    assert last.block_tables.tolist() == [[1, 2], [5, 0]] and last.positions.tolist() == [4, 9]
    assert last.slot_mapping.tolist() == [44, 49] and last.parent is batch
    assert batch.narrowed(np.array([3, 4, 7])).cu_seqlens_q.tolist() == [0, 2, 3]  # suffixes of any length
    for not_suffixes in ([3], [4, 6], [9, 4], [4, 4]):
        with pytest.raises(ValueError):
            batch.narrowed(np.array(not_suffixes))

    # A sequence decoding before and after the pass keeps its mirror: only its new position is copied.
    def decode_step(length):
        return AttentionBatch(np.array([length - 1], np.int32), np.array([24 + length - 1], np.int32),
                              np.array([0, 1], np.int32), np.array([length], np.int32), np.array([[6, 7]], np.int32), 4)

    book = MirrorBook(num_layers=2, block_size=4)
    plans = []
    for writes, (first, second) in enumerate([(decode_step(6),) * 2, (batch, last), (decode_step(7),) * 2], 1):
        plans.append(book.begin(first, 0, writes)[0])
        assert book.begin(second, 1, writes)[0] is plans[-1]
    assert len(plans[0].src) == 6 and not plans[0].fresh  # a new mirror copies the whole sequence
    assert plans[2].src.tolist() == [30] and plans[2].fresh  # then only the token this step writes
    with pytest.raises(ValueError, match="decodes"):  # its decoding items have mirrors to keep in step
        book.begin(decode_step(7).narrowed(np.array([0])), 1, writes=3)


def _random_batches(steps: int, seed: int):
    """Batches of sequences that mostly decode, and now and then join (a prompt), leave (their blocks
    return to the free list and are handed out again), roll back (speculative decoding, preemption)
    or change places: ``AttentionBatch``es as the KV manager would describe them (block size 4)."""
    rng = np.random.default_rng(seed)
    free = list(range(200))
    seqs: list[list] = []  # [block table, length]

    def grow(seq, length):
        while len(seq[0]) * 4 < length:
            seq[0].append(free.pop(int(rng.integers(len(free)))))
        seq[1] = length

    for _ in range(steps):
        for seq in [seq for seq in seqs if seq[1] > 60]:  # finished
            seqs.remove(seq)
            free.extend(seq[0])
        event = rng.random()
        if not seqs or (event < 0.08 and len(seqs) < 8):
            seqs.extend([[], 0] for _ in range(int(rng.integers(1, 4))))  # a burst: the same prompt length
            q_lens_new = int(rng.integers(2, 12))
        else:
            q_lens_new = 0
        if event > 0.94 and len(seqs) > 1:
            table, _ = seqs.pop(int(rng.integers(len(seqs))))
            free.extend(table)
        elif 0.9 < event <= 0.94:
            seq = seqs[int(rng.integers(len(seqs)))]
            seq[1] = max(1, seq[1] - int(rng.integers(1, 6)))  # the next write lands inside the mirror
            free.extend(seq[0][-(-seq[1] // 4):])
            del seq[0][-(-seq[1] // 4):]
        elif 0.86 < event <= 0.9:
            lengths = [seq[1] for seq in seqs]
            twins = [(i, j) for i in range(len(seqs)) for j in range(i) if lengths[i] == lengths[j]]
            if twins:  # the lengths stay as they were: only the block tables tell the swap
                i, j = twins[int(rng.integers(len(twins)))]
                seqs[i], seqs[j] = seqs[j], seqs[i]
            else:
                rng.shuffle(seqs)
        items = []
        for seq in seqs:
            q = q_lens_new if seq[1] == 0 else 1
            grow(seq, seq[1] + q)
            items.append((np.array(seq[0]), seq[1], q))
        q_lens = np.array([q for _, _, q in items])
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        table = np.zeros((len(items), max(len(t) for t, _, _ in items)), dtype=np.int32)
        for row, (blocks, _, _) in enumerate(items):
            table[row, : len(blocks)] = blocks
        positions = np.concatenate([np.arange(n - q, n) for _, n, q in items]).astype(np.int32)
        slots = np.concatenate([t[p // 4] * 4 + p % 4 for t, n, q in items for p in [np.arange(n - q, n)]])
        yield AttentionBatch(positions, slots.astype(np.int32), cu,
                             np.array([n for _, n, _ in items], dtype=np.int32), table, 4)


@pytest.mark.parametrize("seed", range(4))
def test_the_steady_state_shortcut_plans_what_full_matching_plans(seed, monkeypatch):
    """Decoding's steady state (the same sequences, one token on) is planned by a few whole-batch checks
    (``MirrorBook._next_step``) instead of matching every item again: over random batches, with
    sequences joining, leaving, rolling back and changing places, its plans equal full matching's."""
    fast, full = MirrorBook(num_layers=2, block_size=4, max_positions=600), MirrorBook(2, 4, max_positions=600)
    shortcuts = 0
    original = MirrorBook._next_step

    def counted(book, batch, items):
        nonlocal shortcuts
        plan = original(book, batch, items)
        shortcuts += plan is not None
        return plan

    monkeypatch.setattr(full, "_next_step", lambda batch, items: None)
    monkeypatch.setattr(fast, "_next_step", lambda batch, items: counted(fast, batch, items))
    for writes, batch in enumerate(_random_batches(300, seed), 1):
        for layer in range(2):
            got, want = fast.begin(batch, layer, writes), full.begin(batch, layer, writes)
            assert got[1] == want[1]
            assert (got[0] is None) == (want[0] is None)
            if want[0] is not None:
                for name in ("items", "tokens", "rows", "lengths", "src", "dst_row", "dst_pos", "_tables"):
                    np.testing.assert_array_equal(getattr(got[0], name), getattr(want[0], name), err_msg=name)
                for name in ("whole", "num_rows", "capacity", "arena_shape", "fresh"):
                    assert getattr(got[0], name) == getattr(want[0], name), name
                for part_got, part_want in zip(got[0].full(), want[0].full()):
                    np.testing.assert_array_equal(part_got, part_want)
    assert shortcuts > 150  # the steady state is the common case, and the shortcut took it
