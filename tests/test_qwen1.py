"""Qwen (1) (``qwen``: Qwen-1.8B ... 72B, remote code): a tiny random checkpoint under the release's names and config
keys (``transformer.h.*``, ``c_attn``, ``w1`` / ``w2``, kv_channels, layer_norm_epsilon, rotary_emb_base, seq_length),
against mlx-lm's qwen on every backend, through the engine, and mlx-lm's conversions (float and 4-bit)."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import (
    assert_copied_release_converts_as_mlx_lm, assert_engine_keeps_mlx_lm_greedy_tokens, backends, model_logits,
    random_mlx_lm_model, write_release,
)
from support import assert_forward_and_decode_match, float32_model, scaled_error, with_edited_tensors

pytest.importorskip("mlx_lm")
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]

#: Qwen-7B's config.json keys, the sizes tiny; its context past seq_length is the release's dynamic NTK and logn
#: attention (which mlx-lm does not run), so the tests stay within it.
CONFIG = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"},
    "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
    "hidden_size": 64, "intermediate_size": 160, "initializer_range": 0.02, "kv_channels": 16,
    "layer_norm_epsilon": 1e-6, "max_position_embeddings": 64, "no_bias": True, "num_attention_heads": 4,
    "num_hidden_layers": 2, "onnx_safe": None, "rotary_emb_base": 10000, "rotary_pct": 1.0,
    "scale_attn_weights": True, "seq_length": 48, "softmax_in_fp32": False, "tie_word_embeddings": False,
    "use_cache": True, "use_cache_quantization": False, "use_dynamic_ntk": True, "use_flash_attn": "auto",
    "use_logn_attn": True, "vocab_size": VOCAB,
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    return folder, write_release(folder, random_mlx_lm_model(CONFIG), CONFIG, TOKENS)


@pytest.mark.parametrize("backend", backends())
def test_logits_match_mlx_lm(release, backend):
    folder, want = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_engine_keeps_mlx_lm_greedy_tokens(release):
    assert_engine_keeps_mlx_lm_greedy_tokens(release[0], random_mlx_lm_model(CONFIG), VOCAB)


def test_the_context_stops_at_seq_length_where_the_release_scales_past_it(release):
    """use_dynamic_ntk and use_logn_attn are exactly 1 within seq_length; with both off the whole context runs."""
    folder, _ = release
    assert ModelConfig.from_file(folder).max_seq_len == 48
    assert ModelConfig.from_dict({**CONFIG, "use_dynamic_ntk": False, "use_logn_attn": False}).max_seq_len == 64
    assert ModelConfig.from_dict({**CONFIG, "use_dynamic_ntk": False}).max_seq_len == 48
    one, both = (ModelConfig.from_dict({**CONFIG, **change}).arch.context_limit[1]
                 for change in ({"use_dynamic_ntk": False}, {}))
    assert one.startswith("use_logn_attn changes Qwen's attention past seq_length (48 tokens)") and "set it " in one
    assert both.startswith("use_dynamic_ntk and use_logn_attn change Qwen's") and "set them " in both


def test_rotary_emb_base_is_the_rope_base(tmp_path):
    """Qwen-72B's base (mlx-lm's qwen leaves rotary_emb_base unread, 10000 always): Ferrum as mlx-lm's model with
    its rope at that base, and away from the default base's logits (the control)."""
    import mlx.nn as nn

    config = {**CONFIG, "rotary_emb_base": 1000000}
    model = random_mlx_lm_model(config)
    write_release(tmp_path, model, config, TOKENS)
    for layer in model.transformer.h:
        layer.attn.rotary_emb = nn.RoPE(16, traditional=False, base=1000000.0)
    want = model_logits(model, TOKENS)
    got = float32_model(tmp_path).forward_verify("b", TOKENS)
    assert scaled_error(got, want) <= 1e-4
    assert scaled_error(got, model_logits(random_mlx_lm_model(CONFIG), TOKENS)) > 1e-2


def test_w1_is_the_up_projection_and_w2_the_gate(release, tmp_path):
    """The control for the MLP's names: w1 and w2 swapped move Ferrum's logits off mlx-lm's."""
    folder, want = release

    def swap(tensors):
        for i in range(CONFIG["num_hidden_layers"]):
            p = f"transformer.h.{i}.mlp."
            tensors[p + "w1.weight"], tensors[p + "w2.weight"] = tensors[p + "w2.weight"], tensors[p + "w1.weight"]

    swapped = with_edited_tensors(folder, tmp_path / "swapped", swap)
    assert scaled_error(float32_model(swapped).forward_verify("s", TOKENS), want) > 1e-2


@pytest.mark.slow  # mlx-lm converts and quantizes: ~2 s apiece
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    assert_copied_release_converts_as_mlx_lm(release[0], tmp_path, TOKENS, bits, {"model_type": "qwen"})


@pytest.mark.parametrize("change, error, key", [
    ({"kv_channels": 32}, ConfigError, "kv_channels"),
    ({"rotary_pct": 0.5}, UnsupportedFeatureError, "rotary_pct"),
    ({"no_bias": False}, UnsupportedFeatureError, "no_bias"),
    ({"scale_attn_weights": False}, UnsupportedFeatureError, "scale_attn_weights"),
    ({"use_cache_quantization": True}, UnsupportedFeatureError, "use_cache_quantization"),
    ({"seq_length": None}, ConfigError, "seq_length"),
])
def test_unsupported_variants_are_refused_by_name(change, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**CONFIG, **change})
