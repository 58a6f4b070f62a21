"""Kwai's Klear (``Klear``; no transformers class, its release ships remote code): Qwen 3's blocks (per-head q/k norms
before rope, every attention projection biased by attention_bias) over sigmoid routing chosen with a per-expert bias,
and shared experts mixed with the routed ones by the softmax of a learned ``coefficient``; against mlx-lm's Klear in
float32 on every runnable backend (and the JAX plugin), the release's names and mlx-lm's conversions, plain and
packed."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import (
    assert_conversion_runs_as_mlx_lm, assert_engine_keeps_mlx_lm_greedy_tokens, model_logits, normal,
    random_mlx_lm_model, unstacked, with_zeroed, write_release,
)
from support import assert_forward_and_decode_match, float32_model, runnable_backends, scaled_error

pytest.importorskip("mlx_lm")
BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def klear_config(**extra) -> dict:
    """A tiny config with every key mlx-lm's Klear requires (its ModelArgs has no defaults)."""
    settings = dict(model_type="Klear", architectures=["KlearForCausalLM"], vocab_size=VOCAB, hidden_size=64,
                    intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, num_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=256,
                    rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False, hidden_act="silu",
                    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    return {**settings, **extra}


#: The release's layout (every layer sparse, renormalized weights); and a dense first layer, biased attention, the
#: weights as they are, two shared experts.
VARIANTS = {"release": {}, "dense_first": dict(mlp_only_layers=[0], attention_bias=True, norm_topk_prob=False,
                                               n_shared_experts=2)}


def as_released(tensors: dict) -> dict:
    """mlx-lm's Klear names -> the release's: its sanitize stacks ``mlp.experts.{e}.*`` into ``mlp.experts.*``."""
    return unstacked(tensors, "experts", "experts")


def build_checkpoints(tmp_path_factory) -> dict:
    """variant -> (the release's folder, mlx-lm's model of it), the expert biases large enough to change choices."""
    out = {}
    for variant, extra in VARIANTS.items():
        config = klear_config(**extra)
        model = random_mlx_lm_model(config, draw=normal(stds={"expert_bias": 0.5}))
        folder = tmp_path_factory.mktemp(variant)
        write_release(folder, model, config, TOKENS, as_released)
        out[variant] = folder, model
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", [*BACKENDS, "jax"])
def test_model_matches_mlx_lm(checkpoints, backend, variant):
    folder, reference = checkpoints[variant]
    model = float32_model(folder, backend, block_size=4)
    arch, moe = model.config.arch, model.config.arch.moe
    release = variant == "release"
    assert [spec.mlp for spec in arch.layers] == (["moe"] * 3 if release else ["dense", "moe", "moe"])
    assert (arch.qk_norm, arch.qkv_bias, arch.o_bias) == ("head", not release, not release)
    assert (moe.routing, moe.normalize, moe.correction_bias, moe.shared_expert_size, moe.shared_mix) == (
        "sigmoid_grouped", release, "expert_bias", 32 if release else 64, "coefficient")
    assert_forward_and_decode_match(model, TOKENS, model_logits(reference, TOKENS))


def test_engine_keeps_greedy_tokens(checkpoints):
    assert_engine_keeps_mlx_lm_greedy_tokens(*checkpoints["release"], VOCAB)


@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(checkpoints, tmp_path, bits):
    """mlx-lm's conversion (experts stacked under mlp.experts, the expert bias in float32; packed, the router at 8
    bits in groups of 64 and the coefficient with the rest) runs on every backend as mlx-lm runs it."""
    stored = assert_conversion_runs_as_mlx_lm(*checkpoints["release"], tmp_path / "mlx", TOKENS, bits)
    assert "model.layers.1.mlp.experts.gate_proj.weight" in stored and not [n for n in stored if ".experts.0." in n]
    assert stored["model.layers.1.mlp.expert_bias"].dtype == np.float32
    for name in ("model.layers.1.mlp.gate.scales", "model.layers.1.mlp.coefficient.scales"):
        assert (name in stored) == (bits is not None)


# ------------------------------------------------------------------ controls


@pytest.mark.parametrize("part", ["expert_bias", "coefficient"])
def test_the_expert_bias_and_the_coefficients_count(checkpoints, part):
    """Controls: the expert biases zeroed (every choice by the scores alone) or the coefficient zeroed (the routed
    and shared outputs halved, not weighed), mlx-lm's logits move."""
    _, reference = checkpoints["release"]
    assert scaled_error(model_logits(with_zeroed(reference, part), TOKENS), model_logits(reference, TOKENS)) > 1e-2


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("changes, error, words", [
    (dict(norm_topk_prob=None), ConfigError, "'norm_topk_prob' must be set"),
    (dict(mlp_only_layers=None), ConfigError, "'mlp_only_layers' must be set"),
    (dict(attention_bias=None), ConfigError, "'attention_bias' must be set"),
    (dict(num_experts=None), ConfigError, "'num_experts' must be set"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), UnsupportedFeatureError, "rope type 'linear'"),
    (dict(tie_word_embeddings=True), UnsupportedFeatureError, "tie_word_embeddings"),
    (dict(num_experts_per_tok=9), ConfigError, "num_experts_per_tok"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(klear_config(**changes))
