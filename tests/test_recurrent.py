"""The recurrent mixers' ops against their float64 oracles on every runnable backend (and the kit's checks failing
on wrong ones), and the per-sequence state store: zeros for new sequences, nothing changed by a pass that failed,
batches gathered in any order."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ferrum.backends import load_backend
from ferrum.recurrent import batched, kernels
from ferrum.recurrent.state import RecurrentStates
from ferrum.testing import family_checks
from ferrum.testing.conformance import _Context, _Mismatch
from support import grouped_routing_backends, runnable_backends

CHECKS = (family_checks.check_sigmoid_mul, family_checks.check_causal_conv1d, family_checks.check_gated_delta_rule,
          family_checks.check_ssd_update, family_checks.check_selective_scan)


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_recurrent_ops_match_the_float64_oracle(backend, check):
    assert check(_Context(load_backend(backend), "float32"), 1e-5) <= 1e-5


#: A varlen batch as the engine mixes them: a decode token, a prompt over several chunks of the batched rule (its
#: keys nearly repeating), a short prompt chunk, one a token over two chunks, one two chunks exactly.
_LONG = 4 * batched.CHUNK + 6
_VARLEN = np.cumsum([0, 1, _LONG, 5, 2 * batched.CHUNK + 1, 2 * batched.CHUNK]).astype(np.int32)
_DECODE = np.arange(5, dtype=np.int32)


def _random_batch(cu: np.ndarray) -> tuple[np.ndarray, ...]:
    """Gated DeltaNet's inputs for ``cu``'s segments, GQA (two value heads per q/k head), each segment from a state
    of its own; the long segment's keys nearly repeat (where an unstable chunked solve would lose the state)."""
    rng = np.random.default_rng(int(cu[-1]))
    n, k_heads, v_heads, dk, dv = int(cu[-1]), 2, 4, 16, 8
    q, k = rng.standard_normal((2, n, k_heads, dk)).astype(np.float32)
    if n > _LONG:
        k[1:1 + _LONG] = k[1] + 0.01 * rng.standard_normal((_LONG, k_heads, dk)).astype(np.float32)
    v = rng.standard_normal((n, v_heads, dv)).astype(np.float32)
    a, b = (rng.standard_normal((2, n, v_heads)) * 2).astype(np.float32)
    a_log, dt_bias = np.log(np.array([0.01, 0.3, 2.0, 8.0], np.float32)), np.array([-4.0, -1, 0, 1], np.float32)
    state = (rng.standard_normal((len(cu) - 1, v_heads, dk, dv)) * 0.5).astype(np.float32)
    return q, k, v, a, b, a_log, dt_bias, state


@pytest.mark.parametrize("backend", sorted(set(runnable_backends() + grouped_routing_backends()) - {"cpu"}))
@pytest.mark.parametrize("cu", [_VARLEN, _DECODE], ids=["varlen", "decode"])
def test_native_recurrent_ops_equal_the_numpy_backends(backend, cu):
    """torch, MLX and JAX run the ops themselves (no host round trip) and give the numpy backend's results."""
    ops = load_backend(backend).ops
    assert {"causal_conv1d", "gated_delta_rule", "sigmoid_mul"} <= ops.native
    inputs = _random_batch(cu)
    given = [ops.from_numpy(t, "float32") for t in inputs]
    out, state = ops.gated_delta_rule(*given, cu)
    want_out, want_state = kernels.gated_delta_rule(*inputs, cu)
    np.testing.assert_allclose(ops.to_numpy(out), want_out, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(ops.to_numpy(state), want_state, rtol=1e-4, atol=2e-5)
    assert np.array_equal(ops.to_numpy(given[-1]), inputs[-1]), "the state given was changed"
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((int(cu[-1]), 24)).astype(np.float32), rng.standard_normal((24, 4)).astype(np.float32)
    conv_state = rng.standard_normal((len(cu) - 1, 24, 3)).astype(np.float32)
    y, new_conv = ops.causal_conv1d(*(ops.from_numpy(t, "float32") for t in (x, w, conv_state)), cu, True)
    want_y, want_conv = kernels.causal_conv1d(x, w, conv_state, cu, True)
    np.testing.assert_allclose(ops.to_numpy(y), want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ops.to_numpy(new_conv), want_conv)


def _scan_inputs(cu: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mamba-1's selective scan inputs for ``cu``'s segments, each from a state of its own."""
    rng = np.random.default_rng(int(cu[-1]) + 1)
    n, channels, size = int(cu[-1]), 12, 8
    x, dt = rng.standard_normal((2, n, channels)).astype(np.float32)
    b, c = rng.standard_normal((2, n, size)).astype(np.float32)
    a_log = rng.standard_normal((channels, size)).astype(np.float32)
    d, dt_bias = rng.standard_normal((2, channels)).astype(np.float32)
    state = rng.standard_normal((len(cu) - 1, channels, size)).astype(np.float32)
    return x, dt, a_log, b, c, d, dt_bias, state


@pytest.mark.parametrize("backend", sorted(set(runnable_backends() + grouped_routing_backends()) - {"cpu"}))
@pytest.mark.parametrize("cu", [_VARLEN, _DECODE], ids=["varlen", "decode"])
def test_native_selective_scans_equal_the_numpy_backends(backend, cu):
    ops = load_backend(backend).ops
    assert "selective_scan" in ops.native
    inputs = _scan_inputs(cu)
    given = [ops.from_numpy(t, "float32") for t in inputs]
    y, state = ops.selective_scan(*given, cu)
    want_y, want_state = kernels.selective_scan(*inputs, cu)
    np.testing.assert_allclose(ops.to_numpy(y), want_y, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(ops.to_numpy(state), want_state, rtol=1e-4, atol=2e-5)
    assert np.array_equal(ops.to_numpy(given[-1]), inputs[-1]), "the state given was changed"


@pytest.mark.parametrize("cu", [_VARLEN, _DECODE, np.array([0, 3, 3, 7], np.int32)], ids=["varlen", "decode", "empty"])
def test_the_batched_formulation_padded_to_buckets_gives_the_kernels_results(cu):
    """Padding tokens, sequences and chunks up to powers of two (as JAX does, to bound its compiles) changes nothing,
    here on numpy arrays; a segment of no tokens keeps its state."""
    numpy = batched.Framework(np, np.asarray, lambda x, dtype: x.astype(dtype),
                              bucket=lambda n: 1 << (max(n, 1) - 1).bit_length())
    inputs = _random_batch(cu)
    for got, want in zip(batched.gated_delta_rule(numpy, *inputs, cu), kernels.gated_delta_rule(*inputs, cu)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    inputs = _scan_inputs(cu)
    for got, want in zip(batched.selective_scan(numpy, *inputs, cu), kernels.selective_scan(*inputs, cu)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    rng = np.random.default_rng(2)
    shapes = ((cu[-1], 24), (24, 4), (len(cu) - 1, 24, 3))
    x, w, state = (rng.standard_normal(shape).astype(np.float32) for shape in shapes)
    conv = batched.causal_conv1d(numpy, x, w, state, cu, True)
    for got, want in zip(conv, kernels.causal_conv1d(x, w, state, cu, True)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _with(**ops) -> _Context:
    c = _Context(load_backend("cpu"), "float32")
    base = c.ops
    c.ops = SimpleNamespace(from_numpy=base.from_numpy, to_numpy=base.to_numpy, **ops)
    return c


def test_the_kit_catches_a_convolution_that_ignores_the_state():
    def fresh(x, weight, state, cu, silu):
        return kernels.causal_conv1d(x, weight, np.zeros_like(state), cu, silu)

    with pytest.raises(_Mismatch):
        family_checks.check_causal_conv1d(_with(causal_conv1d=fresh), 1e-5)


def test_the_kit_catches_a_rule_without_its_decay_or_one_writing_the_state_in_place():
    def undecayed(q, k, v, a, b, a_log, dt_bias, state, cu):
        return kernels.gated_delta_rule(q, k, v, a, b, np.full_like(a_log, -30.0), dt_bias, state, cu)

    def in_place(q, k, v, a, b, a_log, dt_bias, state, cu):
        out, new = kernels.gated_delta_rule(q, k, v, a, b, a_log, dt_bias, state, cu)
        state[...] = new
        return out, new

    with pytest.raises(_Mismatch):
        family_checks.check_gated_delta_rule(_with(gated_delta_rule=undecayed), 1e-5)
    with pytest.raises(AssertionError, match="changed the state"):
        family_checks.check_gated_delta_rule(_with(gated_delta_rule=in_place), 1e-5)


def test_the_kit_catches_a_scan_without_its_step_limit_skip_or_grouping():
    """Each is a plausible port's slip: the dt limits left out (decode's path in transformers), the D skip dropped,
    B / C groups served to heads round robin rather than in blocks."""
    def unclipped(x, dt, a_log, b, c, d, dt_bias, state, cu, lo, hi):
        return kernels.ssd_update(x, dt, a_log, b, c, d, dt_bias, state, cu, 0.0, np.inf)

    def no_skip(x, dt, a_log, b, c, d, dt_bias, state, cu, lo, hi):
        return kernels.ssd_update(x, dt, a_log, b, c, np.zeros_like(d), dt_bias, state, cu, lo, hi)

    def round_robin(x, dt, a_log, b, c, d, dt_bias, state, cu, lo, hi):
        heads = np.shape(x)[1]
        b, c = (np.tile(t, (1, heads // np.shape(t)[1], 1)) for t in (b, c))
        return kernels.ssd_update(x, dt, a_log, b, c, d, dt_bias, state, cu, lo, hi)

    for wrong in (unclipped, no_skip, round_robin):
        with pytest.raises(_Mismatch):
            family_checks.check_ssd_update(_with(ssd_update=wrong), 1e-5)


def test_the_kit_catches_a_selective_scan_without_its_step_bias_or_skip_or_with_b_and_c_swapped():
    """Plausible slips of a port: dt_proj's bias left out (transformers adds it inside the scan), the D skip
    dropped, B and C read the wrong way round."""
    def unbiased(x, dt, a_log, b, c, d, dt_bias, state, cu):
        return kernels.selective_scan(x, dt, a_log, b, c, d, np.zeros_like(dt_bias), state, cu)

    def no_skip(x, dt, a_log, b, c, d, dt_bias, state, cu):
        return kernels.selective_scan(x, dt, a_log, b, c, np.zeros_like(d), dt_bias, state, cu)

    def swapped(x, dt, a_log, b, c, d, dt_bias, state, cu):
        return kernels.selective_scan(x, dt, a_log, c, b, d, dt_bias, state, cu)

    for wrong in (unbiased, no_skip, swapped):
        with pytest.raises(_Mismatch):
            family_checks.check_selective_scan(_with(selective_scan=wrong), 1e-5)


def test_kernels_carry_a_segment_split_anywhere_as_one_segment():
    """Prefill chunks: a sequence run in two segments (the state carried between) gives what one run gives."""
    rng = np.random.default_rng(1)
    n, cut = 9, 4
    q, k = rng.standard_normal((2, n, 2, 8)).astype(np.float32)
    v, (a, b) = rng.standard_normal((n, 4, 6)).astype(np.float32), rng.standard_normal((2, n, 4)).astype(np.float32)
    a_log, dt_bias = np.log(np.array([0.1, 1.0, 3.0, 9.0], np.float32)), np.zeros(4, np.float32)
    zero = np.zeros((1, 4, 8, 6), np.float32)
    whole, whole_state = kernels.gated_delta_rule(q, k, v, a, b, a_log, dt_bias, zero, np.array([0, n]))
    first, mid = kernels.gated_delta_rule(q[:cut], k[:cut], v[:cut], a[:cut], b[:cut], a_log, dt_bias, zero,
                                          np.array([0, cut]))
    rest, end = kernels.gated_delta_rule(q[cut:], k[cut:], v[cut:], a[cut:], b[cut:], a_log, dt_bias, mid,
                                         np.array([0, n - cut]))
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(end, whole_state, rtol=1e-5, atol=1e-6)
    x, w = rng.standard_normal((n, 5)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    y, conv_end = kernels.causal_conv1d(x, w, np.zeros((1, 5, 2), np.float32), np.array([0, n]), True)
    y1, conv_mid = kernels.causal_conv1d(x[:cut], w, np.zeros((1, 5, 2), np.float32), np.array([0, cut]), True)
    y2, conv_end2 = kernels.causal_conv1d(x[cut:], w, conv_mid, np.array([0, n - cut]), True)
    np.testing.assert_allclose(np.concatenate([y1, y2]), y, rtol=1e-6)
    np.testing.assert_array_equal(conv_end2, conv_end)
    x, dt, (b, c) = (rng.standard_normal((n, 4, 3)).astype(np.float32), rng.standard_normal((n, 4)).astype(np.float32),
                     rng.standard_normal((2, n, 2, 5)).astype(np.float32))
    ssd = (a_log, np.ones(4, np.float32), dt_bias)
    zero = np.zeros((1, 4, 3, 5), np.float32)

    def scan(lo, hi, state):
        return kernels.ssd_update(x[lo:hi], dt[lo:hi], ssd[0], b[lo:hi], c[lo:hi], ssd[1], ssd[2], state,
                                  np.array([0, hi - lo]), 0.0, np.inf)

    whole, whole_state = scan(0, n, zero)
    first, mid = scan(0, cut, zero)
    rest, end = scan(cut, n, mid)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(end, whole_state, rtol=1e-5, atol=1e-6)


@pytest.fixture
def store():
    ops = load_backend("cpu").ops
    return RecurrentStates(ops, {1: (((2, 3), "float32"), ((2,), "float32"))})


def _stage(store, seq_ids, values):
    states = (np.stack([np.full((2, 3), v, np.float32) for v in values]),
              np.stack([np.full(2, v, np.float32) for v in values]))
    store.stage(1, seq_ids, states)
    return states


def test_states_start_at_zero_and_are_kept_only_when_committed(store):
    conv, rec = store.gather(1, ["a", "b"])
    assert conv.shape == (2, 2, 3) and rec.shape == (2, 2) and not conv.any() and not rec.any()
    _stage(store, ["a", "b"], [1.0, 2.0])
    store.discard()
    assert not store.gather(1, ["a"])[0].any() and "a" not in store
    _stage(store, ["a", "b"], [1.0, 2.0])
    store.commit()
    assert store.gather(1, ["b"])[0][0, 0, 0] == 2.0 and "a" in store


def test_a_batch_gathers_its_states_in_its_own_order_and_reuses_an_unchanged_batch(store):
    staged = _stage(store, ["a", "b"], [1.0, 2.0])
    store.commit()
    assert store.gather(1, ["a", "b"]) is staged  # the decode batch of the last pass: nothing to gather
    conv, rec = store.gather(1, ["b", "new", "a"])
    assert conv[:, 0, 0].tolist() == [2.0, 0.0, 1.0] and rec[:, 0].tolist() == [2.0, 0.0, 1.0]
    _stage(store, ["c"], [5.0])
    store.commit()
    assert store.gather(1, ["c", "a"])[1][:, 0].tolist() == [5.0, 1.0]


def test_released_and_pruned_sequences_start_from_zero_again(store):
    _stage(store, ["a", "b", "c"], [1.0, 2.0, 3.0])
    store.commit()
    store.release("a")
    store.prune({"b"})
    assert "a" not in store and "c" not in store and "b" in store
    assert store.gather(1, ["a", "b", "c"])[1][:, 0].tolist() == [0.0, 2.0, 0.0]
