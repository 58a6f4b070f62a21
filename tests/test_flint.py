"""Recursive's Flint (``flint``): Qwen3-MoE's attention (per-head q/k norms before rope) with gpt-oss's learned sink
per query head, rope on the sliding layers only (the full layers NoPE), and experts weighed by their renormalized
sigmoid scores beside an ungated shared expert, Qwen's dense layers by mlp_only_layers; against transformers'
FlintForCausalLM on every runnable backend. The checks every MoE family makes alike are
tests/test_moe_families.py's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_logits_move, assert_matches_transformers, assert_router_computes_in_float32, float32_model,
    runnable_backends, saved_references,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def flint_config(**extra) -> transformers.FlintConfig:
    """Five layers, full at 0, 1 and 4 (FlintConfig's rule), the others sliding over 5 tokens, shorter than the test's
    13; eight experts of 32, three a token, a shared expert of 24; the first two layers dense (48 wide)."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=24,
                    num_experts=8, num_experts_per_tok=3, sliding_window=5, max_position_embeddings=256,
                    bos_token_id=1, eos_token_id=2)
    return transformers.FlintConfig(**{**settings, **extra})


#: The release's layout; and one dense layer, every other layer sparse, unnormalized top-2 weights, biased attention,
#: a rope base of its own.
VARIANTS = {"release": {}, "plain": dict(mlp_only_layers=[0], decoder_sparse_step=2, norm_topk_prob=False,
                                         num_experts_per_tok=2, attention_bias=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 100.0})}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, flint_config)


def test_reads_the_layers_and_the_routing(checkpoints):
    arch = float32_model(checkpoints["release"][0]).config.arch
    assert [(spec.window, spec.rope.rotary_dim, spec.mlp) for spec in arch.layers] == [
        (None, 0, "dense"), (None, 0, "dense"), (5, 16, "moe"), (5, 16, "moe"), (None, 0, "moe")]
    moe = arch.moe
    assert (arch.sinks, arch.qk_norm, moe.routing, moe.normalize, moe.shared_expert_size, moe.shared_gate,
            moe.router_float32) == (True, "head", "sigmoid_top_k", True, 24, None, True)
    plain = float32_model(checkpoints["plain"][0]).config.arch
    assert [spec.mlp for spec in plain.layers] == ["dense", "moe", "dense", "moe", "dense"]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_matches_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("part", ["sinks", "shared_expert", "sigmoid"])
def test_the_parity_checks_the_sinks_the_shared_expert_and_the_routing(checkpoints, part):
    """transformers' logits move where the sinks join no softmax, the shared expert is left out, or the experts are
    weighed by a softmax of the router's logits (Qwen3-MoE's): each matters in the comparison above."""
    folder, hf = checkpoints["release"]
    changed = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for layer in changed.model.layers:
            if part == "sinks":
                layer.self_attn.sinks.fill_(-1e9)
            elif hasattr(layer.mlp, "gate") and part == "shared_expert":
                layer.mlp.shared_expert.down_proj.weight.zero_()
            elif hasattr(layer.mlp, "gate"):
                layer.mlp.gate.forward = _softmax_router(layer.mlp.gate)
    assert_logits_move(changed, hf, TOKENS)


def _softmax_router(gate):
    def forward(hidden_states):
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, gate.hidden_dim).float(), gate.weight.float())
        weights, chosen = torch.topk(logits.softmax(-1), gate.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), chosen
    return forward


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
def test_sinks_and_router_stay_float32_in_bfloat16(checkpoints, backend):
    """transformers keeps the sinks and the router in float32 (``_keep_in_fp32_modules_strict``): so does Ferrum."""
    folder, hf = checkpoints["release"]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="bfloat16")
    layer, theirs = model.layers[2], hf.model.layers[2]
    sinks = theirs.self_attn.sinks.detach().numpy()
    assert not np.array_equal(sinks, sinks.astype("bfloat16").astype(np.float32))  # bfloat16 would round them
    np.testing.assert_array_equal(model.ops.to_numpy(layer.sinks), sinks)
    assert_router_computes_in_float32(layer.mlp, model.ops, theirs.mlp.gate.weight.detach().numpy())


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**flint_config().to_dict(), **changes}


def test_config_defaults_are_transformers():
    """Without layer_types, mlp_only_layers or the MoE sizes, FlintConfig's: full layers at the first two, every
    fourth from the second and the last; the first two dense; 256 experts of 512, six a token, a shared one of
    1024; a window of 513. An explicit null mlp_only_layers is read as transformers reads it (the first two)."""
    raw = {k: v for k, v in _raw().items() if k not in (
        "layer_types", "mlp_only_layers", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
        "shared_expert_intermediate_size", "sliding_window", "head_dim")}
    raw["num_hidden_layers"], raw["hidden_size"] = 10, 4 * 128
    config, want = ModelConfig.from_dict(raw), transformers.FlintConfig(**raw)
    moe = config.arch.moe
    assert [spec.window for spec in config.arch.layers] == [
        want.sliding_window if kind == "sliding_attention" else None for kind in want.layer_types]
    assert [spec.mlp == "dense" for spec in config.arch.layers] == [i in want.mlp_only_layers for i in range(10)]
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size, config.head_dim) == (
        want.num_experts, want.num_experts_per_tok, want.moe_intermediate_size, want.shared_expert_intermediate_size,
        want.head_dim) == (256, 6, 512, 1024, 128)
    nulled = ModelConfig.from_dict({**raw, "mlp_only_layers": None})
    assert [spec.mlp for spec in nulled.arch.layers][:3] == ["dense", "dense", "moe"]


@pytest.mark.parametrize("changes, error, words", [
    ({"num_experts_per_tok": 9}, ConfigError, "'num_experts_per_tok' (9) exceeds the 8 experts"),
    ({"layer_types": ["sliding_attention"] * 3}, ConfigError, "'layer_types' must list 5 entries"),
    ({"mlp_only_layers": "first"}, ConfigError, "'mlp_only_layers' must list layer indices"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     UnsupportedFeatureError, "sets partial_rotary_factor 0.5"),
    ({"hidden_act": "gelu"}, UnsupportedFeatureError, "'hidden_act'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))
