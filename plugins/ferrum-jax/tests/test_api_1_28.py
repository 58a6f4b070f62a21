"""The ops of plugin API 1.23-1.28 the plugin runs natively, against Ferrum's host references on random inputs, in
float32 and bfloat16: routing chosen by the logits (1.23) and weighing the chosen experts of dropped groups (1.28),
the RG-LRU (1.25, compiled once per bucket) and the gated delta rule's bounded log-decay (1.27). Each case has a
control: the reference without the feature gives other numbers, so an implementation ignoring it fails."""

from __future__ import annotations

import logging
from dataclasses import replace

import jax
import numpy as np
import pytest

from ferrum.backends import load_backend
from ferrum.moe.routing import NOAUX_TC_ZERO_MASKED, SIGMOID_LOGITS_CORRECTED, GroupedRouting, route_grouped
from ferrum.recurrent import kernels

DTYPES = ("float32", "bfloat16")
SCALE = 2.5


@pytest.fixture(scope="module")
def ops():
    return load_backend("jax").ops


def test_the_ops_are_the_plugins_own_and_declared(ops):
    """The features are handed to the plugin only where it declares their API version (else the core runs them)."""
    assert {"moe_route", "rg_lru", "gated_delta_rule"} <= ops.native
    assert ops.accepts("moe_route", "routing") and ops.accepts("gated_delta_rule", "lower_bound")
    declared = tuple(int(part) for part in ops.info.api_version.split("."))
    assert declared >= max(SIGMOID_LOGITS_CORRECTED.since, NOAUX_TC_ZERO_MASKED.since, (1, 25), (1, 27))


def _route(ops, logits, bias, groups, kept, top_k, normalize, dtype, rule):
    """The plugin's ids and weights in id order, and the logits as it holds them."""
    x = ops.from_numpy(logits, dtype)
    routing = GroupedRouting(groups, kept, SCALE, ops.from_numpy(bias, "float32"), rule)
    ids, weights = (ops.to_numpy(t) for t in ops.moe_route(x, None, top_k, normalize, routing))
    order = np.argsort(ids, axis=1)
    return ops.to_numpy(x), np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


def _reference(held, bias, groups, kept, top_k, normalize, rule):
    ids, weights = route_grouped(held, bias, top_k, groups, kept, normalize, SCALE, rule)
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


def _assert_routes_as_the_reference(ops, logits, bias, groups, kept, top_k, rule, control):
    for dtype in DTYPES:
        for normalize in (True, False):
            held, ids, weights = _route(ops, logits, bias, groups, kept, top_k, normalize, dtype, rule)
            want_ids, want_weights = _reference(held, bias, groups, kept, top_k, normalize, rule)
            np.testing.assert_array_equal(ids, want_ids, err_msg=f"{dtype}, normalize={normalize}")
            np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{dtype}, normalize={normalize}")
            other_ids, other_weights = _reference(held, bias, groups, kept, top_k, normalize, control)
            assert not (np.array_equal(other_ids, want_ids) and np.allclose(other_weights, want_weights)), \
                "the case does not tell the rule from its control"


def test_routing_chosen_by_the_logits(ops):
    """Kolibri-1's rule: the top-k of logits plus a correction bias choose, the sigmoids weigh; choosing by the
    sigmoids plus the bias (NOAUX_TC's way, one group) picks other experts on some rows."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 16)) * 2).astype(np.float32)
    bias = (rng.standard_normal(16) * 0.5).astype(np.float32)
    control = replace(SIGMOID_LOGITS_CORRECTED, choice="scores")
    _assert_routes_as_the_reference(ops, logits, bias, 1, 1, 4, SIGMOID_LOGITS_CORRECTED, control)


@pytest.mark.parametrize("kept, top_k", [(3, 4), (2, 3)], ids=["dropped group chosen", "kept experts chosen"])
def test_routing_that_weighs_the_chosen_experts_of_dropped_groups(ops, kept, top_k):
    """A.X-K2's rule: dropped groups' experts masked with 0, so with the kept experts' corrected scores negative
    the top 4 are a dropped group's whole (no ties among its zeros), each weighed by its sigmoid, where the rule
    weighing them 0 gives other weights; positive corrections keep the choice in the kept groups."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((64, 16)) * 2).astype(np.float32)
    low, high = (-1.5, -1.0) if kept == 3 else (1.0, 1.5)
    bias = rng.uniform(low, high, 16).astype(np.float32)
    control = replace(NOAUX_TC_ZERO_MASKED, dropped_weighed=False)
    if kept == 3:
        _assert_routes_as_the_reference(ops, logits, bias, 4, kept, top_k, NOAUX_TC_ZERO_MASKED, control)
    else:  # nothing dropped is chosen: both rules agree, and the plugin with them
        for dtype in DTYPES:
            held, ids, weights = _route(ops, logits, bias, 4, kept, top_k, True, dtype, NOAUX_TC_ZERO_MASKED)
            want_ids, want_weights = _reference(held, bias, 4, kept, top_k, True, control)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-7)


#: Varlen segments (one empty, one carrying its state, two starting) and a decode step of one token each.
_VARLEN = np.array([0, 1, 9, 9, 14, 21], np.int32)
_VARLEN_STARTS = np.array([True, False, True, False, True])
_DECODE = np.arange(6, dtype=np.int32)


def _rounded(ops, array, dtype):
    """The array as the backend holds it in ``dtype``, and on the host."""
    held = ops.from_numpy(array, dtype)
    return held, ops.to_numpy(held)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cu", [_VARLEN, _DECODE], ids=["varlen", "decode"])
def test_rg_lru_matches_the_host_reference(ops, cu, dtype):
    rng = np.random.default_rng(2)
    tokens, width, batch = int(cu[-1]), 12, len(cu) - 1
    (x, hx), (gx, hgx), (ga, hga) = (_rounded(ops, rng.standard_normal((tokens, width)).astype(np.float32) * s, dtype)
                                     for s in (1, 2, 3))
    a_param = np.linspace(-3, 2, width).astype(np.float32)
    state = rng.standard_normal((batch, width)).astype(np.float32)
    starts = _VARLEN_STARTS if cu is _VARLEN else np.array([True, False, False, True, False])
    held_state = ops.from_numpy(state, "float32")
    y, new_state = ops.rg_lru(x, gx, ga, ops.from_numpy(a_param, "float32"), held_state, cu, starts)
    assert str(y.dtype) == dtype and str(new_state.dtype) == "float32"
    assert np.array_equal(ops.to_numpy(held_state), state), "rg_lru changed the state it was given"
    want_y, want_state = kernels.rg_lru(hx, hgx, hga, a_param, state, cu, starts)
    np.testing.assert_allclose(ops.to_numpy(new_state), want_state, rtol=1e-5, atol=1e-5)
    # y rounded to the compute dtype: within half its ulp of the float32 reference
    ulp = 2.0 ** -8 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(ops.to_numpy(y), want_y, rtol=ulp, atol=ulp)
    never_started, _ = kernels.rg_lru(hx, hgx, hga, a_param, state, cu, np.zeros_like(starts))
    assert not np.allclose(never_started, want_y, rtol=ulp, atol=ulp), "the case does not test the reset"


def test_rg_lru_compiles_once_per_bucket(ops, caplog):
    """Prompts of 13 to 15 tokens in two segments pad to one bucket (16 tokens, a third segment of the padding, 4
    segments, the longest of 16): one compile of the scan, not one per length."""
    rng = np.random.default_rng(3)
    width = 5  # a width no other test uses, so nothing is compiled yet
    a_param, state = ops.from_numpy(np.zeros(width, np.float32), "float32"), ops.from_numpy(
        np.zeros((2, width), np.float32), "float32")
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        for tokens in (13, 14, 15):
            x = ops.from_numpy(rng.standard_normal((tokens, width)).astype(np.float32), "float32")
            ops.rg_lru(x, x, x, a_param, state, np.array([0, 4, tokens], np.int32), np.array([True, True]))
    assert sum("Compiling jit(scan_rg_lru)" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per head", "per key channel"])
def test_gated_delta_rule_with_a_lower_bound_matches_the_host_reference(ops, per_channel, dtype):
    """Ling 3's bounded log-decay over a segment longer than a chunk of the batched rule and a short one."""
    rng = np.random.default_rng(4)
    cu = np.array([0, 3, 27], np.int32)
    heads, dk, dv, tokens = 3, 8, 6, int(cu[-1])
    (q, hq), (k, hk), (v, hv) = (_rounded(ops, rng.standard_normal((tokens, heads, d)).astype(np.float32), dtype)
                                 for d in (dk, dk, dv))
    gate_shape = (tokens, heads, dk) if per_channel else (tokens, heads)
    (a, ha), (b, hb) = (_rounded(ops, rng.standard_normal(shape).astype(np.float32) * 2, dtype)
                        for shape in (gate_shape, (tokens, heads)))
    a_log = np.log(np.array([1.0, 4.0, 16.0], np.float32))
    dt_bias = np.linspace(-1.5, 1.5, heads * (dk if per_channel else 1), dtype=np.float32).reshape(gate_shape[1:])
    state = (rng.standard_normal((2, heads, dk, dv)) * 0.5).astype(np.float32)
    f32 = [ops.from_numpy(t, "float32") for t in (a_log, dt_bias, state)]
    out, new_state = ops.gated_delta_rule(q, k, v, a, b, *f32, cu, 1.0, -5.0)
    assert str(out.dtype) == dtype and str(new_state.dtype) == "float32"
    want_out, want_state = kernels.gated_delta_rule(hq, hk, hv, ha, hb, a_log, dt_bias, state, cu, 1.0, -5.0)
    np.testing.assert_allclose(ops.to_numpy(new_state), want_state, rtol=2e-5, atol=2e-5)
    tol = 2.0 ** -8 if dtype == "bfloat16" else 2e-5
    np.testing.assert_allclose(ops.to_numpy(out), want_out, rtol=tol, atol=tol)
    unbounded, _ = kernels.gated_delta_rule(hq, hk, hv, ha, hb, a_log, dt_bias, state, cu)
    assert not np.allclose(unbounded, want_out, rtol=tol, atol=tol), "the case does not test the bound"
