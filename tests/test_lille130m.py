"""Lille 130M (``lille-130m``, remote code): a tiny random checkpoint under the release's names and nanoGPT-style config
keys (n_embd, n_head, n_kv_heads, n_layer, block_size; the MLP's width computed from n_embd; its rope's cached cos /
sin stored), against mlx-lm's lille-130m on every backend, through the engine, and mlx-lm's conversions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ferrum.arch.families import FAMILIES
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import (
    assert_copied_release_converts_as_mlx_lm, assert_engine_keeps_mlx_lm_greedy_tokens, backends, random_mlx_lm_model,
    write_release,
)
from support import assert_forward_and_decode_match, float32_model, scaled_error

pytest.importorskip("mlx_lm")
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]

#: Lille's config.json keys (LilleConfig's), the sizes tiny: an MLP of 256 (8/3 of 64, rounded to 256s).
CONFIG = {
    "architectures": ["LilleForCausalLM"], "model_type": "lille-130m",
    "auto_map": {"AutoConfig": "model_hf.LilleConfig", "AutoModelForCausalLM": "model_hf.LilleForCausalLM"},
    "block_size": 64, "vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_embd": 64, "dropout": 0.0,
    "layer_norm_eps": 1e-5, "n_kv_heads": 2, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "torch_dtype": "float32", "transformers_version": "4.56.0",
}
#: What the release stores beside the weights: each layer's rope tables (mlx-lm's sanitize drops them).
BUFFERS = {f"transformer.layers.{i}.attention.rotary_emb.{name}": np.ones((64, 16), np.float32)
           for i in range(2) for name in ("cos_cached", "sin_cached")}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lille")
    return folder, write_release(folder, random_mlx_lm_model(CONFIG), CONFIG, TOKENS, extra=BUFFERS)


@pytest.mark.parametrize("backend", backends())
def test_logits_match_mlx_lm(release, backend):
    folder, want = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_the_release_loads_quietly_with_its_sizes(release, recwarn):
    """Its rope tables are not reported unread; the MLP is 256 wide, four query heads share two key/value heads."""
    folder, _ = release
    float32_model(folder)
    assert not [w for w in recwarn if "unread" in str(w.message) or "not use" in str(w.message)]
    config = ModelConfig.from_file(folder)
    assert (config.intermediate_size, config.num_heads, config.num_kv_heads, config.max_seq_len) == (256, 4, 2, 64)


def test_rope_pairs_adjacent_dims(release, monkeypatch):
    """The control for the rope's pairing: rotating halves instead moves Ferrum's logits off mlx-lm's."""
    folder, want = release
    family = FAMILIES["lille-130m"]

    def halves(r, sizes):
        arch = family.build(r, sizes)
        return replace(arch, layers=tuple(replace(layer, rope=replace(layer.rope, interleaved=False))
                                          for layer in arch.layers))

    monkeypatch.setitem(FAMILIES, "lille-130m", replace(family, build=halves))
    assert scaled_error(float32_model(folder).forward_verify("h", TOKENS), want) > 1e-2


def test_engine_keeps_mlx_lm_greedy_tokens(release):
    assert_engine_keeps_mlx_lm_greedy_tokens(release[0], random_mlx_lm_model(CONFIG), VOCAB)


@pytest.mark.slow  # mlx-lm converts and quantizes: ~2 s apiece
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    assert_copied_release_converts_as_mlx_lm(release[0], tmp_path, TOKENS, bits, {"model_type": "lille-130m"})


@pytest.mark.parametrize("change, error, key", [
    ({"tie_word_embeddings": False}, UnsupportedFeatureError, "tie_word_embeddings"),
    ({"n_embd": 32, "n_head": 2, "n_kv_heads": 1}, ConfigError, "n_embd"),
    ({"n_kv_heads": 3}, ConfigError, "n_kv_heads"),
    ({"block_size": None}, ConfigError, "block_size"),
])
def test_unsupported_variants_are_refused_by_name(change, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**CONFIG, **change})
