"""DiffLlama (``diffllama``): differential attention run as one attention over heads twice as wide
(:mod:`ferrum.arch.differential`), compared with transformers on tiny random checkpoints, with GQA and without,
with attention biases and llama3 rope scaling; controls: a lambda left out, or the values unpaired, miss it."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.arch import differential
from ferrum.errors import ConfigError, UnsupportedFeatureError

from support import (assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, built_checkpoints,
                     float32_model, scaled_error, small_pool_engine, staggered_greedy_workload)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 97
TOKENS = [0, 5, 9, 33, 77, 90, 21, 7, 64, 12]
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _config(heads=4, kv=2, **extra):
    return transformers.DiffLlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=80, num_hidden_layers=3,
                                        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
                                        **extra)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, {
        "gqa": lambda: _config(),
        "mha_bias_llama3": lambda: _config(kv=4, attention_bias=True, rope_parameters=LLAMA3,
                                           tie_word_embeddings=True),
    })


def _logits(hf, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("name", ["gqa", "mha_bias_llama3"])
def test_matches_transformers(checkpoints, name):
    folder, hf = checkpoints[name]
    assert_forward_and_decode_match(float32_model(folder), TOKENS, _logits(hf))


def test_engine_keeps_greedy_tokens(checkpoints):
    folder, hf = checkpoints["gqa"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("control", ["no_lambda", "unpaired"])
def test_controls_miss_transformers(checkpoints, control, monkeypatch):
    folder, hf = checkpoints["gqa"]
    if control == "no_lambda":
        monkeypatch.setattr("ferrum.arch.differential.layer_lambda", lambda ops, tensor, i: 0.0)
    else:  # each value head padded as a plain head would be
        monkeypatch.setattr("ferrum.arch.heads.paired_values",
                            lambda v, kv: np.concatenate([np.asarray(v).reshape(kv, -1, *np.shape(v)[1:])] * 2, 1)
                            .reshape(-1, *np.shape(v)[1:]))
    assert scaled_error(float32_model(folder).forward_verify("all", TOKENS), _logits(hf)) > 1e-2


def test_paired_values():
    v = np.arange(4 * 3).reshape(4 * 3, 1)  # four heads of three rows
    got = differential.paired_values(v, 4).ravel().tolist()
    assert got == [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11, 0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]


def test_odd_key_value_heads_refused(tmp_path):
    from ferrum.config import ModelConfig

    raw = _config(heads=3, kv=3).to_dict()
    with pytest.raises((ConfigError, UnsupportedFeatureError), match="num_key_value_heads"):
        ModelConfig.from_dict(raw)


def test_quantized_o_proj_reads_the_combined_heads_unpadded(checkpoints, tmp_path):
    """o_proj reads the differential heads combined, at their stored width (24 here), which the load never pads to
    the run-time head_dim (48): ``ferrum quantize`` packs it at a group size that does not cut 24, and the packed
    model stays near transformers' logits (8-bit rounding)."""
    from safetensors import safe_open

    from ferrum.quant.convert import quantize_checkpoint

    folder, hf = checkpoints["gqa"]
    packed = quantize_checkpoint(folder, tmp_path / "q8", bits=8, group_size=32)
    with safe_open(str(packed / "model.safetensors"), "np") as handle:
        assert "model.layers.0.self_attn.o_proj.scales" in handle.keys()
    assert scaled_error(float32_model(packed).forward_verify("q", TOKENS), _logits(hf)) <= 2e-2
