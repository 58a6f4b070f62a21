"""Tencent's Hy3 (``hy_v3``): Qwen 3's attention (per-head q/k norms before rope; q/k/v and o biased by
attention_bias), a dense first layer (mlp_layer_types), and sparse MLPs whose float32 router ``router.gate`` chooses
by sigmoid scores plus the sparse MLP's own ``expert_bias``, weighs by the uncorrected scores renormalized and scaled
by router_scaling_factor, with an ungated ``shared_mlp``; against transformers' HYV3ForCausalLM on every runnable
backend. (mlx-lm 0.32 has no hy_v3.)
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


def hy_config(**extra) -> transformers.HYV3Config:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.HYV3Config(**{**settings, **extra})


#: The release's layout (a dense first layer, one shared expert, the default scale); and biased attention, every
#: layer sparse, two shared experts, top-3, tied embeddings.
VARIANTS = {"release": {}, "biased": dict(attention_bias=True, mlp_layer_types=["sparse"] * 3, num_shared_experts=2,
                                          num_experts_per_tok=3, router_scaling_factor=1.5, tie_word_embeddings=True)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, hy_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch, moe = model.config.arch, model.config.arch.moe
    biased = variant == "biased"
    assert [spec.mlp for spec in arch.layers] == ["moe" if biased else "dense", "moe", "moe"]
    assert (arch.qk_norm, arch.qkv_bias, arch.o_bias) == ("head", biased, biased)
    assert (moe.routing, moe.n_group, moe.normalize, moe.routed_scale, moe.shared_expert_size, moe.router_float32) == (
        "sigmoid_grouped", 1, True, 1.5 if biased else 2.826, 64 if biased else 32, True)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_releases_prediction_layer_is_left_out_quietly(checkpoints, tmp_path):
    """Hy3's release stores a multi-token prediction layer as layer 80, which transformers does not load
    (``model.layers.80.*``): not run, not reported unread."""
    from support import assert_stray_tensors_quiet_only_where_transformers_skips_them

    folder, hf = checkpoints["release"]
    skipped = ["model.layers.80.mlp.router.gate.weight", "model.layers.80.input_layernorm.weight"]
    assert_stray_tensors_quiet_only_where_transformers_skips_them(folder, tmp_path, skipped, hf, TOKENS)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**hy_config().to_dict(), **changes}


def test_config_is_read_as_transformers_reads_it():
    """num_experts is num_local_experts' alias (the latter wins where both are given); no shared experts is a shared
    MLP of intermediate_size, as transformers sizes it; the defaults are HYV3Config's."""
    raw = _raw(num_experts=5, num_local_experts=7)
    assert ModelConfig.from_dict(raw).arch.moe.num_experts == transformers.HYV3Config(**raw).num_local_experts
    raw = _raw(num_shared_experts=0)
    hf = transformers.HYV3ForCausalLM(transformers.HYV3Config(**raw))
    shared = hf.model.layers[1].mlp.shared_experts.intermediate_size
    assert ModelConfig.from_dict(raw).arch.moe.shared_expert_size == shared == 48
    defaults = {k: v for k, v in _raw().items() if k not in (
        "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "head_dim",
        "num_shared_experts", "router_scaling_factor", "rope_parameters", "mlp_layer_types")}
    defaults["hidden_size"] = 4 * 128  # heads of the default head_dim
    config, want = ModelConfig.from_dict(defaults), transformers.HYV3Config(**defaults)
    moe = config.arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size, moe.routed_scale, config.head_dim) == (
        want.num_local_experts, want.num_experts_per_tok, want.moe_intermediate_size,
        want.moe_intermediate_size * want.num_shared_experts, want.router_scaling_factor, want.head_dim) == (
        192, 8, 1536, 1536, 2.826, 128)
    assert [s.mlp for s in config.arch.layers] == [{"dense": "dense", "sparse": "moe"}[k] for k in want.mlp_layer_types]
    assert config.arch.layers[0].rope.theta == want.rope_parameters["rope_theta"] == 11_158_840.0


@pytest.mark.parametrize("changes, error, words", [
    ({"num_experts_per_tok": 9}, ConfigError, "'num_experts_per_tok' (9) exceeds the 8 experts"),
    ({"mlp_layer_types": ["dense", "sparse"]}, ConfigError, "lists 2 layers, but the model has 3"),
    ({"mlp_layer_types": ["dense", "moe", "sparse"]}, ConfigError, "must list 'dense' or 'sparse' per layer"),
    ({"mlp_bias": True}, UnsupportedFeatureError, "biases the shared MLP (shared_mlp)"),
    ({"router_scaling_factor": 0}, ConfigError, "'router_scaling_factor'"),
    ({"partial_rotary_factor": 0.5}, UnsupportedFeatureError, "'partial_rotary_factor'"),
    ({"hidden_act": "gelu"}, UnsupportedFeatureError, "'hidden_act'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))
