"""Liquid AI's LFM3 (``lfm3``): LFM2's gated short convolutions between Qwen 3's attention layers, full (Gemma 4's
proportional rope over half of each head) and sliding, each head's output times the sigmoid of its own gate, a norm
on each mixer's and MLP's output too; against transformers' Lfm3ForCausalLM on every runnable backend, in a mixed
batch and through the engine (batched, chunked, preempted), and as Lfm3Config reads its keys."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_engine_keeps_greedy_tokens, assert_logits_move,
    assert_matches_transformers, assert_names_the_tensors_transformers_saves,
    assert_random_checkpoint_is_what_transformers_reads, float32_model, randomized_reference, runnable_backends,
    saved_references, small_pool_engine, staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
ROPES = {"full_attention": {"rope_type": "proportional", "rope_theta": 1000.0, "partial_rotary_factor": 0.5},
         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}


def lfm3_config(**extra) -> transformers.Lfm3Config:
    """Six layers in Lfm3Config's pattern (convolutions, full attention at 2, sliding over 5 tokens at 4, shorter than
    the test's 13), a kernel of 3, four heads of 16 over two key/value heads, rope bases that turn within the test's
    tokens; no padding token (generate would mask the prompts' own 0s)."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, conv_L_cache=3, sliding_window=5, rope_parameters=ROPES,
                    max_position_embeddings=256, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    return transformers.Lfm3Config(**{**settings, **extra})


#: Lfm3Config's defaults (gate and sandwich norms); and neither, untied, biased attention, its own layer kinds.
VARIANTS = {"release": {}, "plain": dict(
    use_attention_gate=False, use_sandwich_norm=False, tie_word_embeddings=False, attention_bias=True,
    layer_types=["sliding_attention", "conv", "full_attention", "conv", "full_attention", "conv"])}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, lfm3_config, randomized_reference)


def test_reads_the_layers_the_gate_and_the_norms(checkpoints):
    arch = float32_model(checkpoints["release"][0]).config.arch
    assert [(s.mixer, s.window, s.rope.rotary_dim, s.rope.proportional) for s in arch.layers] == [
        ("short_conv", None, 0, False), ("short_conv", None, 0, False), ("attention", None, 8, True),
        ("short_conv", None, 0, False), ("attention", 5, 16, False), ("short_conv", None, 0, False)]
    assert (arch.attn_output_gate, arch.attn_gate, arch.attn_gate_per_head) == (True, "sigmoid", True)
    assert set(arch.norms) == {"pre_attn", "post_attn", "pre_mlp", "post_mlp"}
    plain = float32_model(checkpoints["plain"][0]).config.arch
    assert (plain.attn_output_gate, set(plain.norms)) == (False, {"pre_attn", "pre_mlp"})


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_matches_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints, backend):
    folder, hf = checkpoints["release"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder, backend, block_size=4), hf, VOCAB)


def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(checkpoints):
    folder, hf = checkpoints["release"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("part", ["gate_proj", "post_operator_norm", "proportional"])
def test_the_parity_checks_the_gate_the_sandwich_and_the_proportional_rope(checkpoints, part):
    """transformers' logits move where the gate is left half open (its projection zeroed), the mixers' output norms
    are left out, or the full layer rotates its pairs at a default rope's frequencies: each matters above."""
    folder, hf = checkpoints["release"]
    changed = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        for layer in changed.model.layers:
            if part == "gate_proj" and hasattr(layer, "self_attn"):
                layer.self_attn.g_proj.weight.zero_()
            elif part == "post_operator_norm":
                layer.post_operator_norm = torch.nn.Identity()
    if part == "proportional":  # the turning pairs' frequencies spaced over their own dims, not the whole head's
        rotary = changed.model.rotary_emb
        turning = int((rotary.full_attention_inv_freq > 0).sum())
        spaced = 1.0 / 1000.0 ** (torch.arange(0, 2 * turning, 2, dtype=torch.float) / (2 * turning))
        rotary.full_attention_inv_freq[:turning] = spaced
    # one full layer of six changed moves the logits less than the other parts do; still ten times the tolerance
    least = 1e-3 if part == "proportional" else 1e-2
    assert_logits_move(changed, hf, TOKENS, least)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ferrum_names_the_tensors_transformers_saves(checkpoints, variant):
    assert_names_the_tensors_transformers_saves(checkpoints[variant][0])


def test_random_checkpoints_are_what_transformers_reads(tmp_path):
    assert_random_checkpoint_is_what_transformers_reads(tmp_path, lfm3_config().to_dict(), TOKENS)


# ------------------------------------------------------------------ config


def test_rms_norm_eps_is_norm_eps_alias():
    """Lfm3Config maps rms_norm_eps onto norm_eps, whichever comes first: where both are given, the alias wins."""
    raw = {**lfm3_config().to_dict(), "norm_eps": 1e-5, "rms_norm_eps": 1e-3}
    assert ModelConfig.from_dict(raw).rms_norm_eps == transformers.Lfm3Config.from_dict(raw).norm_eps == 1e-3


def test_config_defaults_are_transformers():
    """Without layer_types, rope_parameters or the window, Lfm3Config's: convolutions with full attention at every
    fourth layer from the third and sliding at every fourth from the fifth, the full layers' proportional rope over
    half of each head at base 1e6, the sliding ones' default rope at 1e4, a window of 256, a kernel of 7."""
    raw = {k: v for k, v in lfm3_config().to_dict().items() if k not in (
        "layer_types", "rope_parameters", "sliding_window", "conv_L_cache", "head_dim")}
    raw["num_hidden_layers"], raw["hidden_size"] = 9, 4 * 128
    config, want = ModelConfig.from_dict(raw), transformers.Lfm3Config(**raw)
    kinds = {"conv": ("short_conv", None, 0), "full_attention": ("attention", None, 64),
             "sliding_attention": ("attention", want.sliding_window, 128)}
    assert [(s.mixer, s.window, s.rope.rotary_dim) for s in config.arch.layers] == [
        kinds[t] for t in want.layer_types]
    full = next(s.rope for s in config.arch.layers if s.rope.proportional)
    assert (full.theta, config.arch.short_conv.conv_kernel, config.tie_word_embeddings) == (
        want.rope_parameters["full_attention"]["rope_theta"], want.conv_L_cache, want.tie_word_embeddings)


@pytest.mark.parametrize("changes, error, words", [
    ({"layer_types": ["conv"] * 3}, ConfigError, "'layer_types' must list 6 entries"),
    ({"layer_types": ["mamba"] * 6}, ConfigError, "'layer_types' must list 6 entries"),
    ({"conv_bias": True}, UnsupportedFeatureError, "no LFM3 release biases its convolutions"),
    ({"rope_parameters": {**ROPES, "full_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}},
     UnsupportedFeatureError, "has rope type 'yarn'"),
    ({"rope_parameters": {**ROPES, "full_attention": {**ROPES["full_attention"], "factor": 2.0}}},
     UnsupportedFeatureError, "has a proportional rope"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, UnsupportedFeatureError,
     "must hold one entry per attention kind"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict({**lfm3_config().to_dict(), **changes})
