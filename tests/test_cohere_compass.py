"""Cohere Compass's text decoder (``cohere_compass_text``, North-Micro-Vision's; its ``cohere_compass`` wrapper's
text_config): Command R7B's parallel blocks (one LayerNorm feeding attention and the MLP, logits scaled), with rope
that turns halves (not Command R's adjacent pairs) set per attention kind, null for none (NoPE), and Qwen 3-VL's mrope
sections, which text alone (one position on every axis) turns as plain rope. Against transformers'
CohereCompassForCausalLM and CohereCompassForConditionalGeneration (text only: its deepstack features come with
images) on every runnable backend, through the engine, and as its config class reads the keys. mlx-lm has no such
family."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_engine_keeps_greedy_tokens, assert_matches_transformers,
    assert_names_the_tensors_transformers_saves, assert_random_checkpoint_is_what_transformers_reads,
    build_transformers_model, float32_model, reference_logits, runnable_backends, scaled_error, small_pool_engine,
    staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
SLIDING, FULL = "sliding_attention", "full_attention"
#: As North-Micro-Vision writes it: mrope sections on the sliding layers' rope, none on the full layers, and stray
#: flat entries beside them that transformers drops.
RELEASE_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 500.0, "mrope_section": [4, 2, 2],
                          "mrope_interleaved": True}, FULL: None, "rope_theta": 10000.0, "rope_type": "default"}


def compass_config(**extra) -> transformers.CohereCompassTextConfig:
    """Four layers of four heads of 16 over two key/value heads, three sliding over 5 tokens (shorter than the test's
    13) to one full; logits scaled by 4 (random weights give small ones); no padding token (generate would mask the
    prompts' own 0s)."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, layer_types=[SLIDING] * 3 + [FULL], sliding_window=5, logit_scale=4.0,
                    rope_parameters=RELEASE_ROPE, max_position_embeddings=256, pad_token_id=None, bos_token_id=1,
                    eos_token_id=2)
    return transformers.CohereCompassTextConfig(**{**settings, **extra})


#: The release's layout; every layer full (the config class's default) and rotated with linear scaling, unscaled
#: logits, biased attention, an untied head.
VARIANTS = {"release": {}, "full": dict(
    layer_types=None, logit_scale=None, attention_bias=True, tie_word_embeddings=False,
    rope_parameters={FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}})}


def build_checkpoints(tmp_path_factory) -> dict:
    out = {}
    for name, extra in VARIANTS.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = folder, build_transformers_model(folder, compass_config(**extra))
    return out


def test_reads_the_layers_ropes_and_scale(checkpoints):
    arch = float32_model(checkpoints["release"][0]).config.arch
    assert [(s.window, s.rope.rotary_dim, s.rope.theta, s.rope.interleaved) for s in arch.layers] == [
        (5, 16, 500.0, False)] * 3 + [(None, 0, 1.0, False)]
    assert (arch.norm, arch.parallel, arch.logit_scale, arch.qkv_bias) == ("layer", True, 4.0, False)
    full = float32_model(checkpoints["full"][0]).config.arch
    assert [(s.window, s.rope.kind, s.rope.factor) for s in full.layers] == [(None, "linear", 2.0)] * 4
    assert (full.logit_scale, full.qkv_bias, full.o_bias) == (1.0, True, True)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_matches_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["release"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def test_the_parity_checks_the_rotated_halves(checkpoints, monkeypatch):
    """transformers' logits move where its sliding layers turn adjacent pairs (Command R's rope) instead."""
    _, hf = checkpoints["release"]
    want = reference_logits(hf, TOKENS)
    monkeypatch.setattr(transformers.models.cohere_compass.modeling_cohere_compass, "apply_rotary_pos_emb",
                        transformers.models.cohere2.modeling_cohere2.apply_rotary_pos_emb)
    assert scaled_error(reference_logits(hf, TOKENS), want) > 1e-2


@pytest.mark.parametrize("change", ["rotated_full_layer", "no_window"])
def test_the_parity_checks_the_nope_layer_and_the_window(checkpoints, tmp_path, change):
    """Ferrum's logits move from transformers' where the full layer is given the sliding layers' rope (null read as
    the flat rope_theta), or the sliding layers see every token: the comparison above would catch either."""
    folder, hf = checkpoints["release"]
    shutil.copytree(folder, tmp_path / "changed")
    raw = json.loads((folder / "config.json").read_text())
    if change == "rotated_full_layer":
        raw["rope_parameters"][FULL] = raw["rope_parameters"][SLIDING]
    else:
        raw["sliding_window"] = 64
    (tmp_path / "changed" / "config.json").write_text(json.dumps(raw))
    got = float32_model(tmp_path / "changed").forward_verify("c", TOKENS)
    # one layer of four rotated moves the logits less than the window does; still ten times the tolerance
    assert scaled_error(got, reference_logits(hf, TOKENS)) > (1e-3 if change == "rotated_full_layer" else 1e-2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ferrum_names_the_tensors_transformers_saves(checkpoints, variant):
    assert_names_the_tensors_transformers_saves(checkpoints[variant][0])


def test_random_checkpoint_is_what_transformers_reads(tmp_path):
    raw = {**compass_config().to_dict(), "architectures": ["CohereCompassForCausalLM"]}
    assert_random_checkpoint_is_what_transformers_reads(tmp_path, raw, TOKENS)


def test_wrapper_runs_its_text_model(tmp_path):
    """A cohere_compass checkpoint (CohereCompassForConditionalGeneration: the decoder under model.language_model.*,
    Qwen 3-VL's vision tower under model.visual.*, left unread) gives its text-only logits, on every backend; the
    wrapper's own tie_word_embeddings (false unless set) says whether the head is tied, and its logit_scale is the
    text model's."""
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=4)
    config = transformers.CohereCompassConfig(text_config=compass_config().to_dict(), vision_config=vision,
                                              bos_token_id=1, eos_token_id=2)
    hf = build_transformers_model(tmp_path, config, model_class=transformers.CohereCompassForConditionalGeneration)
    assert not config.tie_word_embeddings and config.text_config.tie_word_embeddings
    for backend in BACKENDS:
        assert_matches_transformers(tmp_path, hf, backend, TOKENS)


# ------------------------------------------------------------------ config


def test_config_defaults_are_transformers():
    """Without layer_types every layer is full; without logit_scale the logits are unscaled; the window, the
    epsilon and the tied head as CohereCompassTextConfig defaults them."""
    raw = {"model_type": "cohere_compass_text", "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 3,
           "num_attention_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 256,
           "rope_parameters": {FULL: {"rope_theta": 100.0}}}
    config, want = ModelConfig.from_dict(raw), transformers.CohereCompassTextConfig(**raw)
    assert want.layer_types == [FULL] * 3 and want.logit_scale is None and want.sliding_window == 4096
    assert [s.window for s in config.arch.layers] == [None] * 3 and config.arch.logit_scale == 1.0
    assert (config.rms_norm_eps, config.tie_word_embeddings, config.num_kv_heads) == (
        want.layer_norm_eps, want.tie_word_embeddings, want.num_key_value_heads)
    sliding = ModelConfig.from_dict({**raw, "layer_types": [SLIDING, FULL, FULL],
                                     "rope_parameters": {SLIDING: {"rope_theta": 100.0}, FULL: None}})
    assert sliding.arch.layers[0].window == 4096


@pytest.mark.parametrize("changes, error, words", [
    ({"rope_parameters": {SLIDING: {"rope_theta": 100.0}}}, ConfigError,
     "'rope_parameters' must hold an entry for each attention kind its layers use ('full_attention'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}, ConfigError,
     "'rope_parameters' must hold an entry for each attention kind"),
    ({"rope_parameters": {**RELEASE_ROPE, SLIDING: {"rope_type": "yarn", "factor": 2.0}}}, UnsupportedFeatureError,
     "'rope_parameters' has rope type 'yarn'"),
    ({"rope_parameters": {**RELEASE_ROPE, FULL: 1.0}}, ConfigError, "entry 'full_attention' must be an object"),
    ({"head_dim": 32}, ConfigError, "'head_dim' is 32, but Cohere Compass splits hidden_size"),
    ({"hidden_act": "gelu"}, UnsupportedFeatureError, "'hidden_act' is 'gelu'"),
    ({"logit_scale": 0}, ConfigError, "'logit_scale' must be a positive number"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict({**compass_config().to_dict(), **changes})

