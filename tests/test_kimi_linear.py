"""Kimi Linear (``kimi_linear``): Kimi Delta Attention layers (a gated delta rule decaying per key channel, API 1.20)
between latent attention without rope, over DeepSeek-V3's routing, against transformers on every runnable backend;
the engine's batching, chunking and preemption; its release's config spellings and layouts."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from ferrum.engine import Engine, EngineConfig
from ferrum.errors import UnsupportedFeatureError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM
from ferrum import reference_ops
from ferrum.recurrent import kernels
from ferrum.testing.family_checks import check_gated_delta_rule_per_channel
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, build_transformers_model, reference_logits,
    mlx_lm_logits, runnable_backends, scaled_error, staggered_greedy_workload, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 300
#: Longer than a chunk of the batched rule (ferrum.recurrent.batched.CHUNK): its chunked form runs too.
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=21)]
TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]


def config(**extra) -> transformers.KimiLinearConfig:
    """Three KDA heads of 8 dims, latent attention (q/k heads of 16 + 8 dims, values of 12), 8 experts in 2 groups,
    a dense first layer."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                    q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_local_experts=8,
                    num_experts_per_tok=2, n_group=2, topk_group=1, linear_head_dim=8, linear_num_heads=3,
                    linear_conv_kernel_dim=4, max_position_embeddings=256, pad_token_id=None, bos_token_id=0,
                    eos_token_id=1, layer_types=TYPES)
    return transformers.KimiLinearConfig(**{**settings, **extra})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kimi_linear")
    hf = build_transformers_model(folder, config())
    with torch.no_grad():  # correction biases that change which experts are chosen
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)
    hf.save_pretrained(folder)
    write_tokenizer(folder, VOCAB)
    return folder, hf


def load(folder, backend="cpu", **kwargs) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", **kwargs)


def test_reads_layer_kinds_latent_attention_without_rope_and_the_experts(checkpoint):
    model = load(checkpoint[0])
    arch = model.config.arch
    assert [s.mixer for s in arch.layers] == ["kimi_delta", "attention", "kimi_delta", "kimi_delta"]
    assert [s.mlp for s in arch.layers] == ["dense", "moe", "moe", "moe"]
    assert arch.layers[1].rope.rotary_dim == 0 and arch.mla.rope == 8 and arch.moe.n_group == 2
    assert (arch.kimi_delta.heads, arch.kimi_delta.head_dim) == (3, 8) and sorted(model.states.layers) == [0, 2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoint, backend):
    folder, hf = checkpoint
    assert_forward_and_decode_match(load(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_the_decay_per_key_channel_matters(checkpoint, monkeypatch):
    """A rule that took one decay per head (each head's first channel's) misses transformers: the check above can
    fail."""
    folder, hf = checkpoint
    real = kernels.gated_delta_rule

    def per_head(q, k, v, a, b, a_log, dt_bias, *rest):
        return real(q, k, v, np.asarray(a)[..., :1].repeat(a.shape[-1], -1), b, a_log,
                    np.asarray(dt_bias)[..., :1].repeat(dt_bias.shape[-1], -1), *rest)

    monkeypatch.setattr(kernels, "gated_delta_rule", per_head)
    model = load(folder)
    monkeypatch.setattr(model.ops, "gated_delta_rule", functools.partial(reference_ops.gated_delta_rule, model.ops))
    assert scaled_error(model.forward_verify("w", TOKENS), reference_logits(hf, TOKENS)) > 1e-3


def test_the_conformance_check_fails_on_a_rule_that_ignores_beta_scale(monkeypatch):
    from ferrum.backends import load_backend
    from ferrum.testing.conformance import _Context, _Mismatch

    backend = load_backend("cpu")
    real = backend.ops.gated_delta_rule
    monkeypatch.setattr(backend.ops, "gated_delta_rule", lambda *args: real(*args[:9]))
    context = _Context(backend, "float32")
    with pytest.raises(_Mismatch):
        check_gated_delta_rule_per_channel(context, 2e-5)


def test_a_plugin_declaring_an_older_api_is_never_handed_the_per_channel_gate(checkpoint, monkeypatch):
    """Its layers run the core's fallback, chosen when they are built, and give transformers' logits."""
    import ferrum.backends
    from ferrum.recurrent.gated_delta import runs_natively

    folder, hf = checkpoint
    monkeypatch.setattr(ferrum.backends, "declared_version", lambda info: (1, 18))
    model = load(folder)
    assert not runs_natively(model.ops, True) and runs_natively(model.ops, False)
    fallback, calls = model.ops.fallback["gated_delta_rule"], []
    monkeypatch.setitem(model.ops.fallback, "gated_delta_rule", lambda *args: calls.append(1) or fallback(*args))
    monkeypatch.setattr(model.ops, "gated_delta_rule", None)  # never called
    assert scaled_error(model.forward_verify("o", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4 and calls


def test_the_rule_is_chosen_once_when_the_layers_are_built(checkpoint, monkeypatch):
    model = load(checkpoint[0])
    asked = []
    accepts = model.ops.accepts
    monkeypatch.setattr(model.ops, "accepts", lambda *args: asked.append(args) or accepts(*args))
    model.forward_verify("c", TOKENS)
    assert ("gated_delta_rule", "beta_scale") not in asked


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])  # the shared mx / torch formulation
def test_a_long_prompt_runs_its_chunks_a_few_at_a_time(checkpoint, backend, monkeypatch):
    """With room for one chunk's per-channel decays at a time (ferrum.recurrent.batched.DECAY_BUDGET), a 45-token
    prompt's three chunks run one after another, the state carried between: transformers' logits all the same."""
    from ferrum.recurrent import batched

    folder, hf = checkpoint
    tokens = [int(t) for t in np.random.RandomState(1).randint(0, VOCAB, size=45)]
    real, groups = batched._chunks, []
    monkeypatch.setattr(batched, "DECAY_BUDGET", 1)
    monkeypatch.setattr(batched, "_chunks", lambda *args: groups.append(args[2].shape[1]) or real(*args))
    got = load(folder, backend).forward_verify("long", tokens)
    assert groups[:3] == [batched.CHUNK] * 3
    assert scaled_error(got, reference_logits(hf, tokens)) <= 1e-4


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoint, monkeypatch):
    folder, hf = checkpoint
    assert_a_failed_pass_leaves_every_state_as_it_was(load(folder), hf, TOKENS, "gated_delta_rule", monkeypatch)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoint):
    folder, hf = checkpoint
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(load(folder), hf, VOCAB)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoint, backend):
    folder, hf = checkpoint

    def engine(**settings) -> Engine:
        return Engine(LlmExecutor(load(folder, backend, num_kv_blocks=64, block_size=4)), None,
                      EngineConfig(**settings))

    assert_engine_keeps_greedy_tokens(engine, hf, staggered_greedy_workload(VOCAB))


def _as_released(folder, destination):
    """The checkpoint as Moonshot's release writes it: linear_attn_config (1-indexed layer lists), the remote code's
    spellings of the MoE keys, model_max_length, the dense MLP under ``mlp``."""
    shutil.copytree(folder, destination)
    raw = json.loads((destination / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim"):
        raw.pop(key)
    raw.update(linear_attn_config={"head_dim": 8, "num_heads": 3, "short_conv_kernel_size": 4,
                                   "full_attn_layers": [2], "kda_layers": [1, 3, 4]},
               first_k_dense_replace=1, mla_use_nope=True, moe_router_activation_func="sigmoid", rope_theta=10000.0,
               rope_scaling=None)
    (destination / "config.json").write_text(json.dumps(raw))
    tensors = {name.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): array
               for name, array in load_file(destination / "model.safetensors").items()}
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


def test_the_releases_config_and_layout_load(checkpoint, tmp_path):
    folder, hf = checkpoint
    released = _as_released(folder, tmp_path / "released")
    assert scaled_error(load(released).forward_verify("r", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4
    raw = json.loads((released / "config.json").read_text())
    (released / "config.json").write_text(json.dumps({**raw, "mla_use_nope": False}))
    with pytest.raises(UnsupportedFeatureError, match="mla_use_nope"):
        load(released)


# ------------------------------------------------------------------ mlx-lm's conversions


@pytest.fixture(scope="module")
def mlx_lm_conversions(tmp_path_factory):
    """A Kimi Linear whose kv_b_proj halves mlx-lm packs at group size 32 (qk_nope_head_dim and kv_lora_rank 32 wide)
    in its release's layout, which mlx-lm reads, and mlx-lm's float and 4-bit conversions: (model, {bits: folder})."""
    convert = pytest.importorskip("mlx_lm.convert")
    folder = tmp_path_factory.mktemp("kimi_mlx_source")
    hf = build_transformers_model(folder / "hf", config(kv_lora_rank=32, qk_nope_head_dim=32))
    with torch.no_grad():
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)
    hf.save_pretrained(folder / "hf")
    write_tokenizer(folder / "hf", VOCAB)
    source = _as_released(folder / "hf", folder / "released")
    converted = {}
    for bits in (None, 4):
        converted[bits] = folder / f"mlx_{bits}"
        convert.convert(str(source), str(converted[bits]), quantize=bits is not None, q_bits=bits or 4,
                        q_group_size=32, dtype="float32")
    return hf, converted


@pytest.mark.slow  # mlx-lm converts and quantizes: ~5 s
@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(mlx_lm_conversions, backend, bits):
    """mlx-lm moves the sparse MLP to ``mlp`` (experts stacked in switch_mlp, the correction bias beside the router),
    each KDA convolution to ``q_conv.conv`` ... with its taps ``[C, K, 1]``, and splits kv_b_proj into embed_q and
    unembed_out (packed at 4 bits, the router at 8): its conversions run as mlx-lm runs them, and, float, as
    transformers runs the original. (mlx-lm's latent norm takes rms_norm_eps, 1e-5 here, where Ferrum keeps the
    release's 1e-6: the logits agree all the same.)"""
    from safetensors import safe_open

    hf, converted = mlx_lm_conversions
    with safe_open(str(converted[bits] / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
        taps = f.get_slice("model.layers.0.self_attn.q_conv.conv.weight").get_shape()
    assert {"model.layers.1.mlp.switch_mlp.gate_proj.weight", "model.layers.1.mlp.e_score_correction_bias",
            "model.layers.1.self_attn.embed_q.weight"} <= names and taps == [24, 4, 1]
    assert not any("kv_b_proj" in n or "block_sparse_moe" in n for n in names)
    assert ("model.layers.1.self_attn.unembed_out.scales" in names) == (bits is not None)
    want = mlx_lm_logits(converted[bits], TOKENS)
    assert (scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4) == (bits is None)  # 4 bits move the logits
    assert_forward_and_decode_match(load(converted[bits], backend), TOKENS, want)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
def test_ferrum_quantize_writes_what_mlx_lm_loads(checkpoint, tmp_path):
    """mlx-lm's sanitize moves only the float weights of the sparse MLP to ``mlp``: `ferrum quantize` writes the MLPs
    there (the router at 8 bits, as mlx-lm's quant_predicate keeps it), so mlx-lm runs the folder as Ferrum does;
    transformers' save (its dense MLP under block_sparse_moe) comes out under the same names."""
    from ferrum.quant.convert import quantize_checkpoint

    folder, _ = checkpoint
    out = quantize_checkpoint(_as_released(folder, tmp_path / "released"), tmp_path / "q", bits=4, group_size=32)
    saved = quantize_checkpoint(folder, tmp_path / "saved", bits=4, group_size=32)
    names = set(load_file(out / "model.safetensors"))
    assert {"model.layers.0.mlp.gate_proj.scales", "model.layers.1.mlp.switch_mlp.up_proj.scales",
            "model.layers.1.mlp.gate.scales", "model.layers.1.mlp.e_score_correction_bias"} <= names
    assert not any("block_sparse_moe" in n for n in names) and names == set(load_file(saved / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["quantization"]["model.layers.1.mlp.gate"]["bits"] == 8
    want = mlx_lm_logits(out, TOKENS)
    for backend in BACKENDS:
        assert scaled_error(load(out, backend).forward_verify("q", TOKENS), want) <= 1e-4, backend
    assert scaled_error(load(saved).forward_verify("s", TOKENS), want) <= 1e-4
