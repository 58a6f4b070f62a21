"""IBM's Granite Swash (``granitemoe_swa``): Granite SWA's attention (sliding layers, a rope base per layer, 0: none,
a learned sink per head) in Granite 3 MoE's blocks (its multipliers, experts on every layer, a shared MLP), the
experts stored as transformers 5 saves them (fused under ``block_sparse_moe.experts``, routed by
``block_sparse_moe.router``); against transformers' GraniteMoeSWAForCausalLM on every runnable backend. The checks
every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from support import (
    assert_logits_move, assert_matches_transformers, float32_model, randomized_reference, runnable_backends,
    saved_references,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def swa_config(**extra) -> transformers.GraniteMoeSWAConfig:
    """Four layers, full at 0 (GraniteMoeSWA's rule: every fourth from the first), the others sliding over 5 tokens,
    shorter than the test's 13; layer 2 without rope; five experts of 24, two a token, a shared MLP of 40; every
    multiplier away from 1."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, shared_intermediate_size=40,
                    sliding_window=5, layer_rope_theta=[1e4, 500.0, 0, 1e4], max_position_embeddings=128,
                    embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.09, logits_scaling=4.0,
                    bos_token_id=1, eos_token_id=2)
    return transformers.GraniteMoeSWAConfig(**{**settings, **extra})


def _with_sinks(config) -> transformers.GraniteMoeSWAForCausalLM:
    """:func:`randomized_reference` with sinks (zeros at init) large enough to matter."""
    model = randomized_reference(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 1.0)
    return model


#: As above; and no shared MLP, tied embeddings, one rope base for every layer.
VARIANTS = {"shared": {}, "unshared": dict(shared_intermediate_size=0, tie_word_embeddings=True,
                                           layer_rope_theta=None)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, swa_config, _with_sinks)


def test_reads_the_layers_and_the_experts(checkpoints):
    arch = float32_model(checkpoints["shared"][0]).config.arch
    assert [(s.window, s.rope.rotary_dim and s.rope.theta, s.mlp) for s in arch.layers] == [
        (None, 1e4, "moe"), (5, 500.0, "moe"), (5, 0, "moe"), (5, 1e4, "moe")]
    moe = arch.moe
    assert (arch.sinks, moe.router, moe.layout, moe.shared_expert_size, moe.shared_module) == (
        True, "router", "fused_outputs_first", 40, "shared_mlp")
    assert float32_model(checkpoints["unshared"][0]).config.arch.moe.shared_expert_size is None


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_matches_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("part", ["sinks", "shared_mlp"])
def test_the_parity_checks_the_sinks_and_the_shared_mlp(checkpoints, part):
    """transformers' logits move where the sinks join no softmax or the shared MLP is left out."""
    folder, hf = checkpoints["shared"]
    changed = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        for layer in changed.model.layers:
            if part == "sinks":
                layer.self_attn.sinks.fill_(-1e9)
            else:
                layer.shared_mlp.output_linear.weight.zero_()
    assert_logits_move(changed, hf, TOKENS)


def test_config_defaults_are_transformers():
    """Without layer_types, layer_rope_theta or the MoE sizes, GraniteMoeSWAConfig's: every fourth layer full from the
    first, the rope base everywhere, eight experts, two a token, no shared MLP, a window of 128."""
    raw = {k: v for k, v in swa_config().to_dict().items() if k not in (
        "layer_types", "layer_rope_theta", "num_local_experts", "num_experts_per_tok", "shared_intermediate_size",
        "sliding_window")}
    raw["num_hidden_layers"] = 6
    config, want = ModelConfig.from_dict(raw), transformers.GraniteMoeSWAConfig(**raw)
    assert [(s.window, s.rope.theta) for s in config.arch.layers] == [
        (want.sliding_window if kind == "sliding_attention" else None, theta)
        for kind, theta in zip(want.layer_types, want.layer_rope_theta)]
    moe = config.arch.moe
    assert (moe.num_experts, moe.top_k, moe.shared_expert_size, config.rms_norm_eps) == (
        want.num_local_experts, want.num_experts_per_tok, None, want.rms_norm_eps) == (8, 2, None, 1e-6)


@pytest.mark.parametrize("changes, words", [
    ({"layer_rope_theta": [1e4, -1.0, 0, 1e4]}, "'layer_rope_theta' must list 4 rope bases"),
    ({"num_experts_per_tok": 6}, "'num_experts_per_tok' (6) exceeds the 5 experts"),
])
def test_bad_keys_are_refused_by_name(changes, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        ModelConfig.from_dict({**swa_config().to_dict(), **changes})
