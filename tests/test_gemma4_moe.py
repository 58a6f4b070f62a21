"""Gemma 4 26B-A4B's MoE block (transformers' ``gemma4_text`` with enable_moe_block): on every layer the dense GeGLU
MLP and the sparse MLP side by side, each between its own norms, summed. The router reads the layer's stream itself,
RMS-normed times its ``scale`` and hidden_size ** -0.5; softmax top-k renormalized, times each chosen expert's
``per_expert_scale`` (the grouped rule "softmax_expert_scaled"); GeGLU experts stored fused outputs first. Against
transformers' own model on every runnable backend, and mlx-lm's conversions (float and 4-bit) against mlx-lm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import ferrum
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_names_the_tensors_transformers_saves, assert_random_checkpoint_is_what_transformers_reads, mlx_lm_logits,
    randomized_reference, reference_logits, runnable_backends, saved_references, scaled_error, with_layer_scalars,
    write_tokenizer,
)

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=16)]
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]


def moe_config(**extra) -> transformers.Gemma4TextConfig:
    """Three layers, 8 experts of 24 (2 a token) beside dense MLPs of 80; full layers with wider heads (padded) and
    one key/value head that is their values too, as the release's."""
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                    attention_k_eq_v=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0, sliding_window=6,
                    final_logit_softcapping=30.0, layer_types=LAYER_TYPES, max_position_embeddings=256,
                    enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24)
    config = transformers.Gemma4TextConfig(**{**settings, **extra})
    config._attn_implementation = "eager"
    return config


def randomized(config) -> transformers.Gemma4ForCausalLM:
    """:func:`randomized_reference`, each layer's layer_scalar (a buffer) set apart, and the router's scales drawn
    around 1 (positive, as trained ones are), so that each visibly matters."""
    model = with_layer_scalars(randomized_reference(config), 0.2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.router.scale.uniform_(0.5, 2.0)
            layer.router.per_expert_scale.uniform_(0.25, 2.0)
    return model


#: The release's layout (padded sliding heads, k_eq_v full layers); every head one size (nothing padded; packed
#: conversions of the release's layout: test_gemma4_packed.py).
VARIANTS = {"release": {}, "one_size": dict(global_head_dim=16, num_global_key_value_heads=2)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_references(tmp_path_factory, VARIANTS, moe_config, randomized)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert [spec.mlp for spec in model.config.arch.layers] == ["dense+moe"] * 3
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_is_sensitive_to_each_part(checkpoints):
    """Each part of the block moves transformers' logits here, so the parity above checks it: the router's input
    scale, the per-expert scales, and each of the four branch norms."""
    folder, hf = checkpoints["release"]
    want = reference_logits(hf, TOKENS)
    for part in ("router.scale", "router.per_expert_scale", "pre_feedforward_layernorm.weight",
                 "post_feedforward_layernorm_1.weight", "pre_feedforward_layernorm_2.weight",
                 "post_feedforward_layernorm_2.weight"):
        changed = transformers.Gemma4ForCausalLM.from_pretrained(folder).float().eval()
        changed.config._attn_implementation = "eager"
        with torch.no_grad():
            for layer in changed.model.layers:
                layer.get_parameter(part).fill_(1.0)
        assert scaled_error(reference_logits(changed, TOKENS), want) > 1e-3, part


@pytest.mark.parametrize("backend", BACKENDS)
def test_generates_greedily_as_transformers(checkpoints, backend):
    """Through the engine: batched with a shorter prompt, and again from the prefix cache."""
    folder, hf = checkpoints["release"]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS[:10])


def test_batched_equals_alone(checkpoints):
    """Requests batched through the engine (their tokens routed together) get the tokens each gets alone."""
    folder, _ = checkpoints["release"]
    llm = ferrum.load(folder, backend="cpu", dtype="float32")
    prompts = [TOKENS, TOKENS[3:9], TOKENS[::-1][:11]]
    together = [out.token_ids for out in llm.run(prompts, max_tokens=8, temperature=0.0, ignore_eos=True)]
    alone = [llm.run([p], max_tokens=8, temperature=0.0, ignore_eos=True)[0].token_ids for p in prompts]
    assert together == alone


def test_names_the_tensors_transformers_saves(checkpoints):
    from safetensors import safe_open

    folder, _ = checkpoints["release"]
    assert_names_the_tensors_transformers_saves(folder)
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.layers.0.experts.gate_up_proj").get_shape() == [8, 48, 64]  # outputs first


@pytest.mark.parametrize("key,value,words", [
    ("num_experts", None, "'num_experts' must be set with enable_moe_block"),
    ("top_k_experts", 9, "'top_k_experts' (9) exceeds the 8 experts"),
    ("moe_intermediate_size", 0, "'moe_intermediate_size'"),
])
def test_bad_moe_keys_are_refused_by_name(key, value, words):
    raw = {**moe_config().to_dict(), "model_type": "gemma4_text", key: value}
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_dict(raw)


# ------------------------------------------------------------------ mlx-lm's conversions


@pytest.fixture(scope="module")
def mlx_lm_conversions(tmp_path_factory):
    """mlx-lm's float and 4-bit conversions (group size 32; its router at 8 bits, group size 64, as mlx-lm's
    quant_predicate keeps it) of a Gemma 4 MoE whose every head is one size (nothing padded) and whose experts'
    widths are multiples of the group size: (folder, transformers model, {bits: folder})."""
    convert = pytest.importorskip("mlx_lm.convert")
    source = tmp_path_factory.mktemp("mlx_source")
    model = randomized(moe_config(global_head_dim=16, num_global_key_value_heads=2, moe_intermediate_size=32,
                                  intermediate_size=96))
    model.save_pretrained(source)
    write_tokenizer(source, 120)
    # as releases write it: mlx-lm reads global_head_dim, not the per_layer_config transformers 5.24 saves
    raw = json.loads((source / "config.json").read_text())
    raw.pop("per_layer_config")
    (source / "config.json").write_text(json.dumps({**raw, "global_head_dim": 16, "num_global_key_value_heads": 2}))
    converted = {}
    for bits in (None, 4):
        converted[bits] = tmp_path_factory.mktemp(f"mlx_{bits}") / "out"
        convert.convert(str(source), str(converted[bits]), quantize=bits is not None, q_bits=bits or 4,
                        q_group_size=32, dtype="float32")
    return source, model, converted


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(mlx_lm_conversions, backend, bits):
    """mlx-lm's conversions (experts split into ``experts.switch_glu`` stacks; packed with the router at 8 bits):
    mlx-lm's own logits, and, float, the original checkpoint's."""
    from safetensors import safe_open

    _, hf, converted = mlx_lm_conversions
    folder = converted[bits]
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "model.layers.0.experts.switch_glu.gate_proj.weight" in names
    assert ("model.layers.0.experts.switch_glu.gate_proj.scales" in names) == (bits is not None)
    if bits is not None:
        router = json.loads((folder / "config.json").read_text())["quantization"]["model.layers.0.router.proj"]
        assert (router["bits"], router["group_size"]) == (8, 64)
    want = mlx_lm_logits(folder, TOKENS)
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert_forward_and_decode_match(model, TOKENS, want)
    assert (scaled_error(want, reference_logits(hf, TOKENS)) < 1e-4) == (bits is None)  # 4 bits move the logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_ferrum_quantize_runs_as_mlx_lm_runs_its_output(mlx_lm_conversions, backend, tmp_path):
    """`ferrum quantize` of the transformers checkpoint packs the experts and, at 8 bits as mlx-lm does, the router:
    mlx-lm's logits on the folder are Ferrum's."""
    from ferrum.quant.convert import quantize_checkpoint

    out = quantize_checkpoint(mlx_lm_conversions[0], tmp_path / "q", bits=4, group_size=32)
    router = json.loads((out / "config.json").read_text())["quantization"]["model.layers.0.router.proj"]
    assert (router["bits"], router["group_size"]) == (8, 64)
    got = DecoderOnlyLLM.from_pretrained(out, backend=backend, dtype="float32").forward_verify("x", TOKENS)
    assert scaled_error(got, mlx_lm_logits(out, TOKENS)) < 1e-5


def test_random_checkpoint_is_what_transformers_reads(tmp_path):
    """ferrum.random_checkpoint (benchmarks, the conformance kit) writes a release-style config's tensors (the experts
    fused outputs first, the router's scales) as transformers reads them."""
    raw = {k: v for k, v in moe_config().to_dict().items() if k != "per_layer_config"}
    raw.update(architectures=["Gemma4ForCausalLM"], global_head_dim=32, num_global_key_value_heads=1)
    assert_random_checkpoint_is_what_transformers_reads(tmp_path, raw, TOKENS)
