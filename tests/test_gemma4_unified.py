"""Gemma 4 unified's text decoder (``gemma4_unified_text``; its ``gemma4_unified`` wrapper's text_config): Gemma 4's
decoder (sliding layers and wider full layers with fewer key/value heads whose values are their keys, proportional
rope, q/k/v norms, each layer's layer_scalar, the last layers reading an earlier layer's keys and values) without
per-layer inputs or experts, which its config class leaves out, and with "vision" bidirectional attention, causal over
text. Against transformers' Gemma4UnifiedForCausalLM and Gemma4UnifiedForConditionalGeneration (text only) on every
runnable backend, through the engine, and as its config class reads the keys. mlx-lm has no such family."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_engine_keeps_greedy_tokens, assert_logits_move, assert_matches_transformers,
    assert_names_the_tensors_transformers_saves, assert_random_checkpoint_is_what_transformers_reads,
    build_transformers_model, float32_model, randomized_reference, runnable_backends, saved_references,
    small_pool_engine, staggered_greedy_workload, with_layer_scalars,
)

BACKENDS = runnable_backends()
VOCAB = 97
#: Longer than the window of 6, so sliding layers drop keys inside the prompt.
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=24)]
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2


def unified_config(**extra) -> transformers.Gemma4UnifiedTextConfig:
    """Six layers, sliding heads of 16 and full ones of 32 over one key/value head whose values are its keys, a window
    of 6, soft-capped logits; no padding token (generate would mask the prompts' own 0s)."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                    attention_k_eq_v=True, sliding_window=6, final_logit_softcapping=30.0, layer_types=LAYER_TYPES,
                    max_position_embeddings=256, pad_token_id=None)
    return transformers.Gemma4UnifiedTextConfig(**{**settings, **extra})


#: k_eq_v full layers; the last two layers reading the keys and values of the last of their kind before them, with
#: MLPs twice as wide, and full layers with their own values.
VARIANTS = {"k_eq_v": {}, "shared_kv": dict(num_kv_shared_layers=2, use_double_wide_mlp=True, attention_k_eq_v=False)}


def _reference(config):
    config._attn_implementation = "eager"
    return with_layer_scalars(randomized_reference(config), 0.2)


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, unified_config, _reference)


def test_reads_the_layers(checkpoints):
    config = float32_model(checkpoints["shared_kv"][0]).config
    arch = config.arch
    assert (config.head_dim, config.num_kv_heads, arch.per_layer_inputs, arch.moe) == (32, 2, None, None)
    assert [(s.window, s.heads.head_dim, s.kv_source, s.intermediate_size) for s in arch.layers] == [
        (6, 16, None, None), (6, 16, None, None), (None, None, None, None), (6, 16, None, None),
        (6, 16, 3, 160), (None, None, 2, 160)]
    assert arch.layer_scalar and arch.layers[2].rope.proportional


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_matches_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["shared_kv"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("part", ["layer_scalar", "shared_kv"])
def test_the_parity_checks_the_layer_scalars_and_the_shared_kv(checkpoints, part):
    """transformers' logits move where each layer's layer_scalar is left at 1, or the shared layers read the keys and
    values of the first layer of their kind rather than the last: each matters in the comparison above."""
    folder, hf = checkpoints["shared_kv"]
    changed = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        if part == "layer_scalar":
            for layer in changed.model.layers:
                layer.layer_scalar.fill_(1.0)
        else:  # the shared sliding layer (4) reads the first sliding layer's keys and values, not layer 3's
            attention = [layer.self_attn for layer in changed.model.layers]
            assert attention[4].is_kv_shared_layer and attention[3].store_full_length_kv
            attention[0].store_full_length_kv, attention[3].store_full_length_kv = True, False
    assert_logits_move(changed, hf, TOKENS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ferrum_names_the_tensors_transformers_saves(checkpoints, variant):
    assert_names_the_tensors_transformers_saves(checkpoints[variant][0])


def test_random_checkpoint_is_what_transformers_reads(tmp_path):
    """ferrum.random_checkpoint writes a release-style config's tensors (global_head_dim and
    num_global_key_value_heads, not per_layer_config) as transformers reads them."""
    raw = {k: v for k, v in unified_config().to_dict().items() if k != "per_layer_config"}
    raw.update(architectures=["Gemma4UnifiedForCausalLM"], global_head_dim=32, num_global_key_value_heads=1)
    assert_random_checkpoint_is_what_transformers_reads(tmp_path, raw, TOKENS)


def test_wrapper_runs_its_text_model(tmp_path):
    """A gemma4_unified checkpoint (Gemma4UnifiedForConditionalGeneration: the decoder under model.language_model.*,
    the patch and audio-frame embedders under model.embed_vision.* / model.embed_audio.*, left unread) gives its
    text-only logits, on every backend."""
    config = transformers.Gemma4UnifiedConfig(
        text_config=unified_config(pad_token_id=0).to_dict(),  # the wrapper pads out image tokens with it
        vision_config=dict(mm_embed_dim=32, mm_posemb_size=16, patch_size=2),
        audio_config=dict(audio_embed_dim=16))
    hf = build_transformers_model(tmp_path, config, model_class=transformers.Gemma4UnifiedForConditionalGeneration)
    for backend in BACKENDS:
        assert_matches_transformers(tmp_path, hf, backend, TOKENS)


# ------------------------------------------------------------------ config


def test_config_defaults_are_transformers():
    """Gemma4UnifiedTextConfig's own defaults (a window of 1024, a context of 262,144, "vision" attention), and no
    per-layer inputs or experts, which the same keys read as gemma4_text would bring."""
    raw = {k: v for k, v in unified_config().to_dict().items() if k not in (
        "sliding_window", "max_position_embeddings", "use_bidirectional_attention")}
    config, want = ModelConfig.from_dict(raw), transformers.Gemma4UnifiedTextConfig(**raw)
    assert (config.arch.layers[0].window, config.max_seq_len) == (want.sliding_window, want.max_position_embeddings)
    assert want.use_bidirectional_attention == "vision" and config.arch.per_layer_inputs is None
    as_gemma4 = ModelConfig.from_dict({**raw, "model_type": "gemma4_text", "enable_moe_block": True, "num_experts": 4,
                                       "top_k_experts": 2, "moe_intermediate_size": 32})
    assert as_gemma4.arch.per_layer_inputs is not None and as_gemma4.arch.moe is not None
    assert as_gemma4.arch.layers[0].window != config.arch.layers[0].window


def test_reads_the_12b_release_config():
    """Gemma 4 12B's config.json (its text_config abridged to the keys that size or shape the model): the keys
    transformers leaves unread for this family (per-layer inputs, experts) are left unread here too."""
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 8
    text = {"model_type": "gemma4_unified_text", "attention_bias": False, "attention_k_eq_v": True,
            "enable_moe_block": False, "final_logit_softcapping": 30.0, "global_head_dim": 512, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3840, "hidden_size_per_layer_input": 0,
            "intermediate_size": 15360, "layer_types": types, "max_position_embeddings": 262144,
            "moe_intermediate_size": None, "num_attention_heads": 16, "num_experts": None,
            "num_global_key_value_heads": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
            "num_kv_shared_layers": 0, "rms_norm_eps": 1e-6, "sliding_window": 1024, "tie_word_embeddings": True,
            "rope_parameters": {
                "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1e6, "rope_type": "proportional"},
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
            "top_k_experts": None, "use_bidirectional_attention": "vision", "use_double_wide_mlp": False,
            "vocab_size": 262144, "vocab_size_per_layer_input": 262144, "eos_token_id": 1, "bos_token_id": 2}
    config = ModelConfig.from_dict({
        "model_type": "gemma4_unified", "architectures": ["Gemma4UnifiedForConditionalGeneration"],
        "text_config": text, "tie_word_embeddings": True, "vision_config": {"model_type": "gemma4_unified_vision"},
        "audio_config": {"model_type": "gemma4_unified_audio"}})
    arch = config.arch
    assert (config.model_type, config.head_dim, config.num_kv_heads, config.max_seq_len) == (
        "gemma4_unified_text", 512, 8, 262144)
    assert (arch.per_layer_inputs, arch.moe, arch.final_softcap) == (None, None, 30.0)
    full, sliding = arch.layers[5], arch.layers[0]
    assert (full.window, full.heads.kv_heads, full.heads.values_are_keys, full.rope.rotary_dim) == (None, 1, True, 128)
    assert (sliding.window, sliding.heads.head_dim, sliding.heads.kv_heads) == (1024, 256, None)


@pytest.mark.parametrize("key, value, error", [
    ("use_bidirectional_attention", "all", UnsupportedFeatureError),
    ("attention_bias", True, UnsupportedFeatureError),
    ("num_kv_shared_layers", 6, ConfigError),
])
def test_refuses_by_name(key, value, error):
    with pytest.raises(error, match=re.escape(repr(key))):
        ModelConfig.from_dict({**unified_config().to_dict(), key: value})
