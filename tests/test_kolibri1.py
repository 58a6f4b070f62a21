"""Aleph Alpha's Kolibri-1 (``kolibri1``): its router, which adds the correction bias to the float32 logits to choose
and weighs the chosen experts by their logits' sigmoids (``SIGMOID_LOGITS_CORRECTED``, plugin API 1.23), against
transformers' Kolibri1TopKRouter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.kolibri1.modeling_kolibri1 import Kolibri1TopKRouter

from ferrum.moe.routing import NOAUX_TC, SIGMOID_LOGITS_CORRECTED, route_grouped

EXPERTS, TOP_K = 16, 4


def _router(normalize: bool) -> Kolibri1TopKRouter:
    config = transformers.Kolibri1Config(hidden_size=32, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                         norm_topk_prob=normalize)
    torch.manual_seed(0)
    router = Kolibri1TopKRouter(config).eval()
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.e_score_correction_bias.normal_(0, 1.0)  # as wide as the logits: it changes the choice
    return router


def _by_id(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


@pytest.mark.parametrize("normalize", [False, True])
def test_routing_rule_is_transformers_router(normalize):
    router = _router(normalize)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, scores, indices = router(x)
    bias = router.e_score_correction_bias.numpy()
    logits = logits.numpy()
    want = _by_id(indices.numpy(), scores.numpy())
    got = _by_id(*route_grouped(logits, bias, TOP_K, 1, 1, normalize, 1.0, SIGMOID_LOGITS_CORRECTED))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    # control: DeepSeek-V3's rule, the bias added to the sigmoids, chooses other experts for some tokens
    other = _by_id(*route_grouped(logits, bias, TOP_K, 1, 1, normalize, 1.0, NOAUX_TC))
    assert not np.array_equal(other[0], want[0])
