"""LFM2 / LFM2.5 (``lfm2``): gated short-convolution layers carrying their last inputs per sequence between attention
layers, against transformers (and mlx-lm's conversions against mlx-lm) on every runnable backend, through the
engine, and as Liquid AI's releases write their config."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers

import ferrum
from ferrum.config import ModelConfig
from ferrum.errors import AdapterError, ConfigError, UnsupportedFeatureError
from support import (
    float32_model, small_pool_engine,
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match,
    assert_random_checkpoint_is_what_transformers_reads, build_transformers_model, mlx_lm_logits, reference_logits,
    runnable_backends, scaled_error, staggered_greedy_workload, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
LAYER_TYPES = ["conv", "full_attention", "conv", "conv", "full_attention", "conv"]


def lfm2_config(**extra) -> transformers.Lfm2Config:
    """Four heads of 16 over two key/value heads, a kernel of 3, the first and last layers convolutions; a
    feed-forward width of 100 that LFM2's MLP makes 80 (two thirds, 66, rounded up to a multiple of 16)."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=100, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, conv_L_cache=3, block_multiple_of=16,
                    layer_types=LAYER_TYPES)
    return transformers.Lfm2Config(**{**settings, **extra})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lfm2")
    hf = build_transformers_model(folder, lfm2_config())
    write_tokenizer(folder, VOCAB)
    return folder, hf


def test_reads_layer_kinds_the_feed_forward_width_and_tied_embeddings(checkpoint):
    folder, hf = checkpoint
    model = float32_model(folder)
    config, arch = model.config, model.config.arch
    assert [spec.mixer for spec in arch.layers] == ["short_conv", "attention", "short_conv", "short_conv",
                                                    "attention", "short_conv"]
    assert config.intermediate_size == hf.model.layers[0].feed_forward.w1.out_features == 80
    assert config.tie_word_embeddings and arch.short_conv.conv_kernel == 3 and config.rms_norm_eps == 1e-5
    assert sorted(model.states.layers) == [0, 2, 3, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoint, backend):
    folder, hf = checkpoint
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_a_convolution_without_its_state_or_with_a_silu_is_caught(checkpoint, monkeypatch):
    """The decode check fails where the convolution starts each pass from zeros, or runs a SiLU (Gated DeltaNet's)
    on its output."""
    folder, hf = checkpoint
    want = reference_logits(hf, TOKENS)
    model = float32_model(folder)
    conv = model.ops.causal_conv1d
    monkeypatch.setattr(model.ops, "causal_conv1d", lambda x, w, state, cu, silu: conv(x, w, state * 0, cu, silu))
    with pytest.raises(AssertionError):
        assert_forward_and_decode_match(model, TOKENS, want)
    model = float32_model(folder)
    monkeypatch.setattr(model.ops, "causal_conv1d", lambda x, w, state, cu, silu: conv(x, w, state, cu, True))
    with pytest.raises(AssertionError):
        assert_forward_and_decode_match(model, TOKENS, want)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoint):
    folder, hf = checkpoint
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB, first_y=1)


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoint, monkeypatch):
    """A batch that fails in its third convolution, after the first two made new states, changes nothing."""
    folder, hf = checkpoint
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), hf, TOKENS, "causal_conv1d", monkeypatch)


def _as_released(folder, destination, **changes):
    """The checkpoint with config.json as Liquid AI's releases write it: block_ff_dim (not intermediate_size),
    full_attn_idxs (no layer_types), tie_embedding, rope_theta at the top, block_dim (which mlx-lm reads)."""
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    for key in ("intermediate_size", "layer_types", "tie_word_embeddings", "rope_parameters", "full_attn_idxs"):
        config.pop(key)
    config.update(block_ff_dim=100, full_attn_idxs=[i for i, t in enumerate(LAYER_TYPES) if t != "conv"],
                  tie_embedding=True, rope_theta=1_000_000.0, block_dim=64, **changes)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_a_released_config_reads_as_transformers_reads_it(checkpoint, tmp_path):
    """block_ff_dim sizes the MLP, full_attn_idxs places the attention layers: transformers and Ferrum agree on a
    config written so (and on the widths where the multiplier is 1.5 and the rounding is to 48)."""
    folder, hf = checkpoint
    released = _as_released(folder, tmp_path / "released")
    got = float32_model(released).forward_verify("r", TOKENS)
    want = reference_logits(transformers.AutoModelForCausalLM.from_pretrained(released).eval(), TOKENS)
    assert scaled_error(got, want) <= 1e-4 and scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    raw = json.loads((released / "config.json").read_text())
    for changes in ({"block_ffn_dim_multiplier": 1.5, "block_multiple_of": 48}, {"block_auto_adjust_ff_dim": False}):
        width = transformers.Lfm2ForCausalLM(transformers.Lfm2Config(**{**raw, **changes})).model.layers[0]
        assert ModelConfig.from_dict({**raw, **changes}).intermediate_size == width.feed_forward.w1.out_features


def test_configs_it_cannot_run_as_written_are_refused():
    raw = {**lfm2_config().to_dict(), "full_attn_idxs": [1, 3]}
    with pytest.raises(ConfigError, match=r"full_attn_idxs.*layer_types attends at \[1, 4\].*make them agree"):
        ModelConfig.from_dict(raw)
    with pytest.raises(UnsupportedFeatureError, match="conv_bias"):
        ModelConfig.from_dict({**lfm2_config().to_dict(), "conv_bias": True})


def test_speculative_decoding_and_lora_are_refused_up_front(checkpoint, tmp_path):
    folder, _ = checkpoint
    with pytest.raises(UnsupportedFeatureError, match="speculative decoding cannot run 'lfm2'"):
        ferrum.load(folder, backend="cpu", speculative="lookup")
    with pytest.raises(AdapterError, match="does not adapt the short convolution layers' projections\\)"):
        float32_model(folder).adapters.load("x", tmp_path)
    model = float32_model(folder)
    model.prefill("s", TOKENS)
    with pytest.raises(UnsupportedFeatureError, match="cannot be cut back"):
        model.truncate_kv("s", 5)


def test_the_vision_language_wrapper_runs_its_text_model(tmp_path):
    """LFM2-VL (``lfm2_vl``) as transformers saves it: its text model under ``model.language_model``, the vision
    tower and projector beside it, unread."""
    config = transformers.Lfm2VlConfig(text_config=lfm2_config().to_dict(), projector_hidden_size=32,
                                       vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2))
    hf = build_transformers_model(tmp_path, config, model_class=transformers.Lfm2VlForConditionalGeneration)
    model = float32_model(tmp_path)
    assert model.config.model_type == "lfm2" and model.config.intermediate_size == 80
    assert scaled_error(model.forward_verify("v", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoint, backend):
    folder, hf = checkpoint
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(checkpoint, tmp_path, bits):
    """mlx-lm's conversion stores the convolution taps [C, K, 1] and, quantized, packs every projection and the
    embedding but not the taps: it runs on every backend as mlx-lm runs it."""
    from mlx_lm.convert import convert
    from safetensors.numpy import load_file

    folder, hf = checkpoint
    converted = tmp_path / "mlx"
    convert(str(_as_released(folder, tmp_path / "hf")), str(converted), quantize=bits is not None, q_bits=bits or 4,
            q_group_size=32)
    stored = load_file(converted / "model.safetensors")
    assert stored["model.layers.0.conv.conv.weight"].shape == (64, 3, 1)
    assert ("model.layers.0.conv.in_proj.scales" in stored) == (bits is not None)
    want = mlx_lm_logits(converted, TOKENS)
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    for backend in BACKENDS:
        assert scaled_error(float32_model(converted, backend).forward_verify("m", TOKENS), want) <= 1e-4, backend


def test_random_checkpoints_are_what_transformers_reads(tmp_path):
    """ferrum.random_checkpoint (benchmarks, the JAX plugin's tests) writes LFM2's tensors as transformers stores
    them (the taps [C, 1, K], the final norm as embedding_norm, no LM head where tied)."""
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / "lfm2", lfm2_config().to_dict(), TOKENS)
