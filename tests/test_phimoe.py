"""Phi-3.5-MoE (``phimoe``): sparsemixer top-2 routing, biased LayerNorms, biased attention and LM head, a sliding
window, longrope with its own short and long mscale; against transformers' router and model on every runnable
backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.phimoe.modeling_phimoe import sparsemixer

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from ferrum.moe.routing import route_sparsemixer
from support import assert_forward_and_decode_match, build_transformers_model, reference_logits, runnable_backends

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
ORIGINAL = 8
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": ORIGINAL,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)],
            "short_mscale": 1.1, "long_mscale": 1.3}


def phimoe_config(**extra) -> transformers.PhimoeConfig:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=6, max_position_embeddings=128, rms_norm_eps=1e-5,
                    attention_bias=True, lm_head_bias=True, router_jitter_noise=0.05, sliding_window=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.PhimoeConfig(**{**settings, **extra})


VARIANTS = {"window": {}, "longrope": dict(sliding_window=None, rope_parameters=LONGROPE, lm_head_bias=False)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for variant, extra in VARIANTS.items():
        folder = tmp_path_factory.mktemp(variant)
        out[variant] = folder, build_transformers_model(folder, phimoe_config(**extra))
    return out


@pytest.mark.parametrize("eps", [0.01, 0.0, 0.5])
def test_sparsemixer_matches_transformers_including_ties_and_signs(eps):
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((300, 8)).astype(np.float32)
    logits[100:200] = rng.integers(-2, 3, size=(100, 8))  # ties between the best, zeros, all-negative rows
    logits[200] = 0.0
    logits[201] = -1.0
    weights, ids = sparsemixer(torch.from_numpy(logits), jitter_eps=eps, training=False)
    got_ids, got_weights = route_sparsemixer(logits, eps)
    np.testing.assert_array_equal(got_ids, ids.numpy())
    np.testing.assert_allclose(got_weights, weights.numpy(), rtol=1e-6, atol=1e-7)


def test_the_jitter_eps_decides_which_logits_share_the_softmax():
    """Logits further than 2 * eps (relative) below the best are left out: at 0.01 the runner-up 1.9 is, so the
    first weight is 1; at 0.5 it and 0.0 share the softmax (-1.0, 1.5 below relative to 2, still does not)."""
    logits = np.array([[2.0, 1.9, 0.0, -1.0]], dtype=np.float32)
    assert route_sparsemixer(logits, 0.01)[1][0, 0] == 1.0
    np.testing.assert_allclose(route_sparsemixer(logits, 0.5)[1][0, 0], 1 / (1 + np.exp(-0.1) + np.exp(-2.0)),
                               rtol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    """Forward and token-by-token decode; the longrope model within its original context, where transformers
    and Microsoft's code agree (see ferrum.arch.families.moe._phimoe)."""
    folder, hf = checkpoints[variant]
    tokens = TOKENS if variant == "window" else TOKENS[:ORIGINAL]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert [spec.mlp for spec in model.config.arch.layers] == ["moe"] * 3
    assert_forward_and_decode_match(model, tokens, reference_logits(hf, tokens))


def test_longrope_reads_both_mscales_and_switches_past_the_original_context(checkpoints):
    rope = ModelConfig.from_file(checkpoints["longrope"][0]).arch.layers[0].rope
    assert (rope.kind, rope.attention_factor, rope.long_attention_factor, rope.switches) == (
        "longrope", 1.1, 1.3, True)
    from ferrum.testing.arch_oracle import ArchOracle

    folder, _ = checkpoints["longrope"]
    want = ArchOracle(folder).logits(TOKENS)  # past the original context: the long table, times long_mscale
    model = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", block_size=4, dtype="float32")
    assert_forward_and_decode_match(model, TOKENS, want)


def _raw(checkpoints, **overrides) -> dict:
    import json

    raw = json.loads((checkpoints["window"][0] / "config.json").read_text())
    return {**raw, **overrides}


@pytest.mark.parametrize("overrides, error, key", [
    ({"num_experts_per_tok": 3}, UnsupportedFeatureError, "num_experts_per_tok"),
    ({"router_jitter_noise": -0.1}, ConfigError, "router_jitter_noise"),
    ({"hidden_act": "gelu"}, UnsupportedFeatureError, "hidden_act"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, UnsupportedFeatureError,
     "rope_parameters"),
    ({"rope_parameters": {**LONGROPE, "long_mscale": -1.0}}, ConfigError, "rope_parameters"),
    ({"rope_parameters": {**LONGROPE, "partial_rotary_factor": 0.5}}, UnsupportedFeatureError, "rope_parameters"),
])
def test_configs_ferrum_cannot_run_are_refused_by_name(checkpoints, overrides, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict(_raw(checkpoints, **overrides))


@pytest.mark.parametrize("bits", [None, 8])
def test_mlx_lm_conversions_load(bits, tmp_path):
    """mlx-lm's conversion (experts stacked as ``block_sparse_moe.switch_mlp.*``), float or packed at 8 bits: read
    on every backend as mlx-lm runs it (its Phi-3.5-MoE has no sliding window: none here)."""
    mx = pytest.importorskip("mlx.core")
    convert = pytest.importorskip("mlx_lm.convert")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    import json

    from support import write_tokenizer

    source = tmp_path / "hf"
    build_transformers_model(source, phimoe_config(sliding_window=None, lm_head_bias=True))
    config = json.loads((source / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]  # the transformers 4 spelling mlx-lm reads
    (source / "config.json").write_text(json.dumps(config))
    write_tokenizer(source)
    converted = tmp_path / "mlx"
    convert.convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    loaded = mlx_utils.load_model(converted)
    reference_model = loaded[0] if isinstance(loaded, tuple) else loaded
    ref = np.array(reference_model(mx.array([TOKENS])).astype(mx.float32))[0]
    for backend in BACKENDS:
        model = DecoderOnlyLLM.from_pretrained(converted, backend=backend, block_size=4, dtype="float32")
        assert_forward_and_decode_match(model, TOKENS, ref)
