"""Nanbeige 4.2 (``nanbeige``, remote code): a tiny random looped transformer with the release's config keys (two
passes over the stored layers, the final norm between them; head_dim apart from hidden_size / heads) and its
stored rope buffers, against mlx-lm's nanbeige on every backend, through the engine, and mlx-lm's conversions."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import (
    assert_copied_release_converts_as_mlx_lm, assert_engine_keeps_mlx_lm_greedy_tokens, backends, model_logits,
    random_mlx_lm_model, write_release,
)
from support import assert_forward_and_decode_match, float32_model, scaled_error

pytest.importorskip("mlx_lm")
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]

#: Nanbeige4.2-3B's config.json keys, the sizes tiny.
CONFIG = {
    "architectures": ["NanbeigeForCausalLM"], "model_type": "nanbeige",
    "auto_map": {"AutoConfig": "configuration_nanbeige.NanbeigeConfig",
                 "AutoModelForCausalLM": "modeling_nanbeige.NanbeigeForCausalLM"},
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "kv_channels": 24, "hidden_act": "silu",
    "max_position_embeddings": 64, "rope_theta": 70000000, "rope_scaling": None, "attention_bias": False,
    "attention_dropout": 0.0, "rms_norm_eps": 1e-5, "num_loops": 2, "loop_loss_weights": [],
    "skip_loop_final_norm": False, "pretraining_tp": 1, "tie_word_embeddings": False,
}
#: The release's rope buffers (mlx-lm's sanitize drops them).
BUFFERS = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(12, np.float32) for i in range(2)}


def _logits(config: dict) -> np.ndarray:
    return model_logits(random_mlx_lm_model(config), TOKENS)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nanbeige")
    return folder, write_release(folder, random_mlx_lm_model(CONFIG), CONFIG, TOKENS, extra=BUFFERS)


@pytest.mark.parametrize("backend", backends())
def test_logits_match_mlx_lm(release, backend):
    folder, want = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_the_passes_run_the_stored_layers_with_their_own_kv(release):
    """Four layers run (two passes over two stored), each with its own KV pool layer; loop_loss_weights counts
    the passes where it lists any."""
    folder, _ = release
    config = ModelConfig.from_file(folder)
    assert (config.num_layers, config.arch.stored_layers, config.arch.kv_pool_layers) == (4, 2, 4)
    assert config.arch.loop_starts == {2}
    assert ModelConfig.from_dict({**CONFIG, "num_loops": 1, "loop_loss_weights": [0.5, 0.5]}).num_layers == 6


def test_the_passes_and_the_norm_between_them_each_matter(release):
    """The controls, on mlx-lm's model: one pass, or no norm between the passes, moves the logits that Ferrum's
    match above."""
    _, want = release
    assert scaled_error(_logits({**CONFIG, "num_loops": 1}), want) > 1e-2
    assert scaled_error(_logits({**CONFIG, "skip_loop_final_norm": True}), want) > 1e-2


def test_engine_keeps_mlx_lm_greedy_tokens(release):
    assert_engine_keeps_mlx_lm_greedy_tokens(release[0], random_mlx_lm_model(CONFIG), VOCAB)


@pytest.mark.slow  # mlx-lm converts and quantizes: ~2 s apiece
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    assert_copied_release_converts_as_mlx_lm(release[0], tmp_path, TOKENS, bits, {"num_loops": 2})


@pytest.mark.parametrize("change, error, key", [
    ({"skip_loop_final_norm": True}, UnsupportedFeatureError, "skip_loop_final_norm"),
    ({"loop_share_kv": True}, UnsupportedFeatureError, "loop_share_kv"),
    ({"enable_depth_attention": True}, UnsupportedFeatureError, "enable_depth_attention"),
    ({"enable_double_loop_split": True}, UnsupportedFeatureError, "enable_double_loop_split"),
    ({"loop_loss_weights": 0.5}, ConfigError, "loop_loss_weights"),
    ({"num_loops": 0}, ConfigError, "num_loops"),
])
def test_unsupported_variants_are_refused_by_name(change, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**CONFIG, **change})
