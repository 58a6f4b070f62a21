"""poolside's Laguna (``laguna``): Llama's blocks with per-head q/k norms, each attention kind's own rope (the full
layers' over half of each head), each head's output times the softplus of its own gate, a query head count per layer
(fewer padded at load), and experts chosen by sigmoid scores plus a correction bias, renormalized and scaled, beside
an ungated shared expert; against transformers' LagunaForCausalLM on every runnable backend. The checks every MoE
family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_matches_transformers, float32_model, randomized_reference, reference_logits, runnable_backends,
    saved_references, scaled_error,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
KINDS = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
ROPES = {"full_attention": {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5},
         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 1.0}}


def laguna_config(**extra) -> transformers.LagunaConfig:
    """Four layers, full and sliding (over 5 tokens, shorter than the test's 13) in turn, 4 query heads on the full
    layers and 2 on the sliding ones over 2 key/value heads; eight experts of 32, three a token, scaled by 2.5, a
    shared expert of 24; the first layer dense (48 wide)."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=24,
                    num_experts=8, num_experts_per_tok=3, moe_routed_scaling_factor=2.5, sliding_window=5,
                    layer_types=KINDS, num_attention_heads_per_layer=[4, 2, 4, 2], rope_parameters=ROPES,
                    max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    return transformers.LagunaConfig(**{**settings, **extra})


def _with_biases(config) -> transformers.LagunaForCausalLM:
    """:func:`randomized_reference` with correction biases (a parameter here) large enough to change the choice."""
    model = randomized_reference(config)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    return model


#: Per-head gates; and per-element ones, biased attention, router logits soft-capped, YaRN on the full layers, every
#: layer with all four heads.
VARIANTS = {"release": {}, "element": dict(
    gating="per-element", attention_bias=True, moe_router_logit_softcapping=0.25, num_attention_heads_per_layer=None,
    rope_parameters={**ROPES, "full_attention": {**ROPES["full_attention"], "rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64}})}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, laguna_config, _with_biases)


def test_reads_the_layers_the_gate_and_the_routing(checkpoints):
    config = float32_model(checkpoints["release"][0]).config
    arch, moe = config.arch, config.arch.moe
    assert config.num_heads == 4
    assert [(s.window, s.rope.rotary_dim, s.rope.theta, s.mlp, s.heads.query_heads) for s in arch.layers] == [
        (None, 8, 1000.0, "dense", None), (5, 16, 100.0, "moe", 2), (None, 8, 1000.0, "moe", None),
        (5, 16, 100.0, "moe", 2)]
    assert (arch.attn_gate, arch.attn_gate_per_head, arch.qk_norm) == ("softplus", True, "head")
    assert (moe.routing, moe.correction_bias, moe.normalize, moe.routed_scale, moe.shared_expert_size,
            moe.router_softcap) == ("sigmoid_grouped", "experts.e_score_correction_bias", True, 2.5, 24, None)
    element = float32_model(checkpoints["element"][0]).config.arch
    assert (element.attn_gate_per_head, element.moe.router_softcap) == (False, 0.25)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_matches_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("variant, part", [("release", "g_proj"), ("release", "sigmoid"), ("element", "softcap")])
def test_the_parity_checks_the_gate_and_the_softcap(checkpoints, variant, part):
    """transformers' logits move where the gate is left open (its projection zeroed: every head times log 2), where
    it is a sigmoid (AFMoE's), or where the router's logits are not capped: each matters in the comparison above."""
    folder, hf = checkpoints[variant]
    changed = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        for layer in changed.model.layers:
            if part == "g_proj":
                layer.self_attn.g_proj.weight.zero_()
            elif part == "softcap" and hasattr(layer.mlp, "gate"):
                layer.mlp.gate.router_logit_softcapping = 0.0
    if part == "sigmoid":
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.nn.functional, "softplus", torch.sigmoid)
            got = reference_logits(changed, TOKENS)
    else:
        got = reference_logits(changed, TOKENS)
    assert scaled_error(got, reference_logits(hf, TOKENS)) > 1e-2


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**laguna_config().to_dict(), **changes}


def test_config_defaults_are_transformers():
    """Without layer_types, mlp_layer_types, rope_parameters or the per-layer heads, LagunaConfig's: every layer full,
    its rope base 500000 over half of each head, the first layer dense, every layer with num_attention_heads."""
    raw = {k: v for k, v in _raw().items() if k not in (
        "layer_types", "mlp_layer_types", "rope_parameters", "num_attention_heads_per_layer", "num_experts",
        "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "head_dim",
        "moe_routed_scaling_factor")}
    raw["hidden_size"] = 4 * 128
    config, want = ModelConfig.from_dict(raw), transformers.LagunaConfig(**raw)
    moe = config.arch.moe
    assert [(s.window, s.rope.theta, s.rope.rotary_dim, s.mlp, s.heads.query_heads) for s in config.arch.layers] == [
        (None, 500_000.0, 64, "dense" if kind == "dense" else "moe", None) for kind in want.mlp_layer_types]
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size, moe.routed_scale) == (
        want.num_experts, want.num_experts_per_tok, want.moe_intermediate_size, want.shared_expert_intermediate_size,
        want.moe_routed_scaling_factor) == (256, 8, 512, 512, 1.0)


def test_a_window_of_0_is_none_where_no_layer_slides():
    """Laguna-M.1's release: sliding_window 0, every layer full (transformers builds it so)."""
    raw = _raw(sliding_window=0, layer_types=["full_attention"] * 4)
    transformers.LagunaConfig(**raw)
    assert [s.window for s in ModelConfig.from_dict(raw).arch.layers] == [None] * 4
    with pytest.raises(ConfigError, match=re.escape("'sliding_window' is 0, but layer_types lists sliding layers")):
        ModelConfig.from_dict(_raw(sliding_window=0))


@pytest.mark.parametrize("changes, error, words", [
    ({"num_attention_heads_per_layer": [4, 3, 4, 2]}, ConfigError, "each a multiple of the 2 key/value heads"),
    ({"num_attention_heads_per_layer": [4, 2]}, ConfigError, "must list 4 head counts"),
    ({"gating": False}, UnsupportedFeatureError, "'gating' is False"),
    ({"moe_apply_router_weight_on_input": True}, UnsupportedFeatureError, "transformers' Laguna refuses it too"),
    ({"moe_router_score_func": "sqrtsoftplus"}, UnsupportedFeatureError, "routes by sigmoid scores"),
    ({"partial_rotary_factor": 0.5, "rope_parameters": {"full_attention": {"rope_theta": 1e4},
                                                        "sliding_attention": {"rope_theta": 1e2}}},
     UnsupportedFeatureError, "give each kind its own"),
    ({"mlp_layer_types": ["dense", "sparse"]}, ConfigError, "lists 2 layers, but the model has 4"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


# ------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory):
    """A Laguna of per-element gates (its g_proj as wide as the dense MLPs' gate_proj: 4 heads of 16, 64) in which
    every layer has all four heads, saved with transformers."""
    root = tmp_path_factory.mktemp("laguna_lora")
    hf = randomized_reference(laguna_config(gating="per-element", num_attention_heads_per_layer=None,
                                            intermediate_size=64, mlp_layer_types=["dense"] * 4))
    hf.save_pretrained(root / "base")
    return root, hf


def _peft_adapter(hf, folder, targets, seed: int = 1):
    """A PEFT LoRA of ``hf`` on ``targets`` (random B factors) saved in ``folder``; returns PEFT's merged model."""
    import copy

    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(hf), config)
    model.save_pretrained(folder)
    return model.merge_and_unload().eval()


@pytest.mark.parametrize("targets", [["q_proj", "g_proj"], r".*\.g_proj"])
def test_lora_on_the_attention_gate_is_refused_by_name(lora_base, tmp_path, targets):
    """``self_attn.g_proj`` is the attention gate (Ferrum's ``self_attn.gate_proj``), which Ferrum does not adapt:
    refused, not applied to the MLP's gate_proj of the same shape (named as a target, or matched by a regex)."""
    from ferrum.errors import AdapterError

    root, hf = lora_base
    _peft_adapter(hf, tmp_path / "gate", targets)
    model = float32_model(root / "base")
    with pytest.raises(AdapterError, match="attention gate .*g_proj is not supported"):
        model.adapters.load("gate", tmp_path / "gate")


def test_lora_on_q_k_v_o_and_the_mlp_matches_peft(lora_base, tmp_path):
    root, hf = lora_base
    merged = _peft_adapter(hf, tmp_path / "a", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    want = reference_logits(merged, TOKENS)
    assert scaled_error(reference_logits(hf, TOKENS), want) > 0.05  # the adapter matters
    model = float32_model(root / "base")
    model.adapters.load("a", tmp_path / "a")
    assert scaled_error(_adapted(model, "a"), want) < 1e-4


def test_lora_on_layers_of_fewer_query_heads_matches_peft(tmp_path):
    """The release layout (4, 2, 4, 2 query heads over 2 key/value heads): the load pads the 2-head layers' q_proj
    rows and o_proj columns with zero heads, and the adapter's q B and o A factors likewise."""
    hf = randomized_reference(laguna_config())
    hf.save_pretrained(tmp_path / "base")
    merged = _peft_adapter(hf, tmp_path / "a", ["q_proj", "k_proj", "v_proj", "o_proj"], seed=2)
    want = reference_logits(merged, TOKENS)
    assert scaled_error(reference_logits(hf, TOKENS), want) > 0.05
    model = float32_model(tmp_path / "base")
    assert model.adapters.load("a", tmp_path / "a").projections == 4 * 4
    assert scaled_error(_adapted(model, "a"), want) < 1e-4


def _adapted(model, adapter: str) -> np.ndarray:
    from ferrum.model import ForwardItem

    out = model.forward([ForwardItem("s", TOKENS, 0, adapter=adapter)], all_logits=True)
    return model.ops.to_numpy(out.logits)


# ------------------------------------------------------------ ferrum quantize


def test_ferrum_quantize_refuses_a_group_size_that_cuts_the_padded_query_heads(tmp_path):
    """A layer of fewer query heads has its packed o_proj padded at load in whole groups of each key/value head's
    queries (here one head of 32 inputs): `ferrum quantize` refuses group size 64 before writing anything, naming the
    size that does; at 32 it writes a folder Ferrum runs near transformers' float logits."""
    from ferrum.errors import UnsupportedFeatureError as Unsupported
    from ferrum.quant.convert import quantize_checkpoint

    hf = randomized_reference(laguna_config(head_dim=32))
    hf.save_pretrained(tmp_path / "base")
    with pytest.raises(Unsupported, match=r"model\.layers\.1\.self_attn\.o_proj\.weight: this layer's 2 query heads "
                                          r".* group size 64 .* quantize with group size 32,"):
        quantize_checkpoint(tmp_path / "base", tmp_path / "q64", bits=8, group_size=64)
    assert not (tmp_path / "q64").exists()
    out = quantize_checkpoint(tmp_path / "base", tmp_path / "q32", bits=8, group_size=32)
    got = float32_model(out).forward_verify("q", TOKENS)
    assert scaled_error(got, reference_logits(hf, TOKENS)) < 2e-2
