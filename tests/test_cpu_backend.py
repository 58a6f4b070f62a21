"""The numpy backend's own machinery: paged attention that decodes over contiguous mirrors of the
pool, against a float64 oracle, across block boundaries, the arena's growth, windows, soft-capping
and sequences joining and leaving the batch; and matrix products split across threads, against
numpy's own."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import ferrum_cpu.matmul as matmul
import ferrum_cpu.ops as ops
from ferrum.attention import AttentionBatch
from ferrum.errors import ConfigError
from ferrum.kv_mirror import MirrorBook
from ferrum.testing import arch_oracle

BS, BLOCKS, KV_HEADS, HEADS, D = 16, 48, 2, 6, 16


class Sequences:
    """One layer's pool and, per sequence, its block table and host copy of its K/V."""

    def __init__(self, window: int | None, softcap: float | None):
        self.window, self.softcap = window, softcap
        self.rng = np.random.default_rng(0)
        self.pool = ops.kv_alloc(1, BLOCKS, BS, KV_HEADS, D, "float32")
        self.free = self.rng.permutation(BLOCKS).tolist()  # scattered tables
        self.tables: dict[str, list[int]] = {}
        self.kv: dict[str, np.ndarray] = {}  # [2, length, kv_heads, d]

    def step(self, items: dict[str, int]) -> None:
        """Feed ``items[name]`` new tokens to each named sequence in one batch, then compare."""
        positions, slots, tables, q_lens = [], [], [], []
        for name, count in items.items():
            kv = self.kv.setdefault(name, np.zeros((2, 0, KV_HEADS, D), dtype=np.float32))
            start, end = kv.shape[1], kv.shape[1] + count
            table = self.tables.setdefault(name, [])
            while len(table) * BS < end:
                table.append(self.free.pop())
            positions += range(start, end)
            slots += [table[p // BS] * BS + p % BS for p in range(start, end)]
            tables.append(table)
            q_lens.append(count)
            new = self.rng.standard_normal((2, count, KV_HEADS, D)).astype(np.float32)
            self.kv[name] = np.concatenate([kv, new], axis=1)
        new_kv = np.concatenate([self.kv[name][:, -count:] for name, count in items.items()], axis=1)
        block_tables = np.zeros((len(tables), max(map(len, tables))), dtype=np.int32)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = table
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        seq_lens = np.array([self.kv[name].shape[1] for name in items], dtype=np.int32)
        batch = AttentionBatch(np.array(positions, dtype=np.int32), np.array(slots, dtype=np.int32), cu, seq_lens,
                               block_tables, BS)
        q = 3 * self.rng.standard_normal((int(cu[-1]), HEADS, D)).astype(np.float32)  # scores the cap bends
        ops.kv_write(self.pool, 0, new_kv[0], new_kv[1], batch.slot_mapping)
        got = ops.paged_attention(q, self.pool, 0, batch, D**-0.5, self.window, self.softcap)
        for i, name in enumerate(items):
            k, v = self.kv[name]
            want = arch_oracle.attention(q[cu[i] : cu[i + 1]], k, v, D**-0.5, self.window, self.softcap)
            np.testing.assert_allclose(got[cu[i] : cu[i + 1]], want, atol=3e-5, rtol=1e-4, err_msg=f"{name} {items}")


@pytest.fixture
def small_arena(monkeypatch):
    """Arena capacity (sized by the mirror book) in steps of 8 positions, so that short sequences regrow it
    several times."""
    monkeypatch.setattr(MirrorBook, "POS_STEP", 8)


@pytest.mark.parametrize("window, softcap", [(None, None), (7, None), (40, 2.0), (None, 2.0)])
def test_decode_over_mirrors_matches_the_oracle(small_arena, window, softcap):
    s = Sequences(window, softcap)
    s.step({"a": 37, "b": 3})  # prefill (gathered from the blocks)
    for _ in range(12):  # decode both: mirrors built, then one position copied per step
        s.step({"a": 1, "b": 1})
    s.step({"b": 1})  # a leaves the batch (its mirror is dropped) ...
    s.step({"b": 1, "c": 5})  # ... a prefill chunk joins: no mirrors this step
    for _ in range(3):
        s.step({"c": 1, "a": 1, "b": 1})  # a is mirrored again from scratch; rows change places
    while s.kv["a"].shape[1] < 100:  # the arena grows again, keeping its rows
        s.step({"a": 1, "c": 1})


def test_a_single_sequence_decodes_over_its_mirror_at_every_length(small_arena):
    s = Sequences(None, None)
    s.step({"a": 1})
    for _ in range(70):
        s.step({"a": 1})


def test_dense_attention_takes_a_softcap_and_window():
    rng = np.random.default_rng(1)
    q = 3 * rng.standard_normal((5, HEADS, D)).astype(np.float32)
    k, v = rng.standard_normal((2, 12, KV_HEADS, D)).astype(np.float32)
    got = ops.attention(q, k, v, D**-0.5, 4, 1.5)
    np.testing.assert_allclose(got, arch_oracle.attention(q, k, v, D**-0.5, 4, 1.5), atol=3e-5, rtol=1e-4)


def test_rope_tables_of_two_ropes_do_not_mix():
    """Gemma 3 alternates two ropes layer by layer within one forward: each keeps its own tables."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, HEADS, D)).astype(np.float32)
    positions = np.array([0, 5, 900], dtype=np.int32)
    tables = [(1e4 ** -(np.arange(D // 2) / (D // 2))).astype(np.float32), np.full(D // 2, 0.3, dtype=np.float32)]
    for inv_freq in tables + tables:
        angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
        cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
        x1, x2 = x[..., : D // 2].astype(np.float64), x[..., D // 2 :].astype(np.float64)
        want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        np.testing.assert_allclose(ops.rope(x, positions, inv_freq), want, atol=1e-4, rtol=1e-4)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1 KB, so that even small test matrices are cut into many."""
    monkeypatch.setattr(matmul, "CHUNK_BYTES", 1024)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a helper that dies
@pytest.mark.parametrize("order", ["C", "F"])  # row-major; column-major as upload_weight stores weights
@pytest.mark.parametrize("rows, out_features, in_features",
                         [(1, 3000, 64), (7, 513, 40), (1, 2, 8), (300, 64, 32), (16, 40, 700), (17, 40, 700)])
def test_split_products_equal_numpy(small_chunks, rows, out_features, in_features, order):
    """Cut along the output features (row-major weights, or more than 16 rows) or, for a column-major
    weight and a decode-sized ``x``, along ``in`` with the threads' partial sums added."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    w = np.asarray(rng.standard_normal((out_features, in_features)), dtype=np.float32, order=order)
    splitter = matmul.Splitter(threads=4)
    for _ in range(50):  # helpers waking early and late
        np.testing.assert_allclose(splitter.matmul_t(x, w), x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


def test_weights_are_uploaded_column_major_and_keep_their_shape():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    placed = ops.upload_weight("w", w, "float32")
    assert placed.flags.f_contiguous and placed.shape == (3, 4)
    np.testing.assert_array_equal(placed, w)


def test_a_failing_chunk_raises_in_the_caller(small_chunks):
    splitter = matmul.Splitter(threads=2)
    for order, shape in (("C", (400, 8)), ("F", (8, 400))):  # cut along out, then along in
        w = np.ones(shape, dtype=np.float32, order=order)
        with pytest.raises(ValueError):
            splitter.matmul_t(np.ones((1, shape[1] - 3), dtype=np.float32), w)
        np.testing.assert_array_equal(splitter.matmul_t(np.ones((1, shape[1]), dtype=np.float32), w),
                                      np.full((1, shape[0]), float(shape[1])))


def test_callers_on_several_threads_get_their_own_products(small_chunks):
    splitter = matmul.Splitter(threads=2)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((900, 48)).astype(np.float32)
    xs = [rng.standard_normal((1, 48)).astype(np.float32) for _ in range(4)]
    wrong: list[int] = []

    def call(i: int) -> None:
        for _ in range(50):
            if not np.allclose(splitter.matmul_t(xs[i], w), xs[i] @ w.T, rtol=1e-4, atol=1e-4):
                wrong.append(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_linear_adds_the_bias():
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((2, 16)), rng.standard_normal((4096, 16)), rng.standard_normal(4096)
    x, w, b = (a.astype(np.float32) for a in (x, w, b))
    np.testing.assert_allclose(ops.linear(x, w, b), x @ w.T + b, rtol=1e-4, atol=1e-4)


def test_one_thread_configured_means_no_splitting(monkeypatch):
    monkeypatch.setenv("FERRUM_CPU_THREADS", "1")
    assert matmul._make_matmul_t() is matmul._whole
    monkeypatch.setenv("FERRUM_CPU_THREADS", "2")
    made = matmul._make_matmul_t()
    assert made is matmul._whole or made.splitter.helpers == 1  # whole where numpy's BLAS is not OpenBLAS
    monkeypatch.setenv("FERRUM_CPU_MATMUL", "fast")
    with pytest.raises(ConfigError, match="FERRUM_CPU_MATMUL='fast'.*auto, split, blas"):
        matmul._make_matmul_t()


def _feed(chooser: "matmul.ModeChooser", speed: dict, products: int) -> list[str]:
    """Time ``products`` 1 MB products at ``speed[mode]`` MB/s; the mode each ran in."""
    seen = []
    for _ in range(products):
        seen.append(chooser.mode)
        chooser.record(1.0 / speed[chooser.mode], 1 << 20)
    return seen


def test_the_mode_chooser_keeps_the_faster_mode_and_follows_a_change_of_load():
    applied = []
    chooser = matmul.ModeChooser(applied.append, window=4, interval=2, max_interval=8)
    idle = {"split": 15.0, "blas": 19.0}  # spinning BLAS threads win on an idle machine
    seen = _feed(chooser, idle, 12)
    assert seen[:5] == ["split"] * 4 + ["blas"]  # one window, then a probe of one product that wins
    assert chooser.mode == "blas" and applied[-1] == "blas"
    busy = {"split": 12.0, "blas": 6.0}  # another process holds a core: BLAS's barrier stalls
    seen = _feed(chooser, busy, 200)
    assert seen[100:].count("blas") <= 5 and chooser.mode == "split"  # a probe back won, later ones lose
    probes = [i for i in range(1, len(seen) - 1) if seen[i - 1 : i + 2] == ["split", "blas", "split"]]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert len(probes) >= 3 and gaps == sorted(gaps)  # each lost probe waits longer for the next
    seen = _feed(chooser, idle, 200)
    assert seen[-100:].count("blas") >= 90  # back to BLAS's threads, the split mode only probed


def test_both_modes_compute_the_same_products(small_chunks):
    rng = np.random.default_rng(6)
    w = np.asfortranarray(rng.standard_normal((900, 64)).astype(np.float32))
    x = rng.standard_normal((1, 64)).astype(np.float32)
    threads_set = []
    for mode in ("split", "blas"):
        product = matmul.AdaptiveMatmul(2, threads_set.append, pinned=mode)
        np.testing.assert_allclose(product(x, w), x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)
    assert threads_set[-1] == 2 and 1 in threads_set
