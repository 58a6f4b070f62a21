"""Gemma 4's text decoder: transformers' ``gemma4_text`` and the text model of its ``gemma4`` wrapper, on every
runnable backend. Sliding layers with heads of head_dim, full layers with heads of global_head_dim, fewer key/value
heads (num_global_key_value_heads) whose values are their keys (attention_k_eq_v), rope "proportional" on them;
q/k norms, a weightless value norm, q.k unscaled, each layer's layer_scalar. Ferrum runs every layer in one KV pool
of the widest heads, the narrower padded with zero dims and the fewer repeated at load (E2B / E4B's per-layer inputs
and shared KV layers: test_gemma4_e.py; 26B-A4B's MoE block: test_gemma4_moe.py; packed weights, padded as stored:
test_gemma4_packed.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_names_the_tensors_transformers_saves, assert_random_checkpoint_is_what_transformers_reads,
    randomized_reference, reference_logits, runnable_backends, saved_references, with_layer_scalars,
)

BACKENDS = runnable_backends()
#: Longer than the window of 6, so sliding layers drop keys inside the prompt.
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=24)]
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2


def gemma4_config(**extra) -> transformers.Gemma4TextConfig:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                    attention_k_eq_v=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0, sliding_window=6,
                    final_logit_softcapping=30.0, layer_types=LAYER_TYPES, max_position_embeddings=256)
    config = transformers.Gemma4TextConfig(**{**settings, **extra})
    config._attn_implementation = "eager"
    return config


#: 31B's layout (k_eq_v full layers with fewer, wider heads); full layers with their own v_proj and as many key/value
#: heads (no k_eq_v: transformers then ignores num_global_key_value_heads); every head one size (no padding).
VARIANTS = {
    "k_eq_v": {},
    "own_values": dict(attention_k_eq_v=False),
    "one_size": dict(global_head_dim=16, num_global_key_value_heads=2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_references(tmp_path_factory, VARIANTS, gemma4_config,
                            lambda config: with_layer_scalars(randomized_reference(config), 0.2))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    config = model.config
    assert config.head_dim == (16 if variant == "one_size" else 32) and config.num_kv_heads == 2
    assert [spec.window for spec in config.arch.layers] == [6, 6, None] * 2
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_generates_greedily_as_transformers(checkpoints, backend):
    folder, hf = checkpoints["k_eq_v"]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS[:10])


def test_layouts_and_tensors(checkpoints):
    folder, _ = checkpoints["k_eq_v"]
    assert_names_the_tensors_transformers_saves(folder)
    arch = ModelConfig.from_file(folder).arch
    sliding, full = arch.layers[0], arch.layers[2]
    assert (sliding.heads.head_dim, sliding.heads.kv_heads, sliding.heads.values_are_keys) == (16, None, False)
    assert (full.heads.head_dim, full.heads.kv_heads, full.heads.values_are_keys) == (None, 1, True)
    assert full.rope.proportional and full.rope.rotary_dim == 8 and sliding.rope.rotary_dim == 16
    # the proportional rope's frequencies are transformers' own
    hf_rope = transformers.models.gemma4.modeling_gemma4.Gemma4TextRotaryEmbedding(gemma4_config())
    np.testing.assert_allclose(full.rope.inv_freq(), hf_rope.full_attention_inv_freq.numpy(), rtol=1e-6)


def test_random_checkpoint_is_what_transformers_reads(tmp_path):
    """ferrum.random_checkpoint writes a release-style config's tensors (no v_proj on the k_eq_v layers, each
    layer's layer_scalar) as transformers reads them."""
    raw = {k: v for k, v in gemma4_config().to_dict().items() if k != "per_layer_config"}
    raw.update(architectures=["Gemma4ForCausalLM"], global_head_dim=32, num_global_key_value_heads=1)
    assert_random_checkpoint_is_what_transformers_reads(tmp_path, raw, TOKENS)


def test_wrapper_checkpoint_runs_its_text_model(checkpoints, tmp_path):
    """A gemma4 wrapper (Gemma4ForConditionalGeneration): its text_config is the decoder, whose tensors it saves
    under model.language_model.*; the vision and audio towers' are not the decoder's and are left unread."""
    from safetensors.numpy import load_file, save_file

    folder, hf = checkpoints["k_eq_v"]
    raw = json.loads((folder / "config.json").read_text())
    wrapped = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": raw,
               "vision_config": {"model_type": "gemma4_vision"}, "tie_word_embeddings": True}
    config = ModelConfig.from_dict(wrapped)
    assert config.model_type == "gemma4_text" and config.head_dim == 32 and config.num_kv_heads == 2
    tensors = {name.replace("model.", "model.language_model.", 1): t
               for name, t in load_file(folder / "model.safetensors").items()}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(wrapped))
    model = DecoderOnlyLLM.from_pretrained(tmp_path, backend="cpu", dtype="float32")
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_release_keys_read_as_per_layer_config(checkpoints):
    """Releases write global_head_dim and num_global_key_value_heads; transformers 5.24 saves per_layer_config in
    their place: both give the same model."""
    folder, _ = checkpoints["k_eq_v"]
    saved = json.loads((folder / "config.json").read_text())
    release = {k: v for k, v in saved.items() if k != "per_layer_config"}
    release.update(global_head_dim=32, num_global_key_value_heads=1)
    assert ModelConfig.from_dict(release) == ModelConfig.from_dict(saved)
    # without attention_k_eq_v transformers does not read num_global_key_value_heads
    assert ModelConfig.from_dict({**release, "attention_k_eq_v": False}).arch.layers[2].heads.kv_heads is None


def test_a_saved_per_layer_config_with_zero_padded_keys_reads_as_transformers_reads_it(tmp_path):
    """transformers saves per_layer_config's layer indices zero-padded past 9 layers ("05"): every full layer still
    reads its wider heads (they fell back to the sliding layers', refused as one kind of two sizes)."""
    types = ["sliding_attention"] * 5 + ["full_attention"]
    gemma4_config(num_hidden_layers=12, layer_types=types * 2).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "05" in raw["per_layer_config"]
    config = ModelConfig.from_dict(raw)
    assert config.head_dim == 32 and {layer.heads.head_dim for layer in config.arch.layers[:5]} == {16}
    with pytest.raises(ConfigError, match="per_layer_config"):
        ModelConfig.from_dict({**raw, "per_layer_config": {**raw["per_layer_config"], "5": {"head_dim": 32}}})


def test_vision_bidirectional_attention_is_causal_over_text(checkpoints):
    """The larger releases' text_config says "vision" (image tokens attend each other both ways); transformers runs
    text causally then, so it is the same model as null, not a refusal."""
    folder, _ = checkpoints["k_eq_v"]
    saved = json.loads((folder / "config.json").read_text())
    assert ModelConfig.from_dict({**saved, "use_bidirectional_attention": "vision"}) == ModelConfig.from_dict(saved)


@pytest.mark.parametrize("key,value,error", [
    ("attention_bias", True, UnsupportedFeatureError),
    ("use_bidirectional_attention", "all", UnsupportedFeatureError),
    ("global_head_dim", 8, UnsupportedFeatureError),
    ("num_global_key_value_heads", 3, ConfigError),
    ("rope_parameters", {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, UnsupportedFeatureError),
])
def test_refuses_by_name(key, value, error):
    raw = {**gemma4_config().to_dict(), "model_type": "gemma4_text", key: value}
    if key in ("global_head_dim", "num_global_key_value_heads"):
        raw.pop("per_layer_config")  # as releases write them; per_layer_config, where given, overrides them
    with pytest.raises(error, match=repr(key)):
        ModelConfig.from_dict(raw)
