"""gpt-oss's op features on every backend here, against numpy formulas written out below: attention sinks in
``attention`` and in every path of ``paged_attention`` (single item, grouped prefill and decode items, long
items alone, decode steps over the mirrors in and out of order or without them, torch's batches prepared for
FlashAttention), and ``moe_experts`` with expert biases and
the clamped SwiGLU."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.backends import available, load_backend
from ferrum.kv_mirror import MirrorBook
from ferrum.moe.activation import ClampedSwiGLU
from ferrum.moe.experts import PlacedExperts
from ferrum.moe.routing import route
from ferrum.weights import place

from support import attention_batch

BACKENDS = [e.name for e in available() if e.available and e.name in ("cpu", "cuda", "mlx", "jax")]
HEADS, KV_HEADS, D, BS = 6, 2, 8, 4
SCALE = D**-0.5
TOLERANCE = {"float32": dict(atol=2e-5, rtol=1e-4), "bfloat16": dict(atol=3e-2, rtol=3e-2)}


def ops_for(backend: str, dtype: str = "float32"):
    ops = load_backend(backend).ops
    if dtype not in ops.info.dtypes:
        pytest.skip(f"{backend} has no {dtype}")
    return ops


def reference(q, k, v, window=None, softcap=None, sinks=None) -> np.ndarray:
    """One sequence in float64: ``q [q_len, heads, d]``, ``k, v [kv_len, kv_heads, d]``, queries at the last
    positions; ``sinks [heads]`` add ``exp(sinks[h])`` to each softmax's denominator and nothing above it."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    q_len, kv_len = len(q), len(k)
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * SCALE
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    qpos, kpos = np.arange(kv_len - q_len, kv_len)[:, None], np.arange(kv_len)[None, :]
    visible = kpos <= qpos
    if window is not None:
        visible &= kpos > qpos - window
    weights = np.where(visible, np.exp(scores), 0.0)  # small scores: no max to subtract
    total = weights.sum(-1, keepdims=True)
    if sinks is not None:
        total = total + np.exp(np.asarray(sinks, dtype=np.float64))[:, None, None]
    return np.einsum("hqk,khd->qhd", weights / total, v)


def dense(ops, q, k, v, window, sinks):
    put = lambda a: ops.from_numpy(a, "float32")  # noqa: E731
    sink_arg = None if sinks is None else ops.from_numpy(sinks, "float32")
    return ops.to_numpy(ops.attention(put(q), put(k), put(v), SCALE, window, None, sink_arg))


def randn(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------ dense attention


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("q_len, kv_len", [(1, 9), (4, 9), (9, 9), (600, 640)])  # 600: written out in pieces
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_with_sinks_matches_the_formula(backend, q_len, kv_len, window):
    ops = ops_for(backend)
    rng = np.random.default_rng(q_len)
    q, sinks = randn(rng, q_len, HEADS, D), randn(rng, HEADS)
    k, v = randn(rng, kv_len, KV_HEADS, D), randn(rng, kv_len, KV_HEADS, D)
    np.testing.assert_allclose(dense(ops, q, k, v, window, sinks), reference(q, k, v, window, sinks=sinks),
                               **TOLERANCE["float32"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_change_the_output(backend):
    """A head whose sink dwarfs its scores attends to almost nothing; one far below them, as without a sink."""
    ops = ops_for(backend)
    rng = np.random.default_rng(1)
    q, k, v = randn(rng, 4, HEADS, D), randn(rng, 9, KV_HEADS, D), randn(rng, 9, KV_HEADS, D)
    plain = dense(ops, q, k, v, None, None)
    sinks = np.array([30.0, -30.0, 0.0, 30.0, -30.0, 0.0], dtype=np.float32)
    got = dense(ops, q, k, v, None, sinks)
    assert np.abs(got[:, sinks == 30.0]).max() < 1e-6 < np.abs(plain[:, sinks == 30.0]).max()
    np.testing.assert_allclose(got[:, sinks == -30.0], plain[:, sinks == -30.0], atol=1e-5)
    assert np.abs(got[:, sinks == 0.0] - plain[:, sinks == 0.0]).max() > 1e-2


# ------------------------------------------------------------------ paged attention


class PagedScenario:
    """A two-layer pool and its host copy; each step writes the items' new K/V and compares every layer's
    paged attention (each layer with its own sinks) with :func:`reference` per item."""

    def __init__(self, backend: str, window: int | None, softcap: float | None, dtype: str, blocks: int = 64):
        self.ops, self.dtype = ops_for(backend, dtype), dtype
        self.window, self.softcap = window, softcap
        self.rng = np.random.default_rng(0)
        self.pool = self.ops.kv_alloc(2, blocks, BS, KV_HEADS, D, dtype)
        self.host = np.zeros((2, 2, blocks * BS, KV_HEADS, D), dtype=np.float32)
        self.sinks = [randn(self.rng, HEADS) for _ in range(2)]

    def put(self, a: np.ndarray):
        return self.ops.from_numpy(a, self.dtype)

    def rounded(self, a: np.ndarray) -> np.ndarray:
        """``a`` as the backend holds it in this dtype."""
        return self.ops.to_numpy(self.put(a)).astype(np.float32)

    def step(self, items: list[tuple[list[int], int, int]]):
        """``items``: (block table, kv length after the step, query length). Returns the batch."""
        ops = self.ops
        batch = attention_batch(items, BS)
        batch.prepared = ops.prepare_attention_batch(batch)
        cu = batch.cu_seqlens_q
        q = self.rounded(randn(self.rng, int(cu[-1]), HEADS, D))
        for layer, sinks in enumerate(self.sinks):
            kv = self.rounded(randn(self.rng, 2, len(batch.slot_mapping), KV_HEADS, D))
            self.host[layer][:, batch.slot_mapping] = kv
            ops.kv_write(self.pool, layer, self.put(kv[0]), self.put(kv[1]),
                         ops.from_numpy(batch.slot_mapping, None))
            got = ops.to_numpy(ops.paged_attention(self.put(q), self.pool, layer, batch, SCALE, self.window,
                                                   self.softcap, ops.from_numpy(sinks, "float32")))
            for item, (table, n, _) in enumerate(items):
                pos = np.arange(n)
                slots = np.asarray(table)[pos // BS] * BS + pos % BS
                k, v = self.host[layer, 0, slots], self.host[layer, 1, slots]
                rows = slice(int(cu[item]), int(cu[item + 1]))
                want = reference(q[rows], k, v, self.window, self.softcap, sinks)
                np.testing.assert_allclose(got[rows], want, **TOLERANCE[self.dtype],
                                           err_msg=f"layer {layer}, item {item} of {items}")
        return batch


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window, softcap", [(None, None), (3, None), (5, 2.0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_with_sinks_matches_the_formula(backend, window, softcap, dtype):
    s = PagedScenario(backend, window, softcap, dtype)
    a, b, c, d, e = [3, 7, 1, 9, 60], [10, 11, 12, 13, 61], list(range(14, 47)), [50, 51], [52, 48]
    s.step([(a, 9, 9)])  # one prompt
    for n in (10, 11):  # one item decoding, over its mirror
        s.step([(a, n, 1)])
    s.step([(b, 7, 7)])
    s.step([(b, 10, 3)])  # a later chunk of one item: queries after cached keys
    s.step([(a, 12, 1), (b, 13, 3)])  # a decode item and a chunk
    for n in range(3):  # decode steps over the mirrors, rows in order, then swapped
        s.step([(a, 13 + n, 1), (b, 14 + n, 1)])
    s.step([(b, 17, 1), (a, 16, 1)])
    # A long prompt alone, a decode item, and two short prompts padded into one call.
    s.step([(a, 17, 1), (c, 130, 130), (d, 5, 5), (e, 6, 6)])
    s.step([(c, 131, 1), (d, 6, 1), (e, 7, 1), (a, 18, 1)])


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_with_sinks_where_no_mirror_fits(backend, window):
    """Decode steps that the mirror book refuses (no arena positions to spare) gather their keys instead:
    one item over consecutive blocks, sliced from the pool, and several items padded into one call."""
    s = PagedScenario(backend, window, None, "float32")
    if hasattr(s.pool, "mirrors"):
        s.pool.mirrors = MirrorBook(2, BS, max_positions=1)
    a, b = [20, 21, 22], [5, 2]
    s.step([(a, 9, 9)])
    s.step([(a, 10, 1)])
    s.step([(b, 6, 6)])
    for n in range(2):
        s.step([(b, 7 + n, 1), (a, 11 + n, 1)])


@pytest.mark.parametrize("window", [None, 3])
def test_torch_batches_prepared_for_flash_attention_take_sinks_through_it(monkeypatch, window):
    """On a GPU with FlashAttention 2, prefill items attend in its variable-length kernel, sinks too (laid on
    from its log-sum-exp): with the kernel's contract standing in for it, every step matches the formula."""
    if "cuda" not in BACKENDS:
        pytest.skip("no torch backend")
    torch_ops = pytest.importorskip("ferrum_cuda.ops")
    from test_cuda_varlen import kernel_contract

    calls = []
    monkeypatch.setattr(torch_ops, "_flash_varlen_available", lambda: True)
    monkeypatch.setattr(torch_ops, "_flash_kernel", lambda *a: calls.append(1) or kernel_contract(*a))
    s = PagedScenario("cuda", window, None, "bfloat16")
    a, b = [1, 2, 3], [4, 9, 6]
    s.step([(a, 7, 7)])
    for batch in (s.step([(a, 10, 3)]), s.step([(a, 11, 1), (b, 9, 9)])):
        assert batch.prepared.varlen is not None and batch.prepared.without_flash is None
    assert len(calls) == 4  # both layers of both steps


# ------------------------------------------------------------------ experts


def experts_reference(x, ids, weights, gate, up, down, biases, alpha, limit) -> np.ndarray:
    """``sum_j w[t, j] * (down_e @ act(gate_e @ x + bg_e, up_e @ x + bu_e) + bd_e)``, token by token in float64,
    ``act(g, u) = (clip(u, -limit, limit) + 1) * min(g, limit) * sigmoid(alpha * min(g, limit))``."""
    gate_b, up_b, down_b = biases
    out = np.zeros(x.shape, dtype=np.float64)
    for t, row in enumerate(x.astype(np.float64)):
        for e, w in zip(ids[t], weights[t]):
            g = np.minimum(gate[e] @ row + gate_b[e], limit)
            u = np.clip(up[e] @ row + up_b[e], -limit, limit)
            hidden = (u + 1.0) * g / (1.0 + np.exp(-alpha * g))
            out[t] += w * (down[e] @ hidden + down_b[e])
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 70])
@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_with_biases_and_clamped_swiglu_match_the_formula(backend, tokens, dtype):
    ops = ops_for(backend, dtype)
    rng = np.random.default_rng(tokens)
    experts, hidden, inter, alpha, limit = 4, 32, 24, 1.702, 7.0
    # Pre-activations of a few units: the clamps on both the gate and the up projection are hit.
    gate, up = randn(rng, experts, inter, hidden) * 1.5, randn(rng, experts, inter, hidden) * 1.5
    down = randn(rng, experts, hidden, inter) * 0.2
    biases = (randn(rng, experts, inter), randn(rng, experts, inter), randn(rng, experts, hidden))
    x = randn(rng, tokens, hidden)
    ids, weights = route(randn(rng, tokens, experts), 2, True)
    pre_gate, pre_up = (np.einsum("eoi,ti->teo", w, x) for w in (gate, up))
    assert (pre_gate > limit).any() and (np.abs(pre_up) > limit).any()

    if dtype != "float32":  # the reference sees the weights as the backend holds them
        gate, up, down, x = (ops.to_numpy(ops.from_numpy(a, dtype)) for a in (gate, up, down, x))
        biases = tuple(ops.to_numpy(ops.from_numpy(b, dtype)) for b in biases)
    needs = ("biases", "activation")
    stacks = [place(ops, f"experts.{name}", w, dtype, needs=needs)
              for name, w in (("gate", gate), ("up", up), ("down", down))]
    moe = PlacedExperts(stacks[0].linear, *(s.weight for s in stacks),
                        tuple(ops.from_numpy(b, dtype) for b in biases), ClampedSwiGLU(alpha, limit))
    if backend in ("cuda", "mlx"):  # their own moe_experts takes both features
        assert moe.apply is not ops.fallback["moe_experts"]
    got = ops.to_numpy(moe(ops.from_numpy(x, dtype), ops.from_numpy(ids, None), ops.from_numpy(weights, None)))
    want = experts_reference(x, ids, weights, gate, up, down, biases, alpha, limit)
    tolerance = dict(atol=1e-3, rtol=1e-4) if dtype == "float32" else dict(atol=0.01 * np.abs(want).max(), rtol=0.01)
    np.testing.assert_allclose(got, want, **tolerance)
