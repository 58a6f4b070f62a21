"""Ling 3 (``bailing_hybrid``): Kimi Delta Attention layers whose log-decay is bounded below (API 1.27's
``lower_bound``) between latent attention gated per head, over DeepSeek-V3's routing, against transformers on every
runnable backend (and mlx-lm's bailing_moe_v3); the engine's batching, chunking and preemption; its release's config
spellings and layout; the variants refused by name."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, assert_logits_move, build_transformers_model,
    float32_model, mlx_lm_logits, reference_logits, runnable_backends, scaled_error, small_pool_engine,
    staggered_greedy_workload, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 300
#: Longer than a chunk of the batched rule (ferrum.recurrent.batched.CHUNK): its chunked form runs too.
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=21)]


def config(**extra) -> transformers.BailingHybridConfig:
    """Four linear heads of 8 dims in three layers, then latent attention (q/k heads of 16 + 8 dims, values of 12),
    8 experts in 2 groups, a dense first layer."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                    q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_local_experts=8,
                    num_experts_per_tok=2, n_group=2, topk_group=1, head_dim=8, short_conv_kernel_size=4,
                    layer_group_size=4, first_k_dense_replace=1, num_mtp_layers=0, max_position_embeddings=256,
                    pad_token_id=None, bos_token_id=0, eos_token_id=1)
    return transformers.BailingHybridConfig(**{**settings, **extra})


def _build(folder, cfg):
    hf = build_transformers_model(folder, cfg)
    with torch.no_grad():  # correction biases that change which experts are chosen; decay rates as initialized
        for name, tensor in [*hf.named_buffers(), *hf.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                tensor.normal_(0, 0.5)
            if name.endswith("A_log"):
                tensor.uniform_(1.0, 16.0).log_()
    hf.save_pretrained(folder)
    write_tokenizer(folder, VOCAB)
    return folder, hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("bailing_hybrid"), config())


def test_reads_layer_kinds_the_bounded_decay_the_gated_latent_attention_and_the_experts(checkpoint):
    arch = float32_model(checkpoint[0]).config.arch
    assert [s.mixer for s in arch.layers] == ["kimi_delta", "kimi_delta", "kimi_delta", "attention"]
    assert [s.mlp for s in arch.layers] == ["dense", "moe", "moe", "moe"]
    assert arch.layers[3].rope.interleaved and arch.mla.rope == 8 and arch.moe.n_group == 2
    assert arch.attn_gate_per_head and arch.kimi_delta.lower_bound == -5.0
    assert (arch.kimi_delta.heads, arch.kimi_delta.head_dim, arch.kimi_delta.forget) == (4, 8, ("f_proj",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoint, backend):
    folder, hf = checkpoint
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_a_model_of_full_attention_layers_alone_runs(tmp_path):
    """Every layer full attention (transformers builds it): no linear layer's convolution to look the layout up by
    (the lookup raised StopIteration)."""
    folder, hf = _build(tmp_path, config(num_hidden_layers=2, layer_group_size=1, layer_types=["full_attention"] * 2))
    assert scaled_error(float32_model(folder).forward_verify("f", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


def test_the_shared_dense_name_reads_back_whatever_the_names_order(checkpoint, monkeypatch):
    """transformers saves both layer kinds' output projections as ``attention.dense``: it reads back as the latent
    attention's o_proj (which the linear layers rename out_proj) by Architecture.read_names, not by which of the two
    BAILING_NAMES lists last; a table sharing a stored name without saying how it reads back is refused."""
    from ferrum.arch.families import hybrid

    folder, hf = checkpoint
    monkeypatch.setattr(hybrid, "BAILING_NAMES", dict(reversed(hybrid.BAILING_NAMES.items())))
    model = float32_model(folder)
    assert list(model.config.arch.stored_names)[-1] != "self_attn.o_proj"  # the order that used to read it out_proj
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))
    with pytest.raises(ConfigError, match=r"\['attention.dense'\] .* Architecture.read_names"):
        replace(model.config.arch, read_names={})


def test_the_unbounded_gate_runs_as_kimis(tmp_path):
    """kda_safe_gate false: ``-exp(A_log) * softplus(f + dt_bias)``, the gated delta rule without its bound."""
    folder, hf = _build(tmp_path / "unsafe", config(kda_safe_gate=False))
    model = float32_model(folder)
    assert model.config.arch.kimi_delta.lower_bound is None
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_bound_and_the_attention_gate_count_in_the_check(checkpoint):
    """transformers' logits move where its forget gate runs unbounded or the latent attention's heads go ungated:
    the checks above fail on a Ferrum that dropped either."""
    from transformers.models.bailing_hybrid.modeling_bailing_hybrid import BailingHybridForgetGate

    folder, hf = checkpoint
    unbounded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for module in unbounded.modules():
        if isinstance(module, BailingHybridForgetGate):
            module.safe_gate = False
    assert_logits_move(unbounded, hf, TOKENS)
    ungated = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ungated.model.layers[3].self_attn.g_proj.weight.zero_()  # every head's output halved
    assert_logits_move(ungated, hf, TOKENS)


def test_a_plugin_declaring_an_older_api_is_never_handed_the_bound(checkpoint, monkeypatch):
    """Its layers run the core's fallback, chosen when they are built, and give transformers' logits."""
    import ferrum.backends
    from ferrum.recurrent.gated_delta import runs_natively

    folder, hf = checkpoint
    monkeypatch.setattr(ferrum.backends, "declared_version", lambda info: (1, 25))
    model = float32_model(folder)
    assert not runs_natively(model.ops, True, True) and runs_natively(model.ops, True)
    fallback, calls = model.ops.fallback["gated_delta_rule"], []
    monkeypatch.setitem(model.ops.fallback, "gated_delta_rule", lambda *args: calls.append(args[-1]) or fallback(*args))
    monkeypatch.setattr(model.ops, "gated_delta_rule", None)  # never called
    assert scaled_error(model.forward_verify("o", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4
    assert calls and set(calls) == {-5.0}


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoint, monkeypatch):
    folder, hf = checkpoint
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), hf, TOKENS, "gated_delta_rule",
                                                      monkeypatch)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoint):
    folder, hf = checkpoint
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoint, backend):
    folder, hf = checkpoint
    assert_engine_keeps_greedy_tokens(lambda **settings: small_pool_engine(folder, backend, **settings), hf,
                                      staggered_greedy_workload(VOCAB))


def _as_released(folder, destination):
    """The checkpoint as inclusionAI's release of Ling 3 writes it: its remote code's architecture and keys (no
    layer_types, mlp_layer_types or linear_* keys: head_dim is the linear heads'), the linear layers' output
    projection ``o_proj`` (transformers saves ``dense``), and a multi-token prediction layer after the decoder's."""
    shutil.copytree(folder, destination)
    raw = json.loads((destination / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim",
                "num_experts_per_token", "moe_renormalize", "num_expert_group", "model_max_length"):
        raw.pop(key)
    raw.update(architectures=["BailingMoeV3ForCausalLM"], head_dim=8, num_experts_per_tok=2, n_group=2,
               norm_topk_prob=True, max_position_embeddings=256, moe_shared_expert_intermediate_size=24,
               no_kda_lora=True, rope_interleave=True, rope_scaling=None, num_nextn_predict_layers=1,
               expert_swiglu_limit_list=[0, 0, 0, 0], share_expert_swiglu_limit_list=None)
    (destination / "config.json").write_text(json.dumps(raw))
    tensors = {name if ".layers.3." in name else name.replace("attention.dense", "attention.o_proj"): array
               for name, array in load_file(destination / "model.safetensors").items()}
    tensors["model.layers.4.enorm.weight"] = np.ones(64, np.float32)  # the MTP layer, not run
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


def test_the_linear_layers_heads_and_convolution_are_transformers_copies(checkpoint):
    """transformers sets linear_num_heads and linear_conv_kernel_dim from num_attention_heads and
    short_conv_kernel_size whatever the config's own copies say (they were read first)."""
    raw = json.loads((checkpoint[0] / "config.json").read_text())
    want = ModelConfig.from_dict(raw)
    assert ModelConfig.from_dict({**raw, "linear_num_heads": 8, "linear_conv_kernel_dim": 2}) == want


def test_the_releases_config_and_layout_load(checkpoint, tmp_path):
    folder, hf = checkpoint
    released = _as_released(folder, tmp_path / "released")
    assert "model.layers.0.attention.o_proj.weight" in load_file(released / "model.safetensors")
    assert scaled_error(float32_model(released).forward_verify("r", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("change, key", [
    (dict(architectures=["BailingMoeV2_5ForCausalLM"]), "architectures"),  # Ling 2.5 / 2.6's lightning attention
    (dict(expert_swiglu_limit_list=[0, 0, 7.0, 7.0]), "expert_swiglu_limit_list"),
    (dict(share_expert_swiglu_limit_list=[0, 0, 0, 7.0]), "share_expert_swiglu_limit_list"),
    (dict(layer_group_size=3), "layer_group_size"),  # transformers and Ling's code place the last layer apart
    (dict(no_kda_lora=False), "no_kda_lora"),
    (dict(rope_interleave=False), "rope_interleave"),
    (dict(moe_shared_expert_intermediate_size=48), "moe_shared_expert_intermediate_size"),
])
def test_variants_transformers_does_not_run_are_refused_by_name(checkpoint, tmp_path, change, key):
    released = _as_released(checkpoint[0], tmp_path / "released")
    raw = json.loads((released / "config.json").read_text())
    (released / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(UnsupportedFeatureError, match=key):
        float32_model(released)


@pytest.mark.slow  # mlx-lm loads its own model: ~2 s
@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
def test_mlx_lm_runs_the_release_as_ferrum_does(checkpoint, tmp_path):
    """mlx-lm's bailing_moe_v3 (its model for Ling 3's release) reads the released layout; its logits are
    transformers' and Ferrum's."""
    folder, hf = checkpoint
    released = _as_released(folder, tmp_path / "released")
    want = mlx_lm_logits(released, TOKENS)
    assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    for backend in BACKENDS:
        assert scaled_error(float32_model(released, backend).forward_verify("m", TOKENS), want) <= 1e-4, backend


def test_the_conformance_check_fails_on_a_rule_that_ignores_the_bound(monkeypatch):
    from ferrum.backends import load_backend
    from ferrum.testing.conformance import _Context, _Mismatch
    from ferrum.testing.family_checks import check_gated_delta_rule_bounded

    backend = load_backend("cpu")
    real = backend.ops.gated_delta_rule
    monkeypatch.setattr(backend.ops, "gated_delta_rule", lambda *args: real(*args[:10]))
    with pytest.raises(_Mismatch):
        check_gated_delta_rule_bounded(_Context(backend, "float32"), 2e-5)
