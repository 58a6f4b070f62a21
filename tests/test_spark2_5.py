"""Spark 2.5 (``spark2_5``; remote code, which transformers lacks) against mlx-lm's spark2_5 in float32: a random
checkpoint built from mlx-lm's own Model and saved under the release's names, on every backend, through the engine,
and mlx-lm's conversions (float and 4-bit, its per-head gate kept in float) of it; its gate, window and per-kind
rope each a control."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from mlx_lm_release import MlxLmReference, backends, model_logits, random_mlx_lm_model, write_release
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, scaled_error, small_pool_engine, staggered_greedy_workload,
    with_edited_tensors,
)

pytest.importorskip("mlx_lm.models.spark2_5")

VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
SLIDING, FULL = "sliding_attention", "full_attention"
#: Sliding layers of a 4-token window (the prompt is longer) rotating half of each head, a full layer of another base.
ROPES = {SLIDING: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
         FULL: {"rope_type": "default", "rope_theta": 1000000.0}}
CONFIG = {"model_type": "spark2_5", "architectures": ["Spark2_5ForCausalLM"], "vocab_size": VOCAB, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "sliding_window": 4, "layer_types": [SLIDING, SLIDING, FULL, SLIDING],
          "rope_parameters": ROPES, "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "attention_bias": False,
          "mlp_bias": False, "hidden_act": "gelu", "gate_attn_act_mode": "sigmoid",
          "headwise_attn_output_gate": True, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1}
#: What mlx-lm's sanitize drops from a release: the rope buffer, and the LM head of a tied checkpoint.
DROPPED = ("model.layers.0.self_attn.rotary_emb.inv_freq", "lm_head.weight")


def _draw(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    if name.endswith("norm.weight"):
        return 1.0 + rng.normal(0, 0.2, shape)
    if name == "model.embedding.weight":
        return rng.normal(0, 1, shape)
    return rng.normal(0, shape[-1] ** -0.5, shape)  # a projection (g_proj too: gates spread around 0.5)


def _model(**changed):
    return random_mlx_lm_model({**CONFIG, **changed}, draw=_draw)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder, mlx-lm's model, its logits over TOKENS): the release's names and config keys."""
    model, folder = _model(), tmp_path_factory.mktemp("spark2_5")
    extra = {DROPPED[0]: np.ones(4, dtype=np.float32), DROPPED[1]: np.array(model.model.embedding.weight)}
    want = write_release(folder, model, CONFIG, TOKENS, extra=extra)
    return folder, model, want


@pytest.mark.parametrize("backend", backends())
def test_logits_match_mlx_lm(release, backend):
    folder, _, want = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_what_mlx_lm_drops_is_quiet(release, recwarn):
    float32_model(release[0])
    assert not [w for w in recwarn if any(name in str(w.message) for name in DROPPED)]


def test_an_embedding_named_embed_tokens_loads(release, tmp_path):
    """Some mlx-lm conversions name the embedding model.embed_tokens, which mlx-lm's sanitize renames."""
    def renamed(tensors):
        tensors["model.embed_tokens.weight"] = tensors.pop("model.embedding.weight")

    folder = with_edited_tensors(release[0], tmp_path / "renamed", renamed)
    assert scaled_error(float32_model(folder).forward_verify("r", TOKENS), release[2]) <= 1e-4


def test_engine_batching_chunking_and_preemption_keep_greedy_tokens(release):
    folder, model, _ = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), MlxLmReference(model),
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.slow  # mlx-lm converts (and packs) the checkpoint
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    tensors, want = mlx_lm_converted(release[0], tmp_path / "mlx", TOKENS[:9], bits=bits)
    assert ("model.layers.0.self_attn.q_k_v_proj.scales" in tensors) == (bits is not None)
    assert "model.layers.0.self_attn.g_proj.scales" not in tensors  # mlx-lm keeps the gate in float
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS[:9], want, packed=bits is not None)


@pytest.mark.parametrize("change", [
    {"sliding_window": 64},
    {"rope_parameters": {**ROPES, SLIDING: {**ROPES[SLIDING], "partial_rotary_factor": 1.0}}},
    {"rope_parameters": {**ROPES, FULL: {**ROPES[FULL], "rope_theta": 10000.0}}},
    {"layer_types": [SLIDING, SLIDING, SLIDING, FULL]},
])
def test_each_setting_moves_the_logits(release, change):
    """Controls: mlx-lm's model with the same weights and one setting changed (no window within the prompt, the
    sliding layers' whole heads rotated, the full layer's base, the layer kinds) gives other logits."""
    assert scaled_error(model_logits(_model(**change), TOKENS), release[2]) > 1e-2


def test_the_head_gates_move_the_logits(release):
    """Control: every head's gate at sigmoid(0) gives other logits than the random gates."""
    import mlx.core as mx

    model = _model()
    model.load_weights([(f"model.layers.{i}.self_attn.g_proj.weight", mx.zeros((4, 64))) for i in range(4)],
                       strict=False)
    assert scaled_error(model_logits(model, TOKENS), release[2]) > 1e-2


def test_layer_kinds_default_to_three_sliding_to_one_full():
    config = ModelConfig.from_dict({k: v for k, v in {**CONFIG, "num_hidden_layers": 8}.items()
                                    if k != "layer_types"})
    assert config.arch.windows == (4, 4, 4, None) * 2
    assert [layer.rope.rotary_dim for layer in config.arch.layers[:4]] == [8, 8, 8, 16]


@pytest.mark.parametrize("change, error, key", [
    ({"attention_bias": True}, UnsupportedFeatureError, "attention_bias"),
    ({"hidden_act": "silu"}, UnsupportedFeatureError, "hidden_act"),
    ({"headwise_attn_output_gate": False}, UnsupportedFeatureError, "headwise_attn_output_gate"),
    ({"rope_parameters": {SLIDING: ROPES[SLIDING]}}, ConfigError, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, UnsupportedFeatureError,
     "rope_parameters"),
    ({"rope_parameters": {**ROPES, FULL: {"rope_type": "yarn", "factor": 4.0}}}, UnsupportedFeatureError,
     "rope_parameters"),
    ({"rope_parameters": None}, ConfigError, "rope_parameters"),
    *(({"rope_parameters": {**ROPES, SLIDING: bad}}, ConfigError,
       f"rope_parameters' entry '{SLIDING}' must be an object") for bad in (-1, "default", [1])),
    ({"sliding_window": None}, ConfigError, "sliding_window"),
])
def test_configs_mlx_lm_refuses_or_runs_otherwise_are_refused_by_name(change, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**CONFIG, **change})


def test_an_untied_head_is_read(release, tmp_path):
    """An untied release stores its own lm_head.weight, which Ferrum reads (mlx-lm's model reads it then too)."""
    folder = tmp_path / "untied"
    shutil.copytree(release[0], folder)
    (folder / "config.json").write_text(json.dumps({**CONFIG, "tie_word_embeddings": False}))
    model = _model(tie_word_embeddings=False)
    want = write_release(folder, model, {**CONFIG, "tie_word_embeddings": False}, TOKENS)
    assert scaled_error(DecoderOnlyLLM.from_pretrained(folder, dtype="float32").forward_verify("u", TOKENS),
                        want) <= 1e-4
