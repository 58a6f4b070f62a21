"""rednote's dots.llm1 (``dots1``): Qwen 3's attention (per-head q/k norms before rope, its window rule without
use_sliding_window) over DeepSeek-V3's MoE (grouped sigmoid routing with correction biases, float32 routers, ungated
shared experts, dense first layers); against transformers' Dots1ForCausalLM on every runnable backend, and mlx-lm's
Dots1 and its conversions."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import transformers

from ferrum.backends import load_backend
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
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
WINDOW = 4  # shorter than TOKENS


def dots_config(**extra) -> transformers.Dots1Config:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=2,
                    first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True,
                    sliding_window=WINDOW, max_window_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    return transformers.Dots1Config(**{**settings, **extra})


#: Two groups (one kept), biased attention, the last layer sliding; and dots.llm1's own layout: one group,
#: unnormalized weights unscaled, every layer full (no window), heads of hidden / heads.
VARIANTS = {"grouped": {}, "release": dict(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                                           attention_bias=False, sliding_window=None, head_dim=16,
                                           num_experts_per_tok=3, n_shared_experts=1)}




def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, dots_config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, built_once):
    return built_once(build_checkpoints, tmp_path_factory)


# ------------------------------------------------------------------ whole models


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch = model.config.arch
    assert [spec.mlp for spec in arch.layers] == ["dense", "moe", "moe"]
    assert [spec.window for spec in arch.layers] == ([None, None, WINDOW] if variant == "grouped" else [None] * 3)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_checks_the_biases_and_the_window(checkpoints):
    """Zeroing the correction biases, or dropping the last layer's window, moves transformers' logits: both
    matter in the comparison above."""
    folder, hf = checkpoints["grouped"]
    want = reference_logits(hf, TOKENS)
    unbiased = without_correction_biases(folder)
    assert scaled_error(reference_logits(unbiased, TOKENS), want) > 1e-2
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(
        folder, layer_types=["full_attention"] * 3).float().eval()
    assert scaled_error(reference_logits(unwindowed, TOKENS), want) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_generates_greedily_as_transformers(checkpoints, backend):
    """Through the engine: batched with another request, the second copy of the prompt from the prefix cache."""
    folder, hf = checkpoints["grouped"]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("backend", BFLOAT16)
def test_routers_and_biases_stay_float32_in_bfloat16(checkpoints, backend):
    """transformers keeps Dots1's router weight and correction bias in float32 (_keep_in_fp32_modules_strict) and
    casts the router's input up: so does Ferrum."""
    folder, hf = checkpoints["grouped"]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="bfloat16")
    mlp, ops, gate = model.layers[1].mlp, model.ops, hf.model.layers[1].mlp.gate
    bias = gate.e_score_correction_bias.numpy()
    assert not np.array_equal(bias, bias.astype("bfloat16").astype(np.float32))  # bfloat16 would round it
    np.testing.assert_array_equal(ops.to_numpy(mlp.routing.bias), bias)
    weight = gate.weight.detach().numpy()
    assert_router_computes_in_float32(mlp, ops, weight)


def test_ferrum_names_the_tensors_transformers_saves(checkpoints):
    """weight_shapes lists every tensor transformers saves, with its shape, and no other (experts under the stacked
    names the loader assembles from transformers' per-expert ones)."""
    for variant in VARIANTS:
        assert_names_the_tensors_transformers_saves(checkpoints[variant][0])


def test_random_checkpoints_are_what_transformers_reads(tmp_path):
    """ferrum.random_checkpoint (benchmarks, the conformance kit) writes the tensors transformers expects."""
    raw = {**dots_config().to_dict(), "architectures": ["Dots1ForCausalLM"]}
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / "dots1", raw, TOKENS)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    raw = {**dots_config().to_dict(), **changes}
    return {k: v for k, v in raw.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize("changes, words", [
    ({"n_routed_experts": None}, "'n_routed_experts' must be set: transformers has no default expert count"),
    ({"num_experts_per_tok": _DROP}, "'num_experts_per_tok' must be a positive integer, got None"),
    ({"n_shared_experts": None}, "'n_shared_experts' must be a positive integer, got None"),
    ({"topk_group": 3}, "'topk_group' (3) exceeds the 2 expert groups"),
    ({"num_experts_per_tok": 5}, "'num_experts_per_tok' (5) exceeds the 4 experts of the 1 group"),
    ({"layer_types": None, "max_window_layers": None}, "'max_window_layers' is null, but a sliding_window needs"),
    ({"sliding_window": None}, "'sliding_window' must be set when layer_types lists sliding layers"),
    ({"layer_types": None, "use_sliding_window": False},
     "'use_sliding_window' is false, but transformers' dots1 ignores it and slides layers [2]"),
])
def test_bad_keys_are_refused_by_name(changes, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


def test_windows_follow_transformers_rule():
    """transformers' Dots1Config: layers from max_window_layers on slide wherever sliding_window is set (no
    use_sliding_window switch); layer_types overrides; a use_sliding_window that agrees is accepted."""
    def windows(**changes):
        return [layer.window for layer in ModelConfig.from_dict(_raw(**{"layer_types": None, **changes})).arch.layers]

    assert windows() == [None, None, WINDOW]
    assert windows(max_window_layers=0, use_sliding_window=True) == [WINDOW] * 3
    assert windows(sliding_window=None, use_sliding_window=False) == [None] * 3
    assert windows(layer_types=["sliding_attention", "full_attention", "full_attention"]) == [WINDOW, None, None]
    assert dots_config(layer_types=None).layer_types == ["full_attention"] * 2 + ["sliding_attention"]


def test_transformers_defaults_are_read():
    """Keys a config leaves out take Dots1Config's defaults: no groups, unnormalized weights, scale 1, every layer
    sparse, experts of 1408; the window rule's 62 full layers (for a 3-layer model, none slides)."""
    raw = {k: v for k, v in _raw().items() if k not in (
        "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace",
        "moe_intermediate_size", "max_window_layers", "layer_types", "rope_parameters")}
    arch = ModelConfig.from_dict(raw).arch
    moe = arch.moe
    assert (moe.n_group, moe.topk_group, moe.normalize, moe.routed_scale, moe.expert_size) == (1, 1, False, 1.0, 1408)
    assert moe.shared_expert_size == 2 * 1408 and moe.routing == "sigmoid_grouped" and moe.router_float32
    assert [layer.mlp for layer in arch.layers] == ["moe"] * 3 and [layer.window for layer in arch.layers] == [None] * 3
    assert arch.layers[0].rope.theta == 10000.0 and arch.qk_norm == "head" and not arch.qk_norm_after_rope


# ------------------------------------------------------------------ mlx-lm

needs_mlx = pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")


def _as_mlx_lm_reads_it(folder, destination):
    """The release checkpoint (mlx-lm's Dots1 has no window and no attention biases) with the transformers-4 rope
    keys mlx-lm reads, and a tokenizer for its conversion."""
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
    """mlx-lm stacks dots1's experts under ``mlp.experts.*`` (not ``switch_mlp``) and keeps the router in float:
    its conversions, float or packed, run on every backend as mlx-lm runs them."""
    from mlx_lm.convert import convert

    source = _as_mlx_lm_reads_it(checkpoints["release"][0], tmp_path / "hf")
    converted = tmp_path / "mlx"
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    from safetensors import safe_open

    with safe_open(str(converted / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.gate_proj.weight" in names and not any("switch_mlp" in n for n in names)
    want = mlx_lm_logits(converted, TOKENS)
    for backend in BACKENDS:
        got = DecoderOnlyLLM.from_pretrained(converted, backend=backend, dtype="float32").forward_verify("m", TOKENS)
        assert scaled_error(got, want) <= 1e-4, backend


@needs_mlx
def test_ferrum_quantize_writes_what_mlx_lm_writes(checkpoints, tmp_path):
    """``ferrum quantize`` stores the experts and the float router where mlx-lm's conversion does, bit for bit
    from a float32 source, and mlx-lm runs the result."""
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
