"""Gear (``gear``; remote code, which transformers lacks) against mlx-lm's gear in float32: a random checkpoint built
from mlx-lm's own Model and saved under the release's names (its convolutions' taps ``[C, 1, K]``), on every backend,
through the engine, mixed batches and a failed pass of its gated key/value convolutions (a state per sequence), and
mlx-lm's conversions (float and 4-bit) of it; its convolutions, soft-caps, scalings and windows each a control."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import MlxLmReference, backends, model_logits, random_mlx_lm_model, write_release
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, scaled_error, small_pool_engine, staggered_greedy_workload,
)

pytest.importorskip("mlx_lm.models.gear")

VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
SLIDING, FULL, CONV = "sliding_attention", "full_attention", "conv_mixer"
#: Sliding layers of a 4-token window (the prompt is longer), convolution layers between them and a full layer with
#: linear rope scaling; a query scale other than head_dim's, both soft-caps.
CONFIG = {"model_type": "gear", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "rms_norm_eps": 1e-6, "layer_types": [SLIDING, CONV, FULL, CONV, SLIDING], "sliding_window": 4,
          "query_pre_attn_scalar": 24, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
          "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "hidden_activation": "gelu_pytorch_tanh",
          "attn_logit_softcapping": 2.0, "final_logit_softcapping": 10.0, "conv_L_cache": 3,
          "max_position_embeddings": 128, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1}
TAPS = (".key_conv.weight", ".value_conv.weight")


def _draw(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    if name.endswith("norm.weight"):  # (1 + w) norms: w around 0
        return rng.normal(0, 0.2, shape)
    if name == "model.embed_tokens.weight":  # times sqrt(64) on the way in
        return rng.normal(0, 0.125, shape)
    if name.endswith(TAPS):
        return rng.normal(0, 0.6, shape)
    if name.endswith(".bias"):
        return rng.normal(0, 0.2, shape)
    return rng.normal(0, shape[-1] ** -0.5, shape)


def _model(**changed):
    return random_mlx_lm_model({**CONFIG, **changed}, draw=_draw)


def _release_taps(model) -> dict:
    """The convolutions' taps as the release stores them, ``[C, 1, K]`` (mlx-lm's sanitize makes them ``[C, K, 1]``)."""
    from mlx.utils import tree_flatten

    return {name: np.ascontiguousarray(np.array(value).transpose(0, 2, 1))
            for name, value in tree_flatten(model.parameters()) if name.endswith(TAPS)}


def _save(model, folder, config) -> np.ndarray:
    return write_release(folder, model, config, TOKENS, extra={
        **_release_taps(model), "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, dtype=np.float32)})


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder, mlx-lm's model, its logits over TOKENS): the release's names, layouts and config keys."""
    model = _model()
    folder = tmp_path_factory.mktemp("gear")
    return folder, model, _save(model, folder, CONFIG)


@pytest.mark.parametrize("backend", backends())
def test_logits_match_mlx_lm(release, backend):
    folder, _, want = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_biased_convolutions_match_mlx_lm(tmp_path):
    """attention_bias: biased projections in every layer, and biased convolutions."""
    model = _model(attention_bias=True)
    want = _save(model, tmp_path / "biased", {**CONFIG, "attention_bias": True})
    assert_forward_and_decode_match(float32_model(tmp_path / "biased", block_size=4), TOKENS, want)


def test_the_release_layout_is_what_it_reads(release, recwarn):
    """The taps stored as the release stores them (the rope buffer quiet), read as such."""
    from safetensors import safe_open

    with safe_open(release[0] / "model.safetensors", "np") as f:
        assert f.get_slice("model.layers.1.local_mixer.key_conv.weight").get_shape() == [32, 1, 3]
    float32_model(release[0])
    assert not [w for w in recwarn if "rotary_emb" in str(w.message)]


def test_mixed_batches_and_a_failed_pass(release, monkeypatch):
    folder, model, _ = release
    reference = MlxLmReference(model)
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder, block_size=4), reference, VOCAB)
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder, block_size=4), reference, TOKENS,
                                                      "causal_conv1d", monkeypatch)


def test_engine_batching_chunking_and_preemption_keep_greedy_tokens(release):
    folder, model, _ = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config),
                                      MlxLmReference(model), staggered_greedy_workload(VOCAB))


@pytest.mark.slow  # mlx-lm converts (and packs) the checkpoint
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path, monkeypatch):
    """mlx-lm's convert loads the tokenizer through transformers' AutoTokenizer, which (5.24) builds a config of the
    folder first and refuses Gear's conv_mixer layer kind: the tokenizer is read from tokenizer.json alone here."""
    import mlx_lm.utils
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(mlx_lm.utils, "load_tokenizer", lambda path, *args, **kwargs: TokenizerWrapper(
        PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))))
    tensors, want = mlx_lm_converted(release[0], tmp_path / "mlx", TOKENS[:9], bits=bits)
    assert tensors["model.layers.1.local_mixer.key_conv.weight"].shape == (32, 3, 1)
    assert ("model.layers.1.local_mixer.q_proj.scales" in tensors) == (bits is not None)
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS[:9], want, packed=bits is not None)


@pytest.mark.parametrize("change", [{"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                                   {"query_pre_attn_scalar": 16}, {"rope_scaling": None}, {"sliding_window": 64},
                                   {"rope_local_base_freq": 1000.0}])
def test_each_setting_moves_the_logits(release, change):
    """Controls: mlx-lm's model with the same weights and one setting changed gives other logits."""
    assert scaled_error(model_logits(_model(**change), TOKENS), release[2]) > 1e-2


def test_the_convolutions_move_the_logits(release):
    """Control: convolutions that pass each token's key and value through alone (taps [0, 0, 1]) give other logits,
    so the parity checks what they mix over time."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = _model()
    alone = mx.array(np.tile(np.array([0.0, 0.0, 1.0], np.float32).reshape(1, 3, 1), (32, 1, 1)))
    model.load_weights([(name, alone) for name, _ in tree_flatten(model.parameters()) if name.endswith(TAPS)],
                       strict=False)
    assert scaled_error(model_logits(model, TOKENS), release[2]) > 1e-2


def test_without_layer_types_every_layer_is_full_attention():
    config = ModelConfig.from_dict({k: v for k, v in CONFIG.items() if k != "layer_types"})
    assert config.arch.windows == (None,) * 5 and config.arch.conv_kv_gated is None
    assert {layer.mixer for layer in config.arch.layers} == {"attention"}


@pytest.mark.parametrize("change, error, key", [
    ({"use_bidirectional_attention": True}, UnsupportedFeatureError, "use_bidirectional_attention"),
    ({"conv_L_cache": 1}, UnsupportedFeatureError, "conv_L_cache"),
    ({"hidden_activation": "relu"}, UnsupportedFeatureError, "hidden_activation"),
    ({"layer_types": [SLIDING, "linear_attention", FULL, CONV, SLIDING]}, ConfigError, "layer_types"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedFeatureError, "rope_scaling"),
])
def test_variants_are_refused_by_name(change, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**CONFIG, **change})
