"""MiniMax-M2 (``minimax_m2``): Llama's blocks with q and k normed over their whole projections (OLMo 2's), rope on
the first rotary_dim dims of each head, and experts on every layer (``block_sparse_moe``, Mixtral's w1/w3/w2) chosen
by sigmoid scores plus the sparse MLP's own ``e_score_correction_bias``, their weights renormalized; against
transformers' MiniMaxM2ForCausalLM on every runnable backend, and mlx-lm's MiniMax and its conversions."""

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
    assert_names_the_tensors_transformers_saves, assert_random_checkpoint_is_what_transformers_reads, mlx_lm_logits,
    reference_logits, runnable_backends, saved_references, scaled_error, without_correction_biases, write_tokenizer,
)

BACKENDS = runnable_backends()
BFLOAT16 = [b for b in BACKENDS if "bfloat16" in load_backend(b).info.dtypes]
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
#: The keys of MiniMax's own code that MiniMax-M2's config.json carries, valued as transformers runs them.
RELEASE_KEYS = dict(scoring_func="sigmoid", use_routing_bias=True, shared_intermediate_size=0, use_qk_norm=True,
                    qk_norm_type="per_layer")


def minimax_config(**extra) -> transformers.MiniMaxM2Config:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=24, num_local_experts=8, num_experts_per_tok=3, rotary_dim=12,
                    rope_theta=10000.0, max_position_embeddings=256, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2)
    return transformers.MiniMaxM2Config(**{**settings, **extra})


#: Rope on half of each head (rotary_dim, as the release writes it); and rope on a third through
#: partial_rotary_factor, tied embeddings, top-2.
VARIANTS = {"release": RELEASE_KEYS, "factor": dict(rotary_dim=None, partial_rotary_factor=1 / 3, num_experts_per_tok=2,
                                                    tie_word_embeddings=True)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, minimax_config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, built_once):
    return built_once(build_checkpoints, tmp_path_factory)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch, moe = model.config.arch, model.config.arch.moe
    assert [spec.mlp for spec in arch.layers] == ["moe", "moe"] and arch.qk_norm == "projection"
    assert arch.layers[0].rope.rotary_dim == (12 if variant == "release" else 8)
    assert (moe.routing, moe.n_group, moe.normalize, moe.routed_scale, moe.router_float32, moe.shared_expert_size) == (
        "sigmoid_grouped", 1, True, 1.0, False, None)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_checks_the_correction_bias(checkpoints):
    """Zeroing the correction biases moves transformers' logits: they matter in the comparison above."""
    folder, hf = checkpoints["release"]
    unbiased = without_correction_biases(folder)
    assert scaled_error(reference_logits(unbiased, TOKENS), reference_logits(hf, TOKENS)) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_generates_greedily_as_transformers(checkpoints, backend):
    """Through the engine: batched with another request, the second copy of the prompt from the prefix cache."""
    folder, hf = checkpoints["release"]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("backend", BFLOAT16)
def test_correction_biases_stay_float32_in_bfloat16(checkpoints, backend):
    """The correction bias (stored float32 in MiniMax-M2's release, kept so by mlx-lm) stays float32; the router runs
    in the compute dtype, as transformers' MiniMaxM2TopKRouter runs it."""
    folder, hf = checkpoints["release"]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="bfloat16")
    mlp, ops = model.layers[1].mlp, model.ops
    bias = hf.model.layers[1].mlp.e_score_correction_bias.numpy()
    assert not np.array_equal(bias, bias.astype("bfloat16").astype(np.float32))  # bfloat16 would round it
    np.testing.assert_array_equal(ops.to_numpy(mlp.routing.bias), bias)
    assert mlp.router_dtype is None


def test_ferrum_names_the_tensors_transformers_saves(checkpoints):
    """Including ``block_sparse_moe.e_score_correction_bias``, beside the router rather than in it."""
    for variant in VARIANTS:
        assert_names_the_tensors_transformers_saves(checkpoints[variant][0])


def test_random_checkpoints_are_what_transformers_reads(tmp_path):
    """ferrum.random_checkpoint (benchmarks, the conformance kit) writes the tensors transformers expects."""
    raw = {**minimax_config().to_dict(), "architectures": ["MiniMaxM2ForCausalLM"]}
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / "minimax", raw, TOKENS)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**minimax_config().to_dict(), **RELEASE_KEYS, **changes}


def test_config_is_read_as_transformers_reads_it():
    """num_experts is num_local_experts' alias (it wins where both are given); the rotary dims come from
    partial_rotary_factor, in the rope settings or beside them, else from rotary_dim; the defaults are
    MiniMaxM2Config's."""
    raw = _raw(num_experts=5, num_local_experts=7)
    assert ModelConfig.from_dict(raw).arch.moe.num_experts == transformers.MiniMaxM2Config(**raw).num_local_experts
    no_rope = {k: v for k, v in _raw().items() if k not in ("rope_parameters", "rotary_dim")}
    for extra, dims in [({}, 24), ({"rotary_dim": 8}, 8), ({"partial_rotary_factor": 0.5}, 12),
                        ({"rope_parameters": {"rope_type": "default", "rope_theta": 100.0,
                                              "partial_rotary_factor": 0.25}}, 6)]:
        raw = {**no_rope, **extra}
        want = transformers.MiniMaxM2Config(**raw)
        rope = ModelConfig.from_dict(raw).arch.layers[0].rope
        assert rope.rotary_dim == int(24 * want.rope_parameters.get("partial_rotary_factor", 1.0)) == dims
        assert rope.theta == want.rope_parameters["rope_theta"]
    defaults = {k: v for k, v in _raw().items() if k not in (
        "num_local_experts", "num_experts_per_tok", "head_dim", "rope_parameters", "rotary_dim")}
    defaults["hidden_size"] = 64 * 12  # heads of the default head_dim, 128
    config = ModelConfig.from_dict(defaults)
    assert (config.arch.moe.num_experts, config.arch.moe.top_k, config.head_dim) == (256, 8, 128)
    assert (config.arch.layers[0].rope.theta, config.arch.layers[0].rope.rotary_dim) == (5_000_000.0, 128)


@pytest.mark.parametrize("changes, error, words", [
    ({"rotary_dim": 8}, ConfigError, "'rotary_dim' is 8, but partial_rotary_factor gives 12 rotary dims of 24"),
    ({"num_experts_per_tok": 9}, ConfigError, "'num_experts_per_tok' (9) exceeds the 8 experts"),
    ({"scoring_func": "softmax"}, UnsupportedFeatureError, "routes by sigmoid scores"),
    ({"use_routing_bias": False}, UnsupportedFeatureError, "always adds e_score_correction_bias"),
    ({"shared_intermediate_size": 64}, UnsupportedFeatureError, "has no shared expert"),
    ({"use_qk_norm": False}, UnsupportedFeatureError, "transformers norms q and k whatever it says"),
    ({"qk_norm_type": "per_head"}, UnsupportedFeatureError, "over their whole projections"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


# ------------------------------------------------------------------ mlx-lm

needs_mlx = pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")


def _as_mlx_lm_reads_it(folder, destination):
    """The release checkpoint with the transformers-4 rope keys mlx-lm reads, and a tokenizer for its conversion."""
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (destination / "config.json").write_text(json.dumps(config))
    write_tokenizer(destination)
    return destination


@needs_mlx
def test_mlx_backend_matches_mlx_lm(checkpoints, tmp_path):
    folder = _as_mlx_lm_reads_it(checkpoints["release"][0], tmp_path / "hf")
    got = DecoderOnlyLLM.from_pretrained(folder, backend="mlx", dtype="float32").forward_verify("m", TOKENS)
    assert scaled_error(got, mlx_lm_logits(folder, TOKENS)) <= 1e-4


@needs_mlx
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_mlx_lm_conversions_load(checkpoints, bits, tmp_path):
    """mlx-lm stacks the experts under ``block_sparse_moe.switch_mlp``, keeps the correction bias in float32 and
    packs the router at 8 bits: its conversions, float or packed, run on every backend as mlx-lm runs them."""
    from mlx_lm.convert import convert
    from safetensors import safe_open

    source = _as_mlx_lm_reads_it(checkpoints["release"][0], tmp_path / "hf")
    converted = tmp_path / "mlx"
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    with safe_open(str(converted / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "model.layers.1.block_sparse_moe.switch_mlp.gate_proj.weight" in names
    assert "model.layers.1.block_sparse_moe.e_score_correction_bias" in names
    want = mlx_lm_logits(converted, TOKENS)
    for backend in BACKENDS:
        got = DecoderOnlyLLM.from_pretrained(converted, backend=backend, dtype="float32").forward_verify("m", TOKENS)
        assert scaled_error(got, want) <= 1e-4, backend


@needs_mlx
def test_ferrum_quantize_writes_what_mlx_lm_writes(checkpoints, tmp_path):
    """``ferrum quantize`` packs the router at 8 bits and keeps the correction bias where mlx-lm's conversion does,
    bit for bit from a float32 source, and mlx-lm runs the result."""
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
