"""Nemotron 3 Nano (``nemotron_h`` with MoE blocks, 'E'): ungated squared-ReLU experts routed in groups by sigmoid
scores a correction bias chooses between, scaled, beside an ungated shared expert; against transformers (and
mlx-lm's conversions against mlx-lm) on every runnable backend, with the backends that declare API 1.18 running the
experts themselves."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from ferrum.backends import load_backend
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from ferrum.moe.activation import SquaredReLU
from support import (
    assert_every_backend_runs_it_as_mlx_lm, mlx_lm_converted,
    assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_names_the_tensors_transformers_saves, assert_random_checkpoint_is_what_transformers_reads,
    assert_router_computes_in_float32, mlx_lm_logits, reference_logits, runnable_backends, saved_references,
    scaled_error, without_correction_biases, write_tokenizer,
)

BACKENDS = runnable_backends()
BFLOAT16 = [b for b in BACKENDS if "bfloat16" in load_backend(b).info.dtypes]
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              head_dim=24, mamba_num_heads=8, mamba_head_dim=12, n_groups=2, ssm_state_size=16, conv_kernel=4,
              max_position_embeddings=256, tie_word_embeddings=False, n_routed_experts=8, moe_intermediate_size=20,
              moe_shared_expert_intermediate_size=28)
#: Nemotron 3 Nano's kinds of block, MoE blocks after Mamba-2 and attention ones, and one MLP block.
BLOCKS = ["linear_attention", "moe", "full_attention", "moe", "linear_attention", "mlp", "moe"]
VARIANTS = {
    # the release's routing: two of four groups kept... here one of two, three experts, renormalized and scaled
    "grouped": dict(num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    # one group, unnormalized weights, biased shared experts and MLPs (mlp_bias); experts of mlx-lm's group size, so
    # that its 4-bit conversion packs both stacks
    "biased": dict(num_experts_per_tok=2, norm_topk_prob=False, mlp_bias=True, moe_intermediate_size=64),
}


def nemotron3_config(**extra) -> transformers.NemotronHConfig:
    config = transformers.NemotronHConfig(**{**COMMON, "layers_block_type": BLOCKS, **extra})
    config._attn_implementation = "eager"
    return config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (folder, transformers model): random weights, correction biases that change the choice."""
    out = saved_references(tmp_path_factory, VARIANTS, nemotron3_config)
    for folder, _ in out.values():
        write_tokenizer(folder, VOCAB)  # mlx-lm's conversion copies it
    return out


def load(folder, backend="cpu", **kwargs) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", **kwargs)


def test_reads_the_moe_blocks_and_the_tensors_transformers_saves(checkpoints):
    """The 'E' blocks are MoE blocks of one norm and the sparse MLP as the block's mixer; experts are saved one
    up_proj / down_proj each, without a gate; every saved tensor is one Ferrum reads."""
    folder, _ = checkpoints["grouped"]
    arch = load(folder).config.arch
    assert [s.mlp for s in arch.layers] == ["none", "moe", "none", "moe", "none", "plain", "moe"]
    moe = arch.moe
    assert (moe.module, moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size) == ("mixer", 8, 3, 20, 28)
    assert (moe.routing, moe.n_group, moe.topk_group, moe.routed_scale) == ("sigmoid_grouped", 2, 1, 2.5)
    assert moe.activation == SquaredReLU() and not moe.gated and moe.router_float32
    assert_names_the_tensors_transformers_saves(folder)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    folder, hf = checkpoints[variant]
    model = load(folder, backend)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))
    experts = model.layers[1].mlp.experts
    assert experts.gate is None  # no gate stack is placed
    # the backends declaring API 1.18 run the ungated experts themselves; the numpy backend, without moe_experts, the
    # core's on its ops
    assert (experts.apply is not model.ops.fallback["moe_experts"]) == (backend != "cpu")


def test_the_correction_biases_and_the_square_matter(checkpoints):
    """Controls for the match above: the routers' correction biases change which experts run, and experts taking
    relu(u) instead of its square miss it."""
    folder, hf = checkpoints["grouped"]
    model = load(folder)
    got = model.forward_verify("c", TOKENS)
    assert scaled_error(got, reference_logits(without_correction_biases(folder), TOKENS)) > 1e-3
    for layer in model.layers:
        if layer.mlp is not None and hasattr(layer.mlp, "experts"):
            layer.mlp.experts.activation = _Unsquared()
    assert scaled_error(model.forward_verify("u", TOKENS), reference_logits(hf, TOKENS)) > 1e-3


class _Unsquared(SquaredReLU):
    """relu(u) where the experts square it, run by the core's host path (no backend op)."""

    op = None

    def host(self, up: np.ndarray) -> np.ndarray:
        return np.maximum(np.asarray(up, dtype=np.float32), 0.0)


@pytest.mark.parametrize("backend", BFLOAT16)
def test_routers_and_biases_stay_float32_in_bfloat16(checkpoints, backend):
    """transformers keeps the router weight and correction bias in float32 (_keep_in_fp32_modules_strict) and casts
    the router's input up: so does Ferrum."""
    folder, hf = checkpoints["grouped"]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="bfloat16")
    mlp, ops, gate = model.layers[1].mlp, model.ops, hf.model.layers[1].mixer.gate
    bias = gate.e_score_correction_bias.numpy()
    assert not np.array_equal(bias, bias.astype("bfloat16").astype(np.float32))  # bfloat16 would round it
    np.testing.assert_array_equal(ops.to_numpy(mlp.routing.bias), bias)
    assert_router_computes_in_float32(mlp, ops, gate.weight.detach().numpy())


def test_the_releases_pattern_string_reads_alike(checkpoints, tmp_path):
    """NVIDIA's config.json gives ``hybrid_override_pattern`` (MoE blocks as 'E') and num_hidden_layers."""
    folder, hf = checkpoints["grouped"]
    shutil.copytree(folder, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["layers_block_type"]
    config.update(hybrid_override_pattern="ME*EM-E", num_hidden_layers=7)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert scaled_error(load(tmp_path / "m").forward_verify("a", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_gives_transformers_greedy_tokens(checkpoints, backend):
    """Batched with a shorter prompt, and again from the prefix cache (the Mamba-2 states kept at its boundaries)."""
    folder, hf = checkpoints["grouped"]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversion_loads(checkpoints, tmp_path, bits):
    """mlx-lm stacks the experts as its SwitchMLP's ``switch_mlp.fc1`` (up) and ``fc2`` (down); float, they run as
    transformers runs them, packed at 4 bits as mlx-lm runs them, on every backend. (One group: mlx-lm masks dropped
    groups with 0 where transformers masks with -inf, which differ once corrected scores go below 0.)"""
    folder, hf = checkpoints["biased"]
    stored, want = mlx_lm_converted(folder, tmp_path / "mlx", TOKENS, bits)
    assert stored["backbone.layers.1.mixer.switch_mlp.fc1.weight"].shape[0] == 8
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    else:
        assert {f"backbone.layers.1.mixer.switch_mlp.{p}.scales" for p in ("fc1", "fc2")} <= set(stored)
        assert scaled_error(want, reference_logits(hf, TOKENS)) > 1e-3  # the packing changes the numbers
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
def test_ferrum_quantize_writes_what_mlx_lm_runs(checkpoints, tmp_path):
    """Both stacks packed under mlx-lm's fc1 / fc2, the routers left in float (mlx-lm's MoEGate is no linear layer,
    its loader refuses one packed): mlx-lm loads the result, and every backend runs it as mlx-lm does."""
    from ferrum.quant.convert import quantize_checkpoint

    folder, _ = checkpoints["biased"]
    with pytest.warns(UserWarning, match="stay in float"):  # the Mamba-2 convolutions, 4 wide
        quantize_checkpoint(folder, tmp_path / "q4", bits=4, group_size=32)
    stored = load_file(tmp_path / "q4" / "model.safetensors")
    assert {f"backbone.layers.1.mixer.switch_mlp.{p}.scales" for p in ("fc1", "fc2")} <= set(stored)
    assert "backbone.layers.1.mixer.gate.scales" not in stored
    want = mlx_lm_logits(tmp_path / "q4", TOKENS)
    for backend in BACKENDS:
        model = DecoderOnlyLLM.from_pretrained(tmp_path / "q4", backend=backend, dtype="float32")
        assert scaled_error(model.forward_verify("q", TOKENS), want) <= 2e-3, backend


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    """ferrum.random_checkpoint (benchmarks, the JAX plugin's tests) writes the experts as transformers saves them."""
    raw = json.loads(nemotron3_config(**VARIANTS[variant]).to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"moe_latent_size": 32}, UnsupportedFeatureError, r"'moe_latent_size' is 32, .*Nemotron 3 Super"),
    ({"num_experts_per_tok": 9}, ConfigError, r"'num_experts_per_tok' \(9\) exceeds the 8 experts"),
    ({"n_group": 3}, ConfigError, r"'n_group' \(3\) must divide the 8 routed experts"),
    ({"n_group": 2, "topk_group": 1, "num_experts_per_tok": 5}, ConfigError, r"exceeds the 4 experts of the 1 group"),
])
def test_what_ferrum_does_not_run_is_refused_by_name(change, error, message):
    raw = {**json.loads(nemotron3_config().to_json_string()), **change}
    with pytest.raises(error, match=message):
        ModelConfig.from_dict(raw)
