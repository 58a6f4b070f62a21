"""Command A MoE (``cohere2_moe``): Command R7B's parallel blocks (sliding layers with rope, full ones without, the
dense first layers rotated), LayerNorms or RMSNorms, and experts routed by their top-k logits' softmax or sigmoids
beside shared experts summed or averaged in; against transformers' Cohere2MoeForCausalLM on every runnable backend.
mlx-lm has no such family.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, assert_logits_move, build_transformers_model, reference_logits, runnable_backends,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def cohere2_moe_config(**extra) -> transformers.Cohere2MoeConfig:
    """Eight experts of 32, three a token; the first layer dense (48 wide), full and rotated, the others sliding over
    5 tokens (shorter than the test's 13); logits scaled by 0.5."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=3, sliding_window=5,
                    first_k_dense_replace=1, prefix_dense_intermediate_size=48, logit_scale=0.5,
                    max_position_embeddings=256, eos_token_id=1, bos_token_id=0)
    return transformers.Cohere2MoeConfig(**{**settings, **extra})


#: One shared expert averaged in, softmax routing, LayerNorms; two summed in, sigmoid routing renormalized, RMSNorms;
#: none, sigmoids as they are, the first layer sliding and every other layer full (NoPE).
VARIANTS = {"average": dict(num_shared_experts=1),
            "sum": dict(num_shared_experts=2, shared_expert_combination_strategy="sum", expert_selection_fn="sigmoid",
                        rms_norm_eps=1e-6),
            "patterned": dict(sliding_window_pattern=2, prefix_dense_sliding_window_pattern=2,
                              expert_selection_fn="sigmoid", norm_topk_prob=False)}


def build_checkpoints(tmp_path_factory) -> dict:
    out = {}
    for name, extra in VARIANTS.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = folder, build_transformers_model(folder, cohere2_moe_config(**extra))
    return out


def load(folder, backend="cpu") -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", block_size=4)


def test_reads_the_layers_and_the_routing(checkpoints):
    arch = load(checkpoints["average"][0]).config.arch
    assert [(spec.window, spec.rope.rotary_dim, spec.mlp, spec.intermediate_size) for spec in arch.layers] == [
        (None, 16, "dense", 48), (5, 16, "moe", None), (5, 16, "moe", None), (5, 16, "moe", None)]
    assert (arch.norm, arch.parallel, arch.logit_scale) == ("layer", True, 0.5)
    moe = arch.moe
    assert (moe.routing, moe.routed_scale, moe.shared_scale, moe.shared_expert_size, moe.expert_size) == (
        "softmax_grouped", 0.5, 0.5, 32, 32)
    assert load(checkpoints["sum"][0]).config.arch.norm == "rms"
    patterned = load(checkpoints["patterned"][0]).config.arch
    assert [spec.rope.rotary_dim for spec in patterned.layers] == [16, 16, 0, 16]
    assert (patterned.moe.routing, patterned.moe.normalize, patterned.moe.shared_expert_size) == (
        "sigmoid_top_k", False, None)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(load(folder, backend), TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("change", ["sum", "no_forced_rope"])
def test_the_parity_checks_the_average_and_the_dense_layers_rope(checkpoints, change):
    """transformers' logits move where the shared expert is summed in rather than averaged, or the dense first layer
    is left unrotated as full layers are: each matters in the comparison above."""
    folder, hf = checkpoints["average"]
    changed = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    if change == "sum":
        for layer in changed.model.layers[1:]:
            layer.mlp.shared_expert_combination_strategy = "sum"
    else:
        changed.model.layers[0].self_attn.force_rope = False
    assert_logits_move(changed, hf, TOKENS)


# ------------------------------------------------------------------ config


def test_config_defaults_are_transformers():
    """Without layer_types or mlp_layer_types, Cohere2MoeConfig's patterns from first_k_dense_replace; its other
    defaults."""
    raw = {k: v for k, v in cohere2_moe_config().to_dict().items() if k not in (
        "layer_types", "mlp_layer_types", "num_experts", "num_experts_per_tok", "sliding_window", "head_dim",
        "prefix_dense_intermediate_size")}
    raw.update(num_hidden_layers=7, first_k_dense_replace=2, hidden_size=4 * 128)
    config, want = ModelConfig.from_dict(raw), transformers.Cohere2MoeConfig(**raw)
    arch = config.arch
    assert [spec.window for spec in arch.layers] == [
        want.sliding_window if kind == "sliding_attention" else None for kind in want.layer_types]
    assert [spec.mlp == "moe" for spec in arch.layers] == [kind == "sparse" for kind in want.mlp_layer_types]
    assert (arch.moe.num_experts, arch.moe.top_k, config.head_dim, config.intermediate_size) == (
        want.num_experts, want.num_experts_per_tok, want.head_dim, want.intermediate_size)
    assert arch.moe.shared_expert_size is None and arch.moe.routing == "softmax" and arch.norm == "layer"


@pytest.mark.parametrize("changes, error, words", [
    ({"shared_expert_combination_strategy": "max"}, ConfigError, "'shared_expert_combination_strategy' is 'max'"),
    ({"expert_selection_fn": "relu"}, ConfigError, "'expert_selection_fn' is 'relu'"),
    ({"use_qk_norm": True}, UnsupportedFeatureError, "has no q/k norms"),
    ({"mlp_layer_types": ["dense"] * 3}, ConfigError, "'mlp_layer_types' lists 3 layers, but the model has 4"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict({**cohere2_moe_config().to_dict(), **changes})
