"""Upstage's Solar Open (``solar_open``): Llama's attention with q/k/v biased by attention_bias (o never), rope over
whole heads, DeepSeek-V3's grouped sigmoid routing with a float32 router and correction
bias, and an ungated shared expert, on every layer; against transformers' SolarOpenForCausalLM on every runnable
backend, and mlx-lm's solar_open (its glm4_moe) and its conversions.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import assert_forward_and_decode_match, reference_logits, runnable_backends, saved_references

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]


def solar_config(**extra) -> transformers.SolarOpenConfig:
    settings = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                    n_shared_experts=1, max_position_embeddings=256, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.SolarOpenConfig(**{**settings, **extra})


#: The release's layout (one group, unscaled weights); and groups, a scale, biased q/k/v, two shared experts (untied
#: embeddings both: mlx-lm's glm4_moe, which runs solar_open, has no tied head).
VARIANTS = {"release": {}, "grouped": dict(n_group=2, topk_group=1, routed_scaling_factor=2.5, attention_bias=True,
                                           n_shared_experts=2, num_experts_per_tok=3)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, solar_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch, moe = model.config.arch, model.config.arch.moe
    grouped = variant == "grouped"
    assert [spec.mlp for spec in arch.layers] == ["moe", "moe"] and arch.qk_norm is None
    assert (arch.qkv_bias, arch.o_bias, arch.layers[0].rope.rotary_dim) == (grouped, False, 16)
    assert (moe.routing, moe.n_group, moe.routed_scale, moe.shared_expert_size, moe.router_float32) == (
        "sigmoid_grouped", 2 if grouped else 1, 2.5 if grouped else 1.0, 64 if grouped else 32, True)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**solar_config().to_dict(), **changes}


def test_config_is_read_as_transformers_reads_it():
    """num_local_experts is n_routed_experts' alias (it wins where both are given); the defaults are
    SolarOpenConfig's."""
    raw = _raw(n_routed_experts=6, num_local_experts=7)
    assert ModelConfig.from_dict(raw).arch.moe.num_experts == transformers.SolarOpenConfig(**raw).num_local_experts
    defaults = {k: v for k, v in _raw().items() if k not in (
        "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "head_dim", "n_group", "topk_group",
        "norm_topk_prob", "routed_scaling_factor", "n_shared_experts", "rope_parameters")}
    defaults["hidden_size"] = 4 * 128  # heads of the default head_dim
    config, want = ModelConfig.from_dict(defaults), transformers.SolarOpenConfig(**defaults)
    moe = config.arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size, moe.normalize, config.head_dim) == (
        want.n_routed_experts, want.num_experts_per_tok, want.moe_intermediate_size,
        want.moe_intermediate_size * want.n_shared_experts, want.norm_topk_prob, want.head_dim) == (
        128, 8, 1280, 1280, True, 128)
    assert config.arch.layers[0].rope.theta == want.rope_parameters["rope_theta"] == 1e6


@pytest.mark.parametrize("changes, error, words", [
    ({"num_experts_per_tok": 9}, ConfigError, "'num_experts_per_tok' (9) exceeds the 8 experts"),
    ({"n_group": 3}, ConfigError, "'n_group' (3) must divide the 8 routed experts"),
    ({"first_k_dense_replace": 1}, UnsupportedFeatureError, "makes every layer sparse and ignores it"),
    ({"use_qk_norm": True}, UnsupportedFeatureError, "never norms q and k"),
    # transformers' SolarOpen rotates whole heads (a partial factor makes its rope fail on shapes)
    ({"partial_rotary_factor": 0.5}, UnsupportedFeatureError, "'partial_rotary_factor'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     UnsupportedFeatureError, "sets partial_rotary_factor 0.5"),
    ({"hidden_act": "gelu"}, UnsupportedFeatureError, "'hidden_act'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))
