"""Aleph Alpha's Kolibri-1 (``kolibri1``): EXAONE 4's attention (per-head q/k norms, sliding layers rotated, full
layers NoPE) in GLM-4's four-norm blocks, its post-norms and correction bias under the release's names
(``post_attn_norm``, ``post_ffn_norm``, ``moe.router.expert_bias``); on every layer a float32 router whose logits plus
the bias choose the experts, weighed by the logits' sigmoids (``SIGMOID_LOGITS_CORRECTED``, plugin API 1.23), and a
SwiGLU shared expert; against transformers' Kolibri1ForCausalLM on every runnable backend, prompts longer than the
window. The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import transformers
from transformers.models.kolibri1.modeling_kolibri1 import Kolibri1TopKRouter

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.moe.routing import NOAUX_TC, SIGMOID_LOGITS_CORRECTED, route_grouped
from support import (
    assert_forward_and_decode_match, float32_model, reference_logits, runnable_backends, saved_references, scaled_error,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
WINDOW = 4  # shorter than TOKENS
EXPERTS, TOP_K = 16, 4


def kolibri_config(**extra) -> transformers.Kolibri1Config:
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=24,
                    num_experts=8, num_experts_per_tok=3, sliding_window=WINDOW, max_position_embeddings=256)
    return transformers.Kolibri1Config(**{**settings, **extra})


#: The release's layout (every fifth layer full and NoPE, unnormalized weights, untied), and one with its own
#: layer_types, renormalized weights and a tied LM head.
VARIANTS = {"release": {}, "normalized": dict(
    num_hidden_layers=3, norm_topk_prob=True, tie_word_embeddings=True,
    layer_types=["full_attention", "sliding_attention", "full_attention"])}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, kolibri_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = float32_model(folder, backend, block_size=4)
    layers = model.config.arch.layers
    assert {spec.mlp for spec in layers} == {"moe"}
    assert [spec.window for spec in layers] == (
        [WINDOW] * 4 + [None] if variant == "release" else [None, WINDOW, None])
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_checks_the_window_and_the_nope_layers(checkpoints):
    """Making every layer full, or rotating the full layers (their masks unchanged), moves transformers' logits: both
    matter in the comparison above (the correction biases' control is tests/test_moe_families.py's)."""
    folder, hf = checkpoints["release"]
    want = reference_logits(hf, TOKENS)
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(
        folder, layer_types=["full_attention"] * 5).float().eval()
    assert scaled_error(reference_logits(unwindowed, TOKENS), want) > 1e-2
    _, hf = checkpoints["normalized"]
    rotated = copy.deepcopy(hf)
    for full in (0, 2):
        rotated.model.layers[full].self_attn.is_sliding = True  # rope on; its mask is layer_types', still full
    assert scaled_error(reference_logits(rotated, TOKENS), reference_logits(hf, TOKENS)) > 1e-2


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


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**kolibri_config().to_dict(), **changes}


def test_transformers_defaults_are_read():
    """Keys a config leaves out take Kolibri1Config's defaults: 384 experts routed top-6 unnormalized, experts and
    shared expert of 512, a window of 513 on every layer but each fifth."""
    left_out = ("num_local_experts", "num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size",
                "shared_expert_intermediate_size", "sliding_window", "layer_types")
    arch = ModelConfig.from_dict({k: v for k, v in _raw().items() if k not in left_out}).arch
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.normalize, moe.routed_scale) == (384, 6, False, 1.0)
    assert (moe.expert_size, moe.shared_expert_size, moe.routing) == (512, 512, "sigmoid_logits_corrected")
    assert [layer.window for layer in arch.layers] == [513] * 4 + [None]
    assert [layer.rope.rotary_dim for layer in arch.layers] == [16] * 4 + [0]


@pytest.mark.parametrize("changes, error, words", [
    ({"sliding_window": None}, ConfigError, "'sliding_window' must be set when layers use sliding attention"),
    ({"layer_types": ["full_attention"] * 2}, ConfigError, "'layer_types' must list 5 entries"),
    ({"num_experts_per_tok": 9}, ConfigError, "'num_experts_per_tok' (9) exceeds the 8 experts"),
    ({"attention_bias": True}, UnsupportedFeatureError, "'attention_bias'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))
