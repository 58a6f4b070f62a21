"""Qwen3-Next (``qwen3_next``: Gated DeltaNet projections grouped per key head, Qwen2-MoE's experts with a
sigmoid-gated shared expert, dense mlp_only_layers) and Qwen3.5-MoE (``qwen3_5_moe_text``: every layer sparse, top-k
weights always renormalized) against transformers, and mlx-lm's conversions (float and packed) against mlx-lm, on
every runnable backend."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers

from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, assert_random_checkpoint_is_what_transformers_reads, built_checkpoints,
    mlx_lm_logits, reference_logits, runnable_backends, scaled_error,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8,
              linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4,
              num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40,
              max_position_embeddings=256, full_attention_interval=2)
MODELS = {
    "qwen3_next": lambda: transformers.Qwen3NextConfig(**COMMON, norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_5_moe_text": lambda: transformers.Qwen3_5MoeTextConfig(**COMMON),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, MODELS, VOCAB)


def test_reads_sparse_layers_and_the_grouped_projections(checkpoints):
    nxt = DecoderOnlyLLM.from_pretrained(checkpoints["qwen3_next"][0], backend="cpu").config.arch
    assert [s.mlp for s in nxt.layers] == ["moe", "dense", "moe"] and nxt.gated_delta.grouped
    assert nxt.moe.shared_expert_size == 40 and not nxt.moe.normalize
    moe = DecoderOnlyLLM.from_pretrained(checkpoints["qwen3_5_moe_text"][0], backend="cpu").config.arch
    assert [s.mlp for s in moe.layers] == ["moe"] * 3 and not moe.gated_delta.grouped and moe.moe.normalize


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", MODELS)
def test_logits_and_decode_steps_match_transformers(checkpoints, family, backend):
    folder, hf = checkpoints[family]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32")
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("bits", [None, 8])
def test_mlx_lm_conversions_load(checkpoints, bits, tmp_path):
    """mlx-lm stacks the experts in switch_mlp, stores the convolution [C, K, 1] and the zero-centred norms shifted
    by one, and packs every projection but the convolution where quantized: its conversions run as mlx-lm runs
    them."""
    from mlx_lm.convert import convert
    from safetensors.numpy import load_file

    folder, hf = checkpoints["qwen3_next"]
    source, converted = tmp_path / "hf", tmp_path / "mlx"
    shutil.copytree(folder, source)
    config = json.loads((source / "config.json").read_text())
    rope = config["rope_parameters"]  # mlx-lm reads transformers 4's keys
    config.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
                  full_attention_interval=2)
    (source / "config.json").write_text(json.dumps(config))
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    stored = load_file(converted / "model.safetensors")
    assert "model.layers.0.mlp.switch_mlp.gate_proj.weight" in stored
    assert ("model.layers.0.linear_attn.in_proj_qkvz.scales" in stored) == (bits is not None)
    want = mlx_lm_logits(converted, TOKENS)
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    for backend in BACKENDS:
        got = DecoderOnlyLLM.from_pretrained(converted, backend=backend, dtype="float32").forward_verify("m", TOKENS)
        assert scaled_error(got, want) <= 1e-4, backend


def _fused_experts(folder, destination, num_experts: int):
    """``folder``'s checkpoint with each sparse layer's experts stored as transformers 5 holds them (and Qwen3.5-MoE's
    release stores them): ``experts.gate_up_proj [E, 2 * inter, hidden]``, gate rows first, and ``experts.down_proj
    [E, hidden, inter]``."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, destination)
    stored = load_file(destination / "model.safetensors")
    fused = {name: array for name, array in stored.items() if ".experts." not in name}
    for stem in sorted({name.split(".experts.")[0] for name in stored if ".experts." in name}):
        def stack(proj: str) -> np.ndarray:
            return np.stack([stored[f"{stem}.experts.{e}.{proj}.weight"] for e in range(num_experts)])

        fused[f"{stem}.experts.gate_up_proj"] = np.concatenate([stack("gate_proj"), stack("up_proj")], axis=1)
        fused[f"{stem}.experts.down_proj"] = stack("down_proj")
    save_file(fused, str(destination / "model.safetensors"), metadata={"format": "pt"})


def test_fused_expert_stacks_load_as_transformers_reads_them(checkpoints, tmp_path):
    """Qwen3.5-MoE's release stores each layer's experts fused, outputs first, as transformers 5 holds them (mlx-lm's
    sanitize splits them so): Ferrum asked for the per-expert tensors transformers' save_pretrained writes."""
    folder, _ = checkpoints["qwen3_5_moe_text"]
    _fused_experts(folder, tmp_path / "fused", COMMON["num_experts"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused").float().eval()
    want = reference_logits(hf, TOKENS)
    for backend in BACKENDS:
        model = DecoderOnlyLLM.from_pretrained(tmp_path / "fused", backend=backend, dtype="float32")
        assert model.config.arch.moe.layout == "fused_outputs_first"
        assert scaled_error(model.forward_verify("f", TOKENS), want) <= 1e-4, backend


@pytest.mark.parametrize("family", [*MODELS, "qwen3_5_text"])
def test_random_checkpoints_are_what_transformers_reads(family, tmp_path):
    """ferrum.random_checkpoint (benchmarks, the JAX plugin's tests) writes the hybrid families' tensors as stored."""
    raw = {**MODELS.get(family, MODELS["qwen3_5_moe_text"])().to_dict(), "full_attention_interval": 2}
    if family == "qwen3_5_text":
        raw = {k: v for k, v in raw.items() if "expert" not in k and k != "moe_intermediate_size"}
        raw.update(model_type=family, architectures=["Qwen3_5ForCausalLM"])
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / family, raw, TOKENS)
