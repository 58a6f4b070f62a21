"""translated's Lara Mini (``lara_mini``): Qwen3.5's Gated DeltaNet layers (their input projections stored as one
``in_proj``, their gated norm as ``out_norm``) between Qwen 3's attention layers, rope and a window on the sliding
ones, none on the full ones, plain RMSNorms, and on every layer experts routed by a float32 softmax beside an ungated
shared expert (stored fused); against transformers' LaraMiniForCausalLM on every runnable backend. The checks every
MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from support import (
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_logits_move, assert_matches_transformers,
    float32_model, runnable_backends, saved_references,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def lara_config(**extra) -> transformers.LaraMiniConfig:
    """Five layers in the release's pattern (Gated DeltaNet, sliding over 5 tokens, shorter than the test's 13,
    Gated DeltaNet, full, sliding); Gated DeltaNet with 2 key heads of 8 dims and 4 value heads of 12; eight experts of
    32, three a token, a shared expert of 24; tied embeddings; a rope base of 10 (every pair turning within the
    test's tokens)."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2,
                    linear_num_value_heads=4, moe_intermediate_size=32, shared_expert_intermediate_size=24,
                    num_experts=8, num_experts_per_tok=3, sliding_window=5, max_position_embeddings=256,
                    rope_parameters={"rope_type": "default", "rope_theta": 10.0}, bos_token_id=1, eos_token_id=2)
    return transformers.LaraMiniConfig(**{**settings, **extra})


#: The release's layout; and unnormalized top-2 weights, biased attention, untied embeddings, its own layer kinds.
VARIANTS = {"release": {}, "plain": dict(
    norm_topk_prob=False, num_experts_per_tok=2, attention_bias=True, tie_word_embeddings=False,
    layer_types=["full_attention", "linear_attention", "sliding_attention", "linear_attention", "linear_attention"])}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, lara_config)


def test_reads_the_layers_and_the_experts(checkpoints):
    arch = float32_model(checkpoints["release"][0]).config.arch
    assert [(s.mixer, s.window, s.rope.rotary_dim, s.mlp) for s in arch.layers] == [
        ("gated_delta", None, 0, "moe"), ("attention", 5, 16, "moe"), ("gated_delta", None, 0, "moe"),
        ("attention", None, 0, "moe"), ("attention", 5, 16, "moe")]
    moe = arch.moe
    assert (arch.norm_offset, arch.attn_output_gate, arch.gated_delta.fused) == (0.0, False, True)
    assert (moe.routing, moe.router_float32, moe.normalize, moe.shared_expert_size, moe.shared_gate, moe.layout) == (
        "softmax", True, True, 24, None, "fused_outputs_first")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_matches_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints, backend):
    folder, hf = checkpoints["release"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder, backend, block_size=4), hf, VOCAB)


@pytest.mark.parametrize("part", ["shared_expert", "full_rope"])
def test_the_parity_checks_the_shared_expert_and_the_nope_layers(checkpoints, part):
    """transformers' logits move where the shared expert is left out, or where the full layers are rotated too: each
    matters in the comparison above."""
    folder, hf = checkpoints["release"]
    changed = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        for layer in changed.model.layers:
            if part == "shared_expert":
                layer.mlp.shared_expert.down_proj.weight.zero_()
    if part == "full_rope":
        forward = changed.model.layers[3].forward

        def rotated(*args, position_embeddings=None, **kwargs):
            return forward(*args, position_embeddings=changed.model.rotary_emb(args[0], kwargs["position_ids"]),
                           **kwargs)

        changed.model.layers[3].forward = rotated
    # one layer of five rotated moves the logits less than a whole part does; still ten times the comparison's 1e-4
    assert_logits_move(changed, hf, TOKENS, 1e-3)


# ------------------------------------------------------------------ config


def test_config_defaults_are_transformers():
    """Without layer_types or the MoE sizes, LaraMiniConfig's: the released pattern of five repeated, a window of 512,
    128 experts of 512, four a token, a shared one of 512; no intermediate_size (no dense MLP)."""
    raw = {k: v for k, v in lara_config().to_dict().items() if k not in (
        "layer_types", "sliding_window", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
        "shared_expert_intermediate_size", "head_dim")}
    raw["num_hidden_layers"], raw["hidden_size"] = 7, 4 * 128
    config, want = ModelConfig.from_dict(raw), transformers.LaraMiniConfig(**raw)
    kinds = {"linear_attention": ("gated_delta", None), "sliding_attention": ("attention", want.sliding_window),
             "full_attention": ("attention", None)}
    assert [(s.mixer, s.window) for s in config.arch.layers] == [kinds[t] for t in want.layer_types]
    moe = config.arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size, config.head_dim) == (
        want.num_experts, want.num_experts_per_tok, want.moe_intermediate_size, want.shared_expert_intermediate_size,
        want.head_dim) == (128, 4, 512, 512, 128)


@pytest.mark.parametrize("changes, words", [
    ({"layer_types": ["linear_attention"] * 3}, "'layer_types' must list 5 entries"),
    ({"layer_types": ["mamba"] * 5}, "'layer_types' must list 5 entries"),
    ({"linear_num_value_heads": 3}, "'linear_num_value_heads' (3) must be a multiple of linear_num_key_heads (2)"),
    ({"num_experts_per_tok": 9}, "'num_experts_per_tok' (9) exceeds the 8 experts"),
])
def test_bad_keys_are_refused_by_name(changes, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        ModelConfig.from_dict({**lara_config().to_dict(), **changes})
