"""Arcee Trinity (``afmoe``): a norm before and after attention and the MLP, per-head q/k norms, the attention output
gated by the sigmoid of its own projection, rope on the sliding layers only (full layers NoPE), muP's scaled
embeddings, and experts chosen by sigmoid scores plus a per-expert bias, renormalized and scaled, beside shared
experts; against transformers' AfmoeForCausalLM on every runnable backend, and mlx-lm's afmoe and its conversions.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, assert_logits_move, build_transformers_model, reference_logits, runnable_backends,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
#: The keys of Arcee's own code (and mlx-lm's) that Trinity's config.json carries, valued as transformers runs them.
RELEASE_KEYS = dict(score_func="sigmoid", route_norm=True, n_group=1, topk_group=1)


def afmoe_config(**extra) -> transformers.AfmoeConfig:
    """Eight experts of 24, three a token, scaled by 2.5, one shared; the first layer dense (96 wide); every other
    layer full (NoPE) and the others sliding over 5 tokens, shorter than the test's 13; muP on."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                    num_experts_per_tok=3, num_shared_experts=1, route_scale=2.5, num_dense_layers=1,
                    global_attn_every_n_layers=2, sliding_window=5, mup_enabled=True, max_position_embeddings=256)
    return transformers.AfmoeConfig(**{**settings, **extra})


def _build(folder, **extra):
    """A random checkpoint whose expert biases (zeros at init) are random too, large enough to change the choice."""
    hf = build_transformers_model(folder, afmoe_config(**extra))
    with torch.no_grad():
        for layer in hf.model.layers[hf.config.num_dense_layers:]:
            layer.mlp.expert_bias.normal_(0, 0.5)
    hf.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **RELEASE_KEYS}))
    return folder, hf


#: As above; and muP off, two shared experts, attention biases, top-2.
VARIANTS = {"trinity": {}, "plain": dict(mup_enabled=False, num_shared_experts=2, attention_bias=True,
                                         num_experts_per_tok=2)}


def build_checkpoints(tmp_path_factory) -> dict:
    return {name: _build(tmp_path_factory.mktemp(name), **extra) for name, extra in VARIANTS.items()}


def load(folder, backend="cpu", **kwargs) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", **kwargs)


def test_reads_the_layers_and_the_routing(checkpoints):
    arch = load(checkpoints["trinity"][0]).config.arch
    assert [(spec.window, spec.rope.rotary_dim, spec.mlp) for spec in arch.layers] == [
        (5, 16, "dense"), (None, 0, "moe"), (5, 16, "moe"), (None, 0, "moe")]
    assert (arch.attn_output_gate, arch.attn_gate_stored, arch.qk_norm, arch.embed_scale) == (True, True, "head", 8.0)
    moe = arch.moe
    assert (moe.routing, moe.correction_bias, moe.normalize, moe.routed_scale, moe.shared_expert_size) == (
        "sigmoid_grouped", "expert_bias", True, 2.5, 24)
    assert load(checkpoints["plain"][0]).config.arch.embed_scale is None


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(load(folder, backend, block_size=4), TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("part", ["expert_bias", "route_scale", "gate_proj"])
def test_the_parity_checks_the_bias_the_scale_and_the_output_gate(checkpoints, part):
    """transformers' logits move where the expert bias is zeroed, the routed weights are left unscaled, or the output
    gate is left open (its projection zeroed: every head times 1/2): each matters in the comparison above."""
    folder, hf = checkpoints["trinity"]
    changed = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        for layer in changed.model.layers:
            if part == "gate_proj":
                layer.self_attn.gate_proj.weight.zero_()
            elif part == "expert_bias" and hasattr(layer.mlp, "expert_bias"):
                layer.mlp.expert_bias.zero_()
            elif part == "route_scale" and hasattr(layer.mlp, "router"):
                layer.mlp.router.route_scale = 1.0
    assert_logits_move(changed, hf, TOKENS)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**afmoe_config().to_dict(), **RELEASE_KEYS, **changes}


def test_config_defaults_are_transformers():
    """Without layer_types, every global_attn_every_n_layers-th layer is full; the other defaults are AfmoeConfig's."""
    raw = {k: v for k, v in _raw().items() if k not in (
        "layer_types", "num_experts", "num_experts_per_tok", "num_shared_experts", "route_scale", "num_dense_layers",
        "sliding_window", "global_attn_every_n_layers", "mup_enabled", "head_dim", "moe_intermediate_size")}
    raw["hidden_size"] = 4 * 128
    config, want = ModelConfig.from_dict(raw), transformers.AfmoeConfig(**raw)
    moe = config.arch.moe
    assert [spec.window for spec in config.arch.layers] == [
        want.sliding_window if kind == "sliding_attention" else None for kind in want.layer_types]
    assert (moe.num_experts, moe.top_k, moe.routed_scale, moe.expert_size, moe.shared_expert_size) == (
        want.num_experts, want.num_experts_per_tok, want.route_scale, want.moe_intermediate_size,
        want.moe_intermediate_size * want.num_shared_experts)
    assert [spec.mlp for spec in config.arch.layers] == ["dense"] * want.num_dense_layers + ["moe"] * (
        4 - want.num_dense_layers)
    assert config.head_dim == want.head_dim and config.arch.embed_scale is None


@pytest.mark.parametrize("changes, error, words", [
    ({"score_func": "softmax"}, UnsupportedFeatureError, "routes by sigmoid scores whatever it says"),
    ({"route_norm": False}, UnsupportedFeatureError, "always renormalizes"),
    ({"n_group": 2}, UnsupportedFeatureError, "'n_group' is 2; transformers' AFMoE routes over all experts"),
    ({"num_experts_per_tok": 9}, ConfigError, "'num_experts_per_tok' (9) exceeds the 8 experts"),
    ({"layer_types": ["sliding_attention"] * 3}, ConfigError, "'layer_types' must list 4 entries"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))
