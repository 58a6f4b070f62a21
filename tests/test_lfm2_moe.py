"""LFM2-MoE (``lfm2_moe``, LFM2-8B-A1B): LFM2's short-convolution and attention layers over sigmoid-routed experts
chosen with a per-expert bias, against transformers (and mlx-lm's conversions against mlx-lm) on every runnable
backend.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, build_transformers_model, mlx_lm_logits, reference_logits, runnable_backends,
    scaled_error, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def moe_config(**extra) -> transformers.Lfm2MoeConfig:
    """Eight experts of 24, three a token, scaled by 1.5; the first layer dense (96 wide), convolutions first and
    last."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    num_experts=8, num_experts_per_tok=3, num_dense_layers=1, routed_scaling_factor=1.5,
                    layer_types=["conv", "full_attention", "conv", "conv"])
    return transformers.Lfm2MoeConfig(**{**settings, **extra})


def _build(folder, **extra):
    """A random checkpoint whose expert biases (buffers, which random init leaves at zero) are random too."""
    hf = build_transformers_model(folder, moe_config(**extra))
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            if layer.feed_forward.use_expert_bias:
                layer.feed_forward.expert_bias.normal_(0, 0.5)
    hf.save_pretrained(folder)
    write_tokenizer(folder, VOCAB)
    return folder, hf


def build_checkpoints(tmp_path_factory) -> dict:
    return {"biased": _build(tmp_path_factory.mktemp("lfm2_moe")),
            "unbiased": _build(tmp_path_factory.mktemp("lfm2_moe_unbiased"), use_expert_bias=False)}


def load(folder, backend="cpu") -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32")


def test_reads_dense_and_sparse_layers_and_the_routing(checkpoints):
    model = load(checkpoints["biased"][0])
    arch = model.config.arch
    assert [(spec.mixer, spec.mlp) for spec in arch.layers] == [
        ("short_conv", "dense"), ("attention", "moe"), ("short_conv", "moe"), ("short_conv", "moe")]
    assert model.config.intermediate_size == 96 and arch.moe.expert_size == 24 and arch.moe.routed_scale == 1.5
    assert (arch.moe.routing, arch.moe.correction_bias) == ("sigmoid_grouped", "expert_bias")
    assert load(checkpoints["unbiased"][0]).config.arch.moe.routing == "sigmoid_top_k"


@pytest.mark.parametrize("variant", ["biased", "unbiased"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(load(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_the_expert_bias_changes_the_choice(checkpoints, tmp_path):
    """The check above fails where the bias is not added to choose: transformers' logits without it are others."""
    folder, hf = checkpoints["biased"]
    got = load(folder).forward_verify("b", TOKENS)
    unbiased = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        for layer in unbiased.model.layers[1:]:
            layer.feed_forward.expert_bias.zero_()
    assert scaled_error(got, reference_logits(unbiased, TOKENS)) > 1e-2


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(checkpoints, tmp_path, bits):
    """mlx-lm renames the dense MLP's w1 / w3 / w2 to gate / up / down, stacks the experts in switch_mlp, stores the
    taps [C, K, 1] and, quantized, packs the router in 8 bits and the rest in 4: its conversions run on every
    backend as mlx-lm runs them."""
    from mlx_lm.convert import convert
    from safetensors.numpy import load_file

    folder, hf = checkpoints["biased"]
    source, converted = tmp_path / "hf", tmp_path / "mlx"
    shutil.copytree(folder, source)
    config = json.loads((source / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (source / "config.json").write_text(json.dumps(config))
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    stored = load_file(converted / "model.safetensors")
    assert "model.layers.0.feed_forward.gate_proj.weight" in stored
    assert "model.layers.1.feed_forward.switch_mlp.up_proj.weight" in stored
    assert ("model.layers.1.feed_forward.gate.scales" in stored) == (bits is not None)
    want = mlx_lm_logits(converted, TOKENS)
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    for backend in BACKENDS:
        assert scaled_error(load(converted, backend).forward_verify("m", TOKENS), want) <= 1e-4, backend

