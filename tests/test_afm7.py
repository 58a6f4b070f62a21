"""Apple's on-device Foundation Model (``afm7``; mlx-lm's afm7, no transformers code): a tiny random checkpoint of
mlx-lm's own model under its names (mlx-lm has no sanitize: the KV-reuse layers at ``model.kv_reuse_layers.{j}``), its
keys and values rounded to learned int8 steps sized so that rounding and clipping both bite, against mlx-lm on every
backend, through the engine, and mlx-lm's conversions."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import (
    assert_conversion_runs_as_mlx_lm, assert_engine_keeps_mlx_lm_greedy_tokens, backends, model_logits, normal,
    random_mlx_lm_model, write_release,
)
from support import assert_forward_and_decode_match, float32_model, scaled_error

pytest.importorskip("mlx_lm")

VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(2).randint(0, VOCAB, size=14)]
#: mlx-lm's ModelArgs keys, the sizes tiny: three regular layers, then two reading the third's keys and values.
CONFIG = {"model_type": "afm7", "vocab_size": VOCAB, "hidden_dim": 64, "num_layers": 5, "num_kv_reuse_layers": 2,
          "num_heads": 4, "num_kv_heads": 2, "hidden_dim_scale_factor": 3.25, "rope_theta": 50000.0,
          "rms_norm_eps": 1e-5}
#: Each regular layer's key and value steps: keys normed to O(1) on grids of ~60 to ~130 steps either side of 0 (the
#: larger ones clipped), values of spread ~1.6 likewise.
STEPS = [(0.02, 0.015), (0.035, 0.025), (0.025, 0.012)]


def _model(config: dict = CONFIG, steps=STEPS):
    import mlx.core as mx

    model = random_mlx_lm_model(config, seed=3, draw=normal())
    for layer, (key, value) in zip(model.model.layers, steps):
        layer.self_attn.quant_key_scale, layer.self_attn.quant_value_scale = mx.array(key), mx.array(value)
    return model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    model = _model()
    folder = tmp_path_factory.mktemp("afm7")
    return folder, model, write_release(folder, model, CONFIG, TOKENS, vocab=VOCAB)


@pytest.mark.parametrize("backend", backends())
def test_logits_match_mlx_lm(release, backend):
    folder, _, want = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_the_reuse_layers_read_the_last_regular_layers_pool_layer(release):
    config = ModelConfig.from_file(release[0])
    arch = config.arch
    assert (config.intermediate_size, config.head_dim, arch.kv_layers) == (208, 16, (0, 1, 2, 2, 2))
    assert arch.layer_stems == {3: "kv_reuse_layers.0", 4: "kv_reuse_layers.1"}


def test_the_int8_grids_and_the_reuse_matter(release):
    """The controls, on mlx-lm's model: steps so fine that nothing is rounded or clipped, or no KV-reuse layers,
    move the logits that Ferrum's match above."""
    _, model, want = release
    fine = _model(steps=[(1e-6, 1e-6)] * 3)
    assert scaled_error(model_logits(fine, TOKENS), want) > 1e-2
    plain = _model({**CONFIG, "num_layers": 3, "num_kv_reuse_layers": 0})
    assert scaled_error(model_logits(plain, TOKENS), want) > 1e-2


def test_engine_keeps_mlx_lm_greedy_tokens(release):
    folder, model, _ = release
    assert_engine_keeps_mlx_lm_greedy_tokens(folder, model, VOCAB)


@pytest.mark.slow  # mlx-lm converts and quantizes: ~2 s apiece
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path, monkeypatch):
    """mlx-lm 0.32.2's convert cannot pack afm7 (MLX's nn.quantize hands FusedLinear.to_quantized a ``mode`` it does
    not take): the test passes affine mode through, which is what that method packs."""
    from mlx_lm.models import afm7

    packs = afm7.FusedLinear.to_quantized

    def affine(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        assert mode == "affine"
        return packs(self, group_size, bits)

    monkeypatch.setattr(afm7.FusedLinear, "to_quantized", affine)
    folder, model, _ = release
    stored = assert_conversion_runs_as_mlx_lm(folder, model, tmp_path / "mlx", TOKENS, bits)
    assert "model.layers.0.self_attn.quant_key_scale" in stored


@pytest.mark.parametrize("change, error, key", [
    ({"tie_word_embeddings": False}, UnsupportedFeatureError, "tie_word_embeddings"),
    ({"num_kv_reuse_layers": 5}, ConfigError, "num_kv_reuse_layers"),
    ({"num_kv_reuse_layers": None}, ConfigError, "num_kv_reuse_layers"),
    ({"head_dim": 32}, ConfigError, "head_dim"),
])
def test_unsupported_variants_are_refused_by_name(change, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**CONFIG, **change})
