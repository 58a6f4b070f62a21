"""MiniMax-M2 (``minimax_m2``): Llama's blocks with q and k normed over their whole projections (OLMo 2's), rope on
the first rotary_dim dims of each head, and experts on every layer (``block_sparse_moe``, Mixtral's w1/w3/w2) chosen
by sigmoid scores plus the sparse MLP's own ``e_score_correction_bias``, their weights renormalized; against
transformers' MiniMaxM2ForCausalLM on every runnable backend, and mlx-lm's MiniMax and its conversions.
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
#: The keys of MiniMax's own code that MiniMax-M2's config.json carries, valued as transformers runs them.
RELEASE_KEYS = dict(scoring_func="sigmoid", use_routing_bias=True, shared_intermediate_size=0, use_qk_norm=True,
                    qk_norm_type="per_layer")


def minimax_config(**extra) -> transformers.MiniMaxM2Config:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=24, num_local_experts=8, num_experts_per_tok=3, rotary_dim=12,
                    rope_theta=10000.0, max_position_embeddings=256, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2)
    return transformers.MiniMaxM2Config(**{**settings, **extra})


#: Rope on half of each head (rotary_dim, as the release writes it); and rope on a third through
#: partial_rotary_factor, tied embeddings, top-2.
VARIANTS = {"release": RELEASE_KEYS, "factor": dict(rotary_dim=None, partial_rotary_factor=1 / 3, num_experts_per_tok=2,
                                                    tie_word_embeddings=True)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, minimax_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch, moe = model.config.arch, model.config.arch.moe
    assert [spec.mlp for spec in arch.layers] == ["moe", "moe"] and arch.qk_norm == "projection"
    assert arch.layers[0].rope.rotary_dim == (12 if variant == "release" else 8)
    assert (moe.routing, moe.n_group, moe.normalize, moe.routed_scale, moe.router_float32, moe.shared_expert_size) == (
        "sigmoid_grouped", 1, True, 1.0, False, None)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**minimax_config().to_dict(), **RELEASE_KEYS, **changes}


def test_config_is_read_as_transformers_reads_it():
    """num_experts is num_local_experts' alias (it wins where both are given); the rotary dims come from
    partial_rotary_factor, in the rope settings or beside them, else from rotary_dim; the defaults are
    MiniMaxM2Config's."""
    raw = _raw(num_experts=5, num_local_experts=7)
    assert ModelConfig.from_dict(raw).arch.moe.num_experts == transformers.MiniMaxM2Config(**raw).num_local_experts
    no_rope = {k: v for k, v in _raw().items() if k not in ("rope_parameters", "rotary_dim")}
    for extra, dims in [({}, 24), ({"rotary_dim": 8}, 8), ({"partial_rotary_factor": 0.5}, 12),
                        ({"rope_parameters": {"rope_type": "default", "rope_theta": 100.0,
                                              "partial_rotary_factor": 0.25}}, 6)]:
        raw = {**no_rope, **extra}
        want = transformers.MiniMaxM2Config(**raw)
        rope = ModelConfig.from_dict(raw).arch.layers[0].rope
        assert rope.rotary_dim == int(24 * want.rope_parameters.get("partial_rotary_factor", 1.0)) == dims
        assert rope.theta == want.rope_parameters["rope_theta"]
    defaults = {k: v for k, v in _raw().items() if k not in (
        "num_local_experts", "num_experts_per_tok", "head_dim", "rope_parameters", "rotary_dim")}
    defaults["hidden_size"] = 64 * 12  # heads of the default head_dim, 128
    config = ModelConfig.from_dict(defaults)
    assert (config.arch.moe.num_experts, config.arch.moe.top_k, config.head_dim) == (256, 8, 128)
    assert (config.arch.layers[0].rope.theta, config.arch.layers[0].rope.rotary_dim) == (5_000_000.0, 128)


@pytest.mark.parametrize("changes, error, words", [
    ({"rotary_dim": 8}, ConfigError, "'rotary_dim' is 8, but partial_rotary_factor gives 12 rotary dims of 24"),
    ({"num_experts_per_tok": 9}, ConfigError, "'num_experts_per_tok' (9) exceeds the 8 experts"),
    ({"scoring_func": "softmax"}, UnsupportedFeatureError, "routes by sigmoid scores"),
    ({"use_routing_bias": False}, UnsupportedFeatureError, "always adds e_score_correction_bias"),
    ({"shared_intermediate_size": 64}, UnsupportedFeatureError, "has no shared expert"),
    ({"use_qk_norm": False}, UnsupportedFeatureError, "transformers norms q and k whatever it says"),
    ({"qk_norm_type": "per_head"}, UnsupportedFeatureError, "over their whole projections"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))
