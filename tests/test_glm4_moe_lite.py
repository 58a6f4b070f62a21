"""GLM-4.7-Flash (``glm4_moe_lite``): DeepSeek-V3's latent attention over GLM-4.5's grouped sigmoid MoE, its dense
and sparse layers listed by ``mlp_layer_types``; against transformers' own model on every runnable backend.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import transformers

import ferrum
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, reference_logits, runnable_backends, saved_references, scaled_error,
    with_prediction_layer, without_correction_biases,
)

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}


def lite_config(**extra) -> transformers.Glm4MoeLiteConfig:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                    num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                    max_position_embeddings=256, routed_scaling_factor=1.8, norm_topk_prob=True, rms_norm_eps=1e-5)
    return transformers.Glm4MoeLiteConfig(**{**settings, **extra})


#: GLM-4.7-Flash's layout (the first layer dense, by mlp_layer_types' default); a dense layer between sparse ones,
#: a plain q_proj and rotate-half rope; YaRN with mscale_all_dim.
VARIANTS = {
    "flash": {},
    "layer_types": dict(mlp_layer_types=["sparse", "dense", "sparse"], q_lora_rank=None, rope_interleave=False,
                        n_group=1, topk_group=1, norm_topk_prob=False, n_shared_experts=2),
    "yarn": dict(rope_parameters=YARN),
}
DENSE = {"flash": [0], "layer_types": [1], "yarn": [0]}


def build_checkpoints(tmp_path_factory) -> dict:
    """variant -> (folder, transformers model): random weights, random correction biases that change which experts
    the routers choose."""
    return saved_references(tmp_path_factory, VARIANTS, lite_config)


# ------------------------------------------------------------------ whole models


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    """A full forward and token-by-token decode, against transformers' logits."""
    folder, hf = checkpoints[variant]
    want = reference_logits(hf, TOKENS)
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert [i for i, spec in enumerate(model.config.arch.layers) if spec.mlp == "dense"] == DENSE[variant]
    assert (model.config.head_dim, model.config.num_kv_heads) == (24, 4)
    assert_forward_and_decode_match(model, TOKENS, want)


def test_the_parity_is_sensitive_to_the_layer_kinds_and_correction_biases(checkpoints):
    """The checked settings move transformers' logits here: which layers are dense, and the correction biases."""
    folder, hf = checkpoints["flash"]
    want = reference_logits(hf, TOKENS)
    other = transformers.AutoModelForCausalLM.from_pretrained(
        folder, mlp_layer_types=["dense", "dense", "sparse"]).float().eval()
    assert scaled_error(reference_logits(other, TOKENS), want) > 1e-3
    unbiased = without_correction_biases(folder)
    assert scaled_error(reference_logits(unbiased, TOKENS), want) > 1e-3
    arch = ModelConfig.from_file(checkpoints["yarn"][0]).arch
    assert arch.attn_scale == pytest.approx(checkpoints["yarn"][1].model.layers[0].self_attn.scaling)


def test_the_prediction_layer_is_left_out_quietly(checkpoints, tmp_path):
    """GLM-4.7-Flash stores its multi-token prediction layer after the decoder's (transformers drops it by name)."""
    import warnings

    folder, model = checkpoints["flash"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm = ferrum.load(with_prediction_layer(folder, tmp_path / "mtp", 1), backend="cpu")
    assert scaled_error(llm.model.forward_verify("mtp", TOKENS), reference_logits(model, TOKENS)) < 1e-4


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**lite_config().to_dict(), **changes}


@pytest.mark.parametrize("changes, error, words", [
    ({"mlp_layer_types": ["dense", "sparse"]}, ConfigError, "'mlp_layer_types' lists 2 layers, but the model has 3"),
    ({"mlp_layer_types": ["dense", "moe", "sparse"]}, ConfigError, "'mlp_layer_types' must list 'dense' or 'sparse'"),
    ({"first_k_dense_replace": 2}, ConfigError, "'first_k_dense_replace' is 2, but mlp_layer_types makes layers [0]"),
    ({"num_key_value_heads": 2}, ConfigError, "'num_key_value_heads' is 2, but latent attention expands"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     UnsupportedFeatureError, "sets partial_rotary_factor 0.5"),
    ({"topk_group": 3}, ConfigError, "'topk_group' (3) exceeds the 2 expert groups"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


#: GLM-4.7-Flash's keys and sizes as Glm4MoeLiteConfig and mlx-lm's ModelArgs default them (both after the release),
#: with the DeepSeek-style keys transformers does not read (first_k_dense_replace, topk_method, scoring_func).
GLM_4_7_FLASH = {
    "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "attention_bias": False,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10240,
    "kv_lora_rank": 512, "max_position_embeddings": 202752, "moe_intermediate_size": 1536, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 20,
    "num_experts_per_tok": 4, "num_hidden_layers": 47, "num_key_value_heads": 20, "num_nextn_predict_layers": 1,
    "partial_rotary_factor": 1.0, "q_lora_rank": 768, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000, "routed_scaling_factor": 1.8, "scoring_func": "sigmoid",
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "v_head_dim": 256,
    "vocab_size": 154880}


def test_glm_4_7_flash_config_reads_as_transformers_reads_it():
    config = ModelConfig.from_dict(json.loads(json.dumps(GLM_4_7_FLASH)))
    arch = config.arch
    assert (config.head_dim, config.num_heads, config.num_kv_heads, config.rms_norm_eps) == (256, 20, 20, 1e-5)
    assert [layer.mlp for layer in arch.layers[:3]] == ["dense", "moe", "moe"] and arch.mtp_layers == 1
    rope = arch.layers[0].rope
    assert (rope.kind, rope.rotary_dim, rope.theta, rope.interleaved) == ("default", 64, 1e6, True)
    assert arch.attn_scale == pytest.approx(1 / math.sqrt(256))
    mla = arch.mla
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.nope, mla.rope, mla.v_head_dim) == (768, 512, 192, 64, 256)
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size) == (64, 4, 1536, 1536)
    assert (moe.routing, moe.n_group, moe.topk_group, moe.routed_scale, moe.normalize, moe.router_float32) == (
        "sigmoid_grouped", 1, 1, 1.8, True, True)
    defaults = ModelConfig.from_dict({key: GLM_4_7_FLASH[key] for key in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
        "max_position_embeddings")})
    assert (defaults.arch.mla, defaults.arch.moe, defaults.arch.mtp_layers) == (mla, moe, 1)  # the same defaults
