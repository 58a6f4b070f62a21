"""Decode through a backend's paged attention over many steps, against the oracle, while blocks
are shared, reused by another sequence, rewritten after a truncation and written behind the
batch's back: the cases in which a backend that keeps contiguous copies (ferrum.kv_mirror)
could go stale."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.attention import AttentionBatch
from ferrum.backends import load_backend
from ferrum.testing import oracle

from support import runnable_backends

BS, BLOCKS, LAYERS, HEADS, KV_HEADS, D = 4, 24, 2, 6, 2, 8


class Scenario:
    """A pool and its host copy; each step writes new K/V and compares every layer's attention."""

    def __init__(self, backend: str, window: int | None):
        self.ops = load_backend(backend).ops
        self.window = window
        self.rng = np.random.default_rng(0)
        self.pool = self.ops.kv_alloc(LAYERS, BLOCKS, BS, KV_HEADS, D, "float32")
        self.host = np.zeros((LAYERS, 2, BLOCKS * BS, KV_HEADS, D), dtype=np.float32)

    def write(self, layer: int, slots: np.ndarray) -> None:
        kv = self.rng.standard_normal((2, len(slots), KV_HEADS, D)).astype(np.float32)
        self.host[layer, :, slots] = kv.transpose(1, 0, 2, 3)
        put = lambda a: self.ops.from_numpy(a, "float32")  # noqa: E731
        self.ops.kv_write(self.pool, layer, put(kv[0]), put(kv[1]), self.ops.from_numpy(slots.astype(np.int32), None))

    def step(self, items: list[tuple[list[int], int, int]], layers: int = LAYERS) -> None:
        """``items``: (block table, kv length after the step, query length); the first ``layers`` run."""
        q_lens = np.array([q for _, _, q in items])
        seq_lens = np.array([n for _, n, _ in items], dtype=np.int32)
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        table = np.zeros((len(items), max(len(t) for t, _, _ in items)), dtype=np.int32)
        for row, (blocks, _, _) in enumerate(items):
            table[row, : len(blocks)] = blocks
        positions = np.concatenate([np.arange(n - q, n) for _, n, q in items]).astype(np.int32)
        slots = np.concatenate(
            [[t[p // BS] * BS + p % BS for p in range(n - q, n)] for t, n, q in items]
        ).astype(np.int32)
        batch = AttentionBatch(positions, slots, cu, seq_lens, table, BS)
        batch.prepared = self.ops.prepare_attention_batch(batch)
        q = self.rng.standard_normal((int(cu[-1]), HEADS, D)).astype(np.float32)
        for layer in range(layers):
            self.write(layer, slots)
            got = self.ops.to_numpy(
                self.ops.paged_attention(self.ops.from_numpy(q, "float32"), self.pool, layer, batch, D**-0.5,
                                         self.window)
            )
            kb, vb = (self.host[layer, i].reshape(BLOCKS, BS, KV_HEADS, D) for i in (0, 1))
            tables = [t for t, _, _ in items]
            ref = oracle.paged_attention(q, kb, vb, cu, seq_lens, tables, D**-0.5, self.window)
            np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", runnable_backends())
def test_decode_steps_match_the_oracle_as_blocks_change_hands(backend, window):
    s = Scenario(backend, window)
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
