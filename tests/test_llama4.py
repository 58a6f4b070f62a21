"""Llama 4 (Scout, Maverick): transformers' ``llama4_text`` decoder and the text model of its ``llama4`` wrapper, on
every runnable backend. Rope as complex pairs of adjacent dims on the rope layers; NoPE layers (every fourth) whose
queries take the attention temperature; q and k L2-normed (no weight) on rope layers; chunked local attention on rope
layers (chunks of a few positions here, so prompts cross them); MoE layers every ``interleave_moe_layer_step``, top-1
sigmoid routing whose weight scales the expert's input, a shared expert, experts stored fused.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, mlx_lm_logits, reference_logits, runnable_backends, saved_references, scaled_error,
    write_tokenizer,
)

BACKENDS = runnable_backends()
#: Longer than several chunks of 8 and than floor_scale, so chunks and temperatures change inside the prompt.
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=30)]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def llama4_config(**extra) -> transformers.Llama4TextConfig:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=48, intermediate_size_mlp=80, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    attention_chunk_size=8, floor_scale=4, attn_scale=0.5, max_position_embeddings=256,
                    rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5)
    config = transformers.Llama4TextConfig(**{**settings, **extra})
    config._attn_implementation = "eager"
    return config


#: Scout's layout (every layer sparse, q/k norms, llama3 rope); Maverick's (dense and sparse layers alternating, no
#: q/k norm, plain rope), with biased attention; and chunks of 16, which the engine's blocks of 16 divide.
VARIANTS = {
    "scout": {},
    "maverick": dict(interleave_moe_layer_step=2, use_qk_norm=False, attention_bias=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "chunk16": dict(attention_chunk_size=16, floor_scale=8),
    # Scout's releases' llama3 rope: high_freq_factor equal to low_freq_factor, every frequency kept or divided
    "scout_step_rope": dict(rope_parameters={**LLAMA3_ROPE, "high_freq_factor": 1.0}),
    # what mlx-lm's Llama 4 runs: chunks and NoPE as the default layout has them, its q/k norms' eps of 1e-6
    "mlx_lm": dict(attention_chunk_size=16, floor_scale=8, rms_norm_eps=1e-6),
}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, llama4_config)


@pytest.mark.parametrize("variant", ["scout", "maverick", "scout_step_rope"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch = model.config.arch
    assert [spec.mlp for spec in arch.layers] == (["dense", "moe"] * 2 if variant == "maverick" else ["moe"] * 4)
    assert [spec.chunk for spec in arch.layers] == [8, 8, 8, None]
    assert [spec.query_scaling for spec in arch.layers] == [None, None, None, (0.5, 4, 1)]
    assert [spec.rope.kind for spec in arch.layers][3] == "default" and arch.layers[0].rope.interleaved
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_are_what_attention_sees(checkpoints, backend):
    """Attending the chunked layers over the whole context instead gives other logits from the first position past
    a chunk on: the test above checks chunks, not plain causal attention."""
    import ferrum.attention

    folder, hf = checkpoints["scout"]
    want = reference_logits(hf, TOKENS)
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    chunked = ferrum.attention.AttentionBatch.chunked
    try:
        ferrum.attention.AttentionBatch.chunked = lambda self, chunk: self
        got = model.forward_verify("whole", TOKENS)
    finally:
        ferrum.attention.AttentionBatch.chunked = chunked
    assert scaled_error(got[:8], want[:8]) <= 1e-4 and scaled_error(got[8:], want[8:]) > 1e-2


def test_chunks_a_block_size_does_not_divide_are_refused(checkpoints):
    folder, _ = checkpoints["scout"]
    with pytest.raises(UnsupportedFeatureError, match="chunks of 8 positions .* block_size 16 does not"):
        DecoderOnlyLLM.from_pretrained(folder, backend="cpu", block_size=16, dtype="float32")


def test_the_wrappers_text_model_runs(checkpoints, tmp_path):
    """A ``llama4`` (Llama4ForConditionalGeneration) checkpoint: its text_config, its decoder under
    ``language_model.model.`` and LM head under ``language_model.lm_head``, as the releases store them; the vision
    tower's tensors are not read."""
    folder, hf = checkpoints["scout"]
    wrapper = transformers.Llama4Config(text_config=llama4_config().to_dict(),
                                        vision_config={"num_hidden_layers": 1, "hidden_size": 32,
                                                       "intermediate_size": 32, "num_attention_heads": 2})
    raw = wrapper.to_dict()
    config = ModelConfig.from_dict(raw)
    assert config.model_type == "llama4_text" and config.arch.layers[0].chunk == 8
    copy = tmp_path / "wrapped"
    shutil.copytree(folder, copy)
    (copy / "config.json").write_text(json.dumps(raw))
    tensors = {f"language_model.{name}": array for name, array in load_file(copy / "model.safetensors").items()}
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    model = DecoderOnlyLLM.from_pretrained(copy, backend="cpu", block_size=4, dtype="float32")
    assert scaled_error(model.forward_verify("x", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_the_conformance_kits_oracle_matches_transformers(checkpoints, variant):
    """``ArchOracle`` (float64, from the tensors as stored: the fused experts inputs first) computes chunks, the NoPE
    layers' temperature, the weightless q/k norms, input-weighted routing and the shared expert itself."""
    from ferrum.testing.arch_oracle import ArchOracle

    folder, hf = checkpoints[variant]
    assert scaled_error(ArchOracle(folder).logits(TOKENS), reference_logits(hf, TOKENS)) <= 1e-5


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**llama4_config().to_dict(), **changes}


def test_transformers_defaults_are_read():
    """Left out: every fourth layer NoPE (and full), the others chunked by 8192 with q/k norms, every layer sparse
    with 16 experts, the temperature on NoPE layers."""
    raw = {k: v for k, v in _raw().items() if k not in (
        "no_rope_layers", "layer_types", "attention_chunk_size", "moe_layers", "num_local_experts", "floor_scale",
        "attn_scale")}
    arch = ModelConfig.from_dict(raw).arch
    assert [(s.chunk, s.qk_norm, s.mlp) for s in arch.layers] == [(8192, True, "moe")] * 3 + [(None, False, "moe")]
    assert arch.layers[3].query_scaling == (0.1, 8192, 1) and arch.moe.num_experts == 16
    assert (arch.moe.routing, arch.moe.weigh_input, arch.moe.shared_expert_size, arch.moe.top_k) == (
        "sigmoid_top_k", True, 48, 1)


def test_layer_lists_are_read():
    raw = {k: v for k, v in _raw().items() if k != "layer_types"}  # the one transformers derives
    arch = ModelConfig.from_dict({**raw, "no_rope_layers": [1, 0, 1, 1, 1], "moe_layers": [0, 3],
                                  "attention_chunk_size": None, "attn_temperature_tuning": False}).arch
    assert [s.rope.kind == "default" for s in arch.layers] == [False, True, False, False]
    assert [s.chunk for s in arch.layers] == [None] * 4 and arch.layers[1].query_scaling is None
    assert [s.mlp for s in arch.layers] == ["moe", "dense", "dense", "moe"]


@pytest.mark.parametrize("changes, error, words", [
    ({"num_experts_per_tok": 2}, UnsupportedFeatureError, "one expert a token"),
    ({"no_rope_layers": [1, 0]}, ConfigError, "'no_rope_layers' must list at least 4 entries"),
    ({"layer_types": ["sliding_attention"] * 4}, ConfigError, "'layer_types' must list 4 entries"),
    ({"attention_chunk_size": None, "layer_types": ["chunked_attention"] * 4}, ConfigError,
     "'attention_chunk_size' must be set"),
    ({"moe_layers": [7]}, ConfigError, "past the model's 4 layers"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_batches_attend_within_chunks(backend):
    """A mixed batch (a prompt across three chunks, a decode step past the first chunk, a chunk of five crossing a
    boundary) attended through ``AttentionBatch.chunked``: each query sees only the keys of its own chunk."""
    from ferrum.backends import load_backend
    from support import attention_batch

    ops = load_backend(backend).ops
    bs, chunk, heads, kv_heads, d = 4, 8, 4, 2, 16
    items = [([0, 1, 2, 3, 4], 19, 19), ([5, 6, 7], 11, 1), ([8, 9, 10, 11], 14, 5)]
    batch = attention_batch(items, bs)
    rng = np.random.default_rng(0)
    k_pool, v_pool = (rng.standard_normal((12 * bs, kv_heads, d)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((batch.num_tokens, heads, d)).astype(np.float32)
    pool = ops.kv_alloc(1, 12, bs, kv_heads, d, "float32")
    every = np.arange(12 * bs, dtype=np.int32)
    ops.kv_write(pool, 0, ops.from_numpy(k_pool, "float32"), ops.from_numpy(v_pool, "float32"),
                 ops.from_numpy(every, None))
    chunked = batch.chunked(chunk)
    chunked.prepared = ops.prepare_attention_batch(chunked)
    got = ops.to_numpy(ops.paged_attention(ops.from_numpy(q, "float32"), pool, 0, chunked, 0.25, None, None, None))
    want = []
    for item, (table, n, q_len) in enumerate(items):
        for t, p in enumerate(range(n - q_len, n)):
            keys = np.arange(chunk * (p // chunk), p + 1)
            slots = np.asarray(table)[keys // bs] * bs + keys % bs
            k, v = np.repeat(k_pool[slots], heads // kv_heads, 1), np.repeat(v_pool[slots], heads // kv_heads, 1)
            scores = np.einsum("hd,khd->hk", q[batch.cu_seqlens_q[item] + t].astype(np.float64), k) * 0.25
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            want.append(np.einsum("hk,khd->hd", weights / weights.sum(-1, keepdims=True), v))
    assert np.abs(np.asarray(got, np.float64) - np.stack(want)).max() < 1e-5
    assert batch.chunked(32) is batch  # no item past its first chunk


# ------------------------------------------------------------------ mlx-lm

needs_mlx = pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")


def as_mlx_lm_reads_it(folder, destination):
    """The checkpoint as a ``llama4`` wrapper (mlx-lm's Llama 4 reads no other), its decoder under
    ``language_model.``, with the transformers-4 rope keys mlx-lm reads and a tokenizer for its conversion."""
    destination.mkdir()
    text = json.loads((folder / "config.json").read_text())
    rope = dict(text.pop("rope_parameters"))
    text.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    raw = transformers.Llama4Config(vision_config={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 32,
                                                   "num_attention_heads": 2}).to_dict()
    (destination / "config.json").write_text(json.dumps({**raw, "text_config": text}))
    tensors = {f"language_model.{name}": array for name, array in load_file(folder / "model.safetensors").items()}
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(destination)
    return destination


@needs_mlx
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_mlx_lm_conversions_load(checkpoints, bits, tmp_path):
    """mlx-lm stacks Llama 4's experts under ``feed_forward.experts.{gate,up,down}_proj`` (its sanitize splits and
    transposes the fused stacks), packs them and the router where quantized: its conversions, float or packed, run on
    every backend as mlx-lm runs them, and as transformers runs the float one."""
    from mlx_lm.convert import convert
    from safetensors import safe_open

    folder, hf = checkpoints["mlx_lm"]
    source = as_mlx_lm_reads_it(folder, tmp_path / "hf")
    converted = tmp_path / "mlx"
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    with safe_open(str(converted / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    stack = "language_model.model.layers.1.feed_forward.experts.gate_proj"
    assert f"{stack}.weight" in names and (f"{stack}.scales" in names) == (bits is not None)
    assert not any("switch_mlp" in n or "gate_up_proj" in n for n in names)
    want = mlx_lm_logits(converted, TOKENS)
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    from ferrum.testing.arch_oracle import ArchOracle  # the kit's oracle reads mlx-lm's stacks (dequantized) too

    assert scaled_error(ArchOracle(converted).logits(TOKENS), want) <= 1e-4
    for backend in BACKENDS:
        got = DecoderOnlyLLM.from_pretrained(converted, backend=backend, dtype="float32").forward_verify("m", TOKENS)
        assert scaled_error(got, want) <= 1e-4, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_confident_router_picks_the_expert_transformers_picks(checkpoints, tmp_path, backend):
    """Routers scaled so logits run far past 17, where float32 sigmoids round to the same 1.0: transformers chooses
    by the logits (its topk), so must Ferrum (choosing by the sigmoids broke their tie by index: another expert)."""
    import torch

    folder, hf = checkpoints["scout"]
    shutil.copytree(folder, tmp_path / "confident")
    tensors = load_file(str(tmp_path / "confident" / "model.safetensors"))
    routers = [name for name in tensors if name.endswith("feed_forward.router.weight")]
    for name in routers:
        tensors[name] = tensors[name] * 400.0
    save_file(tensors, str(tmp_path / "confident" / "model.safetensors"), metadata={"format": "pt"})
    confident = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "confident", dtype=torch.float32).eval()
    with torch.no_grad():  # the test bites: several experts' logits past 17 for most tokens
        h = confident.model.embed_tokens(torch.tensor([TOKENS]))[0]
        saturated = (confident.model.layers[0].feed_forward.router(h)[1] > 17).sum(dim=-1)  # (scores, logits)
    assert int((saturated >= 2).sum()) >= 5, saturated
    model = DecoderOnlyLLM.from_pretrained(tmp_path / "confident", backend=backend, block_size=4, dtype="float32")
    assert_forward_and_decode_match(model, TOKENS, reference_logits(confident, TOKENS))


def test_mobilellm_r1s_dense_layout_runs_as_transformers_runs_it(tmp_path_factory):
    """MobileLLM-R1 is a llama4_text without experts (num_local_experts 0, num_experts_per_tok 0,
    interleave_moe_layer_step 0, moe_layers []): every layer dense, as transformers builds it; they were refused as
    non-positive. A step of 0 without moe_layers is refused by name (transformers cannot build it)."""
    dense = dict(num_local_experts=0, num_experts_per_tok=0, interleave_moe_layer_step=0, moe_layers=[],
                 no_rope_layers=[1, 1, 1, 1], attn_temperature_tuning=False, tie_word_embeddings=True)
    folder, hf = saved_references(tmp_path_factory, {"mobilellm": dense}, llama4_config)["mobilellm"]
    for backend in BACKENDS:
        model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
        assert [spec.mlp for spec in model.config.arch.layers] == ["dense"] * 4
        assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))
    raw = json.loads((folder / "config.json").read_text())
    with pytest.raises(ConfigError, match="'interleave_moe_layer_step' is 0, which makes no layer sparse only with"):
        ModelConfig.from_dict({k: v for k, v in raw.items() if k != "moe_layers"})
