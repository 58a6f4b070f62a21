"""OpenELM (``openelm``: Apple's OpenELM 270M-3B; remote code, which transformers lacks): a tiny random checkpoint built
from mlx-lm's own model (whose names are the release's: mlx-lm renames nothing), each layer with its own query and
key/value heads and MLP width, against mlx-lm's logits on every runnable backend, through the engine, and mlx-lm's
conversions (float and 4-bit)."""

from __future__ import annotations


import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import MlxLmReference, fan_in, model_logits, random_mlx_lm_model, write_release
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm,
    assert_forward_and_decode_match, float32_model, mlx_lm_converted, runnable_backends, scaled_error,
    small_pool_engine, staggered_greedy_workload,
)

pytest.importorskip("mlx_lm")
BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(1).randint(0, VOCAB, size=14)]
#: A release's config.json (OpenELM-270M's keys, sizes shrunk): four queries per key/value head in every layer, 1 to 3
#: key/value heads (the pool's 3; the fewer padded with zero heads), MLPs 32 to 256 wide (ffn_dim_divisor 32).
CONFIG = {
    "activation_fn_name": "swish", "architectures": ["OpenELMForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_openelm.OpenELMConfig",
                 "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 2, "ffn_dim_divisor": 32, "ffn_multipliers": [0.5, 1.0, 2.0, 4.0],
    "ffn_with_glu": True, "head_dim": 16, "initializer_range": 0.02, "max_context_length": 128, "model_dim": 64,
    "model_type": "openelm", "normalization_layer_name": "rms_norm", "normalize_qk_projections": True,
    "num_gqa_groups": 4, "num_kv_heads": [1, 2, 3, 1], "num_query_heads": [4, 8, 12, 4],
    "num_transformer_layers": 4, "qkv_multipliers": [0.5, 1.0], "rope_freq_constant": 10000,
    "rope_max_length": 256, "share_input_output_layers": True, "torch_dtype": "float32", "use_cache": True,
    "vocab_size": VOCAB,
}


def _mlx_lm_model(config: dict):
    """mlx-lm's openelm Model of ``config`` with random parameters: matrices of std 0.6 / sqrt(fan-in), norms' weights
    around 1."""
    return random_mlx_lm_model(config, draw=fan_in(0.6))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """variant -> (folder, mlx-lm's logits over TOKENS, its model): tied as released, and untied without q/k norms;
    mlx-lm's load of each folder is the model (write_release: the names are the release's)."""
    out = {}
    for name, change in (("tied", {}), ("untied", {"share_input_output_layers": False,
                                                   "normalize_qk_projections": False})):
        model, folder = _mlx_lm_model({**CONFIG, **change}), tmp_path_factory.mktemp(name)
        out[name] = folder, write_release(folder, model, {**CONFIG, **change}, TOKENS), model
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_logits_match_mlx_lm(built, variant, backend):
    folder, want, _ = built[variant]
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_each_layer_is_read_as_its_lists_say(built):
    config = ModelConfig.from_file(built["tied"][0])
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size) == (12, 3, 16, 256)
    assert config.tie_word_embeddings and config.arch.qk_norm == "head"
    assert [s.heads.kv_heads for s in config.arch.layers] == [1, 2, None, 1]
    assert [s.intermediate_size for s in config.arch.layers] == [32, 64, 128, None]


def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(built):
    folder, _, model = built["tied"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), MlxLmReference(model),
                                      staggered_greedy_workload(VOCAB, count=6))


def test_each_new_part_changes_mlx_lm_s_logits(built):
    """Controls that the parity above can fail: mlx-lm's logits move without the q/k norms, with another layer's
    heads or width."""
    want = built["tied"][1]
    for change in ({"normalize_qk_projections": False},
                   {"num_kv_heads": [2, 2, 3, 1], "num_query_heads": [8, 8, 12, 4]},
                   {"ffn_multipliers": [1.0, 1.0, 2.0, 4.0]}):
        assert scaled_error(model_logits(_mlx_lm_model({**CONFIG, **change}), TOKENS), want) > 1e-2, change


@pytest.mark.slow  # mlx-lm converts and quantizes: a few seconds
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(built, bits, tmp_path):
    source = tmp_path / "source"  # the release without its auto_map, which mlx-lm's convert would follow
    untied = {**CONFIG, "share_input_output_layers": False, "normalize_qk_projections": False}
    write_release(source, built["untied"][2], {k: v for k, v in untied.items() if k != "auto_map"}, TOKENS)
    tensors, want = mlx_lm_converted(source, tmp_path / "mlx", TOKENS, bits, group=32)
    assert any(name.endswith(".attn.out_proj.scales") for name in tensors) == (bits is not None)
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


@pytest.mark.parametrize("change, error, key", [
    ({"num_query_heads": [4, 8, 12, 8]}, UnsupportedFeatureError, "num_query_heads"),
    ({"num_kv_heads": [1, 2, 3]}, ConfigError, "num_kv_heads"),
    ({"num_kv_heads": None}, ConfigError, "num_kv_heads"),
    ({"ffn_multipliers": [1.0]}, ConfigError, "ffn_multipliers"),
    ({"ffn_multipliers": [0.5, 1.0, 1e12, 4.0]}, ConfigError, r"ffn_multipliers' layer 2's multiplier 1000000000000.0 "
                                                              r"gives an MLP 6.4e\+13 wide"),
    ({"ffn_with_glu": False}, UnsupportedFeatureError, "ffn_with_glu"),
])
def test_unsupported_variants_are_refused_by_name(change, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**CONFIG, **change})
