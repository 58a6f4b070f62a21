"""Upstage's Solar Open (``solar_open``): Llama's attention with q/k/v biased by attention_bias (o never), rope over
whole heads, DeepSeek-V3's grouped sigmoid routing with a float32 router and correction
bias, and an ungated shared expert, on every layer; against transformers' SolarOpenForCausalLM on every runnable
backend, and mlx-lm's solar_open (its glm4_moe) and its conversions."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import transformers

from ferrum.backends import load_backend
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_names_the_tensors_transformers_saves, assert_random_checkpoint_is_what_transformers_reads,
    assert_router_computes_in_float32, mlx_lm_logits, reference_logits, runnable_backends, saved_references,
    scaled_error, without_correction_biases, write_tokenizer,
)

BACKENDS = runnable_backends()
BFLOAT16 = [b for b in BACKENDS if "bfloat16" in load_backend(b).info.dtypes]
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]


def solar_config(**extra) -> transformers.SolarOpenConfig:
    settings = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                    n_shared_experts=1, max_position_embeddings=256, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.SolarOpenConfig(**{**settings, **extra})


#: The release's layout (one group, unscaled weights); and groups, a scale, biased q/k/v, two shared experts (untied
#: embeddings both: mlx-lm's glm4_moe, which runs solar_open, has no tied head).
VARIANTS = {"release": {}, "grouped": dict(n_group=2, topk_group=1, routed_scaling_factor=2.5, attention_bias=True,
                                           n_shared_experts=2, num_experts_per_tok=3)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, solar_config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, built_once):
    return built_once(build_checkpoints, tmp_path_factory)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch, moe = model.config.arch, model.config.arch.moe
    grouped = variant == "grouped"
    assert [spec.mlp for spec in arch.layers] == ["moe", "moe"] and arch.qk_norm is None
    assert (arch.qkv_bias, arch.o_bias, arch.layers[0].rope.rotary_dim) == (grouped, False, 16)
    assert (moe.routing, moe.n_group, moe.routed_scale, moe.shared_expert_size, moe.router_float32) == (
        "sigmoid_grouped", 2 if grouped else 1, 2.5 if grouped else 1.0, 64 if grouped else 32, True)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_checks_the_correction_bias(checkpoints):
    """Zeroing the correction biases moves transformers' logits: they matter in the comparison above."""
    folder, hf = checkpoints["release"]
    unbiased = without_correction_biases(folder)
    assert scaled_error(reference_logits(unbiased, TOKENS), reference_logits(hf, TOKENS)) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_generates_greedily_as_transformers(checkpoints, backend):
    """Through the engine: batched with another request, the second copy of the prompt from the prefix cache."""
    folder, hf = checkpoints["grouped"]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("backend", BFLOAT16)
def test_router_and_correction_bias_stay_float32_in_bfloat16(checkpoints, backend):
    """transformers keeps the router and the correction bias in float32 (``_keep_in_fp32_modules_strict``) and
    computes the router's product in float32: so does Ferrum."""
    folder, hf = checkpoints["release"]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="bfloat16")
    mlp, ops = model.layers[1].mlp, model.ops
    gate = hf.model.layers[1].mlp.gate
    np.testing.assert_array_equal(ops.to_numpy(mlp.routing.bias), gate.e_score_correction_bias.numpy())
    assert_router_computes_in_float32(mlp, ops, gate.weight.detach().numpy())


def test_ferrum_names_the_tensors_transformers_saves(checkpoints):
    for variant in VARIANTS:
        assert_names_the_tensors_transformers_saves(checkpoints[variant][0])


def test_random_checkpoints_are_what_transformers_reads(tmp_path):
    """ferrum.random_checkpoint (benchmarks, the conformance kit) writes the tensors transformers expects."""
    raw = {**solar_config(n_group=2, topk_group=1).to_dict(), "architectures": ["SolarOpenForCausalLM"]}
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / "solar", raw, TOKENS)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**solar_config().to_dict(), **changes}


def test_config_is_read_as_transformers_reads_it():
    """num_local_experts is n_routed_experts' alias (it wins where both are given); the defaults are
    SolarOpenConfig's."""
    raw = _raw(n_routed_experts=6, num_local_experts=7)
    assert ModelConfig.from_dict(raw).arch.moe.num_experts == transformers.SolarOpenConfig(**raw).num_local_experts
    defaults = {k: v for k, v in _raw().items() if k not in (
        "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "head_dim", "n_group", "topk_group",
        "norm_topk_prob", "routed_scaling_factor", "n_shared_experts", "rope_parameters")}
    defaults["hidden_size"] = 4 * 128  # heads of the default head_dim
    config, want = ModelConfig.from_dict(defaults), transformers.SolarOpenConfig(**defaults)
    moe = config.arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size, moe.normalize, config.head_dim) == (
        want.n_routed_experts, want.num_experts_per_tok, want.moe_intermediate_size,
        want.moe_intermediate_size * want.n_shared_experts, want.norm_topk_prob, want.head_dim) == (
        128, 8, 1280, 1280, True, 128)
    assert config.arch.layers[0].rope.theta == want.rope_parameters["rope_theta"] == 1e6


@pytest.mark.parametrize("changes, error, words", [
    ({"num_experts_per_tok": 9}, ConfigError, "'num_experts_per_tok' (9) exceeds the 8 experts"),
    ({"n_group": 3}, ConfigError, "'n_group' (3) must divide the 8 routed experts"),
    ({"first_k_dense_replace": 1}, UnsupportedFeatureError, "makes every layer sparse and ignores it"),
    ({"use_qk_norm": True}, UnsupportedFeatureError, "never norms q and k"),
    # transformers' SolarOpen rotates whole heads (a partial factor makes its rope fail on shapes)
    ({"partial_rotary_factor": 0.5}, UnsupportedFeatureError, "'partial_rotary_factor'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     UnsupportedFeatureError, "sets partial_rotary_factor 0.5"),
    ({"hidden_act": "gelu"}, UnsupportedFeatureError, "'hidden_act'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


# ------------------------------------------------------------------ mlx-lm

needs_mlx = pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")


def _as_mlx_lm_reads_it(folder, destination):
    """The checkpoint with the keys mlx-lm's solar_open requires (the transformers-4 rope_theta and
    partial_rotary_factor, first_k_dense_replace, intermediate_size) and a tokenizer for its conversion."""
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope.get("partial_rotary_factor", 1.0),
                  first_k_dense_replace=0, intermediate_size=48)
    (destination / "config.json").write_text(json.dumps(config))
    write_tokenizer(destination)
    return destination


@needs_mlx
def test_mlx_backend_matches_mlx_lm(checkpoints, tmp_path):
    """On the release's layout, one group: mlx-lm's glm4_moe zeroes the groups it drops where transformers sets them
    to -inf, so with several groups and negative corrected scores its choice differs from transformers' (which
    Ferrum follows; see test_model_matches_transformers)."""
    folder = _as_mlx_lm_reads_it(checkpoints["release"][0], tmp_path / "hf")
    got = DecoderOnlyLLM.from_pretrained(folder, backend="mlx", dtype="float32").forward_verify("m", TOKENS)
    assert scaled_error(got, mlx_lm_logits(folder, TOKENS)) <= 1e-4


@needs_mlx
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_mlx_lm_conversions_load(checkpoints, bits, tmp_path):
    """mlx-lm stacks the experts under ``mlp.switch_mlp`` and leaves the router (a plain parameter of its MoEGate)
    and the correction bias in float: its conversions, float or packed, run on every backend as mlx-lm runs them."""
    from mlx_lm.convert import convert
    from safetensors import safe_open

    source = _as_mlx_lm_reads_it(checkpoints["release"][0], tmp_path / "hf")
    converted = tmp_path / "mlx"
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    with safe_open(str(converted / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.switch_mlp.gate_proj.weight" in names
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"} <= names
    assert "model.layers.1.mlp.gate.scales" not in names
    want = mlx_lm_logits(converted, TOKENS)
    for backend in BACKENDS:
        got = DecoderOnlyLLM.from_pretrained(converted, backend=backend, dtype="float32").forward_verify("m", TOKENS)
        assert scaled_error(got, want) <= 1e-4, backend


@needs_mlx
def test_ferrum_quantize_writes_what_mlx_lm_writes(checkpoints, tmp_path):
    """``ferrum quantize`` leaves the router and its correction bias in float where mlx-lm's conversion does, bit for
    bit from a float32 source, and mlx-lm runs the result."""
    from mlx_lm.convert import convert
    from safetensors.numpy import load_file

    from ferrum.quant.convert import quantize_checkpoint

    source = _as_mlx_lm_reads_it(checkpoints["release"][0], tmp_path / "hf")
    ours = quantize_checkpoint(source, tmp_path / "ferrum", bits=4, group_size=32)
    convert(str(source), str(tmp_path / "mlx"), quantize=True, q_bits=4, q_group_size=32)
    got, expected = load_file(str(ours / "model.safetensors")), load_file(str(tmp_path / "mlx" / "model.safetensors"))
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    want = mlx_lm_logits(ours, TOKENS)
    got = DecoderOnlyLLM.from_pretrained(ours, backend="cpu", dtype="float32").forward_verify("m", TOKENS)
    assert scaled_error(got, want) <= 1e-4
