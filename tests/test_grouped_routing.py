"""Grouped routing (DeepSeek-V3's sigmoid rule: GLM-4.5, DeepSeek-V3; DeepSeek-V2's softmax rule; Kolibri-1's sigmoid
weights chosen by the logits; A.X-K2's DeepSeek-V3 rule masking dropped groups with 0) in each backend's own
``moe_route``, against the host reference ``route_grouped`` (itself checked against transformers' routers in
test_glm4_moe.py, test_deepseek_v2.py, test_kolibri1.py and test_axk2.py): random logits, choices decided by gaps far
below bfloat16's resolution, one expert group, DeepSeek-V3's sizes, a dropped group chosen whole, and exact ties."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.backends import load_backend
from ferrum.moe.kind import routes_natively
from ferrum.moe.routing import (
    GROUP_LIMITED_GREEDY, NOAUX_TC, NOAUX_TC_ZERO_MASKED, SIGMOID_LOGITS_CORRECTED, GroupedRouting, route_grouped,
)
from support import grouped_routing_backends

NATIVE = grouped_routing_backends()
SCALE = 2.5
#: An optimal 16-mark Golomb ruler: no two pairs of marks have the same difference, so none has the same sum.
RULER = np.array([0, 1, 4, 11, 26, 32, 56, 68, 76, 115, 117, 134, 150, 163, 168, 177])


def _near_ties(rng: np.random.Generator, tokens: int, experts: int) -> np.ndarray:
    """Each row's logits one base plus the ruler's marks, shuffled, in steps of 2e-5: every expert and every
    group (the sum of its two best) apart by a few millionths in score, which bfloat16 would tie, and more than
    the few float32 roundings by which the frameworks' sigmoids differ."""
    marks = np.stack([rng.permutation(RULER[:experts]) for _ in range(tokens)])
    return rng.uniform(-1, 1, (tokens, 1)) + 2e-5 * marks


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray, int, int, int, bool]]:
    """name -> (logits, bias, n_group, topk_group, top_k, whether bfloat16 logits keep the case's meaning)."""
    rng = np.random.default_rng(7)
    rows = rng.uniform(-1, 1, (32, 1)) * np.ones((1, 16))
    cases = {
        "random": (rng.standard_normal((64, 16)) * 2, rng.standard_normal(16) * 0.3, 4, 2, 3, True),
        # corrections below every score: the kept groups' experts choose by negative values, still above the rest
        "negative corrections": (rng.standard_normal((64, 16)) * 2, rng.uniform(-1.5, -1, 16), 4, 2, 3, True),
        "one group": (rng.standard_normal((64, 8)) * 2, rng.standard_normal(8) * 0.3, 1, 1, 2, True),  # GLM-4.5
        "deepseek_v3 sizes": (rng.standard_normal((32, 256)) * 2, rng.standard_normal(256) * 0.05, 8, 4, 8, True),
        "near ties": (_near_ties(rng, 64, 16), np.zeros(16), 4, 2, 3, False),
        "near ties, one group": (_near_ties(rng, 64, 8), np.zeros(8), 1, 1, 3, False),
        # equal logits across each row, the experts set apart by the correction bias alone, in millionths
        "near ties in the bias": (rows, 1e-6 * rng.permutation(RULER), 4, 2, 3, True),
        # negative corrections, one group of four dropped, four chosen: A.X-K2's 0-masked rule takes that group whole
        "dropped group chosen": (rng.standard_normal((64, 16)) * 2, rng.uniform(-1.5, -1, 16), 4, 3, 4, True),
    }
    return {name: (logits.astype(np.float32), bias.astype(np.float32), *rest)
            for name, (logits, bias, *rest) in cases.items()}


CASES = _cases()


def _by_id(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's experts in id order (the order within the chosen k does not matter: their outputs are summed)."""
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


def _route(ops, logits, bias, groups, kept, top_k, normalize, dtype, rule=NOAUX_TC):
    """The backend's ids and weights in id order, and the logits as the backend holds them."""
    assert ops.accepts("moe_route", "routing"), "the backend no longer declares grouped routing"
    x = ops.from_numpy(logits, dtype)
    placed = ops.from_numpy(bias, "float32") if rule.corrected else None
    ids, weights = ops.moe_route(x, None, top_k, normalize, GroupedRouting(groups, kept, SCALE, placed, rule))
    assert ops.to_numpy(weights).dtype == np.float32
    return ops.to_numpy(x), *_by_id(ops.to_numpy(ids).astype(np.int64), ops.to_numpy(weights))


@pytest.mark.parametrize("rule", [NOAUX_TC, GROUP_LIMITED_GREEDY, SIGMOID_LOGITS_CORRECTED, NOAUX_TC_ZERO_MASKED],
                         ids=["noaux_tc", "group_limited_greedy", "sigmoid_logits_corrected", "noaux_tc_zero_masked"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", NATIVE)
def test_native_grouped_routing_matches_the_reference(backend, case, rule):
    ops = load_backend(backend).ops
    if not routes_natively(ops, rule):
        pytest.skip(f"the plugin declares an API older than the rule's {rule.since}: the core routes it")
    logits, bias, groups, kept, top_k, in_bfloat16 = CASES[case]
    if not rule.corrected and "bias" in case:
        pytest.skip("the case's experts differ by their correction bias alone, which this rule has not")
    if rule.dropped_weighed and case == "negative corrections" and (backend, ops.info.device) != ("cuda", "cpu"):
        pytest.skip("3 of the 8 dropped experts' zeros are chosen, tied, which only torch.topk on the CPU breaks as "
                    "the reference does (the next test's)")
    # bfloat16 logits tie exactly where no correction bias parts them: exact ties are the next test's
    in_bfloat16 = in_bfloat16 and rule.corrected
    dtypes = [d for d in ("float32", "bfloat16") if d in ops.info.dtypes and (d == "float32" or in_bfloat16)]
    for dtype in dtypes:
        for normalize in (True, False):
            held, ids, weights = _route(ops, logits, bias, groups, kept, top_k, normalize, dtype, rule)
            want_ids, want_weights = _by_id(*route_grouped(held, bias, top_k, groups, kept, normalize, SCALE, rule))
            np.testing.assert_array_equal(ids, want_ids, err_msg=f"{dtype}, normalize={normalize}")
            np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{dtype}, normalize={normalize}")


def _tied_case() -> tuple[np.ndarray, np.ndarray]:
    """Logits 0 or 30 (sigmoid 0.5 or exactly 1 in float32, in every framework) and biases in quarters: every
    score and sum exact, full of ties between experts and between groups; one row ties everywhere."""
    rng = np.random.default_rng(3)
    logits = rng.integers(0, 2, size=(300, 16)).astype(np.float32) * 30
    logits[0] = 0
    return logits, rng.integers(0, 3, 16).astype(np.float32) * 0.25


@pytest.mark.parametrize("groups, kept, top_k", [(4, 2, 3), (1, 1, 3), (8, 3, 5)])
@pytest.mark.parametrize("backend", NATIVE)
def test_native_grouped_routing_breaks_exact_ties_as_documented(backend, groups, kept, top_k):
    """torch.topk on torch's CPU device picks as the reference replays it. MLX's stable argsort and XLA's top_k
    give boundary ties to the lowest indices: the reference's choice once the correction bias is lowered by a
    step per expert index, too small to reorder anything but exact ties."""
    ops = load_backend(backend).ops
    if backend == "cuda" and ops.info.device != "cpu":
        pytest.skip("torch.topk on a GPU breaks ties its kernel's way, as transformers there does")
    logits, bias = _tied_case()
    lowest_first = bias if backend == "cuda" else bias - 1e-5 * np.arange(16, dtype=np.float32)
    _, ids, weights = _route(ops, logits, bias, groups, kept, top_k, True, "float32")
    want_ids, want_weights = _by_id(*route_grouped(logits, lowest_first, top_k, groups, kept, True, SCALE))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-6)


@pytest.mark.parametrize("rule", [NOAUX_TC, GROUP_LIMITED_GREEDY], ids=["noaux_tc", "group_limited_greedy"])
@pytest.mark.parametrize("backend", NATIVE)
def test_native_grouped_routing_of_no_tokens_gives_no_rows(backend, rule):
    """An empty batch routes to ``[0, k]`` ids and weights, as the reference does (a reshape had to infer the group
    width from zero tokens, and failed)."""
    ops = load_backend(backend).ops
    _, ids, weights = _route(ops, np.zeros((0, 16), np.float32), np.zeros(16, np.float32), 4, 2, 3, True, "float32",
                             rule)
    assert ids.shape == weights.shape == (0, 3)
