"""JetBrains' Mellum (``mellum``): Qwen3-MoE's attention (per-head q/k norms before rope), full and sliding layers as
layer_types lists them, each kind with its own rope (rope_parameters per kind), and softmax-routed experts on the
layers mlp_layer_types makes sparse (dense MLPs of intermediate_size on the others); against transformers'
MellumForCausalLM on every runnable backend, and mlx-lm's mellum and its conversions.
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
ROPES = {"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}


def mellum_config(**extra) -> transformers.MellumConfig:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8,
                    num_experts_per_tok=2, sliding_window=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"], rope_parameters=ROPES,
                    bos_token_id=1, eos_token_id=2)
    return transformers.MellumConfig(**{**settings, **extra})


#: The release's layout (sliding layers under a full one, every layer sparse); and a dense first layer, biased
#: attention, unnormalized top-3 weights, tied embeddings, a rope scaling on the full layers.
VARIANTS = {"release": {}, "dense": dict(mlp_layer_types=["dense", "sparse", "sparse"], attention_bias=True,
                                         norm_topk_prob=False, num_experts_per_tok=3, tie_word_embeddings=True,
                                         rope_parameters={**ROPES, "full_attention": {
                                             "rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}})}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, mellum_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch, moe = model.config.arch, model.config.arch.moe
    dense = variant == "dense"
    assert [spec.mlp for spec in arch.layers][0] == ("dense" if dense else "moe")
    assert [spec.window for spec in arch.layers] == [4, 4, None] and arch.qk_norm == "head"
    assert [spec.rope.theta for spec in arch.layers] == [100.0, 100.0, 50000.0]
    assert (moe.routing, moe.normalize, moe.shared_expert_size, moe.router_float32, moe.expert_size) == (
        "softmax", not dense, None, False, 32)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_releases_prediction_layer_is_left_out_quietly(checkpoints, tmp_path):
    """Mellum's releases store a multi-token prediction layer (mtp.*), which transformers does not load: not run,
    not reported unread."""
    from support import assert_stray_tensors_quiet_only_where_transformers_skips_them

    folder, hf = checkpoints["release"]
    skipped = ["mtp.layers.0.mlp.gate.weight", "mtp.norm.weight"]
    assert_stray_tensors_quiet_only_where_transformers_skips_them(folder, tmp_path, skipped, hf, TOKENS)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**mellum_config().to_dict(), **changes}


def test_config_is_read_as_transformers_reads_it():
    """num_experts is num_local_experts' alias (the latter wins where both are given); without rope_parameters,
    MellumConfig's own per kind; the other defaults are MellumConfig's (every layer full and sparse)."""
    raw = _raw(num_experts=5, num_local_experts=7)
    assert ModelConfig.from_dict(raw).arch.moe.num_experts == transformers.MellumConfig(**raw).num_local_experts == 7
    defaults = {k: v for k, v in _raw().items() if k not in (
        "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "head_dim", "norm_topk_prob",
        "rope_parameters", "layer_types", "mlp_layer_types", "sliding_window")}
    defaults["hidden_size"] = 4 * 128  # heads of the default head_dim
    config, want = ModelConfig.from_dict(defaults), transformers.MellumConfig(**defaults)
    moe = config.arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.normalize, config.head_dim) == (
        want.num_local_experts, want.num_experts_per_tok, want.moe_intermediate_size, want.norm_topk_prob,
        want.head_dim) == (64, 8, 896, True, 128)
    assert [(s.mlp, s.window, s.rope.theta) for s in config.arch.layers] == [("moe", None, 500_000.0)] * 3
    sliding = ModelConfig.from_dict({**defaults, "layer_types": ["sliding_attention"] * 3})
    assert [(s.window, s.rope.theta) for s in sliding.arch.layers] == [
        (want.sliding_window, want.rope_parameters["sliding_attention"]["rope_theta"])] * 3 == [(1024, 10_000.0)] * 3


@pytest.mark.parametrize("changes, error, words", [
    ({"num_experts_per_tok": 9}, ConfigError, "'num_experts_per_tok' (9) exceeds the 8 experts"),
    ({"mlp_layer_types": ["sparse", "dense"]}, ConfigError, "lists 2 layers, but the model has 3"),
    ({"mlp_layer_types": ["sparse", "shared", "dense"]}, ConfigError, "must list 'dense' or 'sparse' per layer"),
    ({"layer_types": ["sliding_attention"] * 3, "sliding_window": None}, ConfigError, "'sliding_window' must be set"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, UnsupportedFeatureError,
     "must hold one entry per attention kind"),
    ({"rope_theta": 1e6}, UnsupportedFeatureError, "reads each attention kind's rope_theta from rope_parameters"),
    ({"rope_parameters": {**ROPES, "full_attention": {"rope_type": "default", "rope_theta": 1e4,
                                                      "partial_rotary_factor": 0.5}}},
     UnsupportedFeatureError, "sets partial_rotary_factor 0.5"),
    ({"hidden_act": "gelu"}, UnsupportedFeatureError, "'hidden_act'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))
