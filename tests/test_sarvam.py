"""Sarvam-30B (``sarvam_moe``: GLM-4.5's blocks under Sarvam's names, q/k/v fused, whole-head rope, the router's
correction bias named ``expert_bias``) and Sarvam-105B (``sarvam_mla``: DeepSeek-V3 under other defaults), with the
release configs' own key names and rope type; against transformers' SarvamMoE / SarvamMLA on every runnable backend.
mlx-lm has neither family.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from ferrum.model import DecoderOnlyLLM
from support import assert_forward_and_decode_match, build_transformers_model, reference_logits, runnable_backends

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
#: Eight experts of 24, three a token in one of two groups, one shared; the first layer dense.
MOE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
           num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
           max_position_embeddings=256)


def sarvam_moe_config(**extra) -> transformers.SarvamMoEConfig:
    return transformers.SarvamMoEConfig(**{**MOE, "num_key_value_heads": 2, "head_dim": 16, **extra})


def sarvam_mla_config(**extra) -> transformers.SarvamMLAConfig:
    return transformers.SarvamMLAConfig(**{**MOE, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                                           "v_head_dim": 16, **extra})


#: Sarvam-105B's release config as its remote code wrote it: DeepSeek's yarn under its own name, the expert counts
#: under Sarvam's names, head_dim and q_head_dim written for vLLM.
LEGACY_MLA = dict(num_experts=8, num_shared_experts=1, head_dim=40, q_head_dim=24, rope_scaling={
    "type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
    "mscale": 1.0, "mscale_all_dim": 1.0})
MAKERS = {"sarvam_moe": sarvam_moe_config, "sarvam_mla": sarvam_mla_config}


def _build(folder, config, legacy: dict | None = None):
    """A random checkpoint whose correction biases (zeros at init) are random too; ``legacy``: its config.json then
    rewritten with those release keys in place of transformers' (the model is the same)."""
    hf = build_transformers_model(folder, config)
    with torch.no_grad():
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)
    hf.save_pretrained(folder)
    if legacy is not None:
        raw = json.loads((folder / "config.json").read_text())
        raw = {k: v for k, v in raw.items() if k not in ("n_routed_experts", "n_shared_experts", "rope_parameters")}
        (folder / "config.json").write_text(json.dumps({**raw, **legacy}))
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    return folder, hf


def build_checkpoints(tmp_path_factory) -> dict:
    out = {name: _build(tmp_path_factory.mktemp(name), make()) for name, make in MAKERS.items()}
    out["sarvam_mla_legacy"] = _build(tmp_path_factory.mktemp("legacy"), sarvam_mla_config(), LEGACY_MLA)
    return out


def load(folder, backend="cpu") -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", block_size=4)


def test_reads_sarvam_moe_as_glm4_moe_under_its_names(checkpoints):
    config = load(checkpoints["sarvam_moe"][0]).config
    arch, moe = config.arch, config.arch.moe
    assert arch.fused_qkv and arch.qk_norm == "head" and arch.layers[0].rope.rotary_dim == 16
    assert [spec.mlp for spec in arch.layers] == ["dense", "moe", "moe"]
    assert (moe.routing, moe.bias_name, moe.n_group, moe.routed_scale, moe.shared_expert_size) == (
        "sigmoid_grouped", "gate.expert_bias", 2, 2.5, 24)


@pytest.mark.parametrize("variant", ["sarvam_moe", "sarvam_mla", "sarvam_mla_legacy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(load(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_the_legacy_config_is_yarn(checkpoints):
    """The legacy config's "deepseek_yarn" is run as YaRN, its mscale_all_dim scaling the softmax, as transformers
    reads it; the 13 test tokens pass its original context of 8, so the parity above checks the scaling."""
    config = load(checkpoints["sarvam_mla_legacy"][0]).config
    rope = config.arch.layers[0].rope
    assert (rope.kind, rope.factor, rope.original_max, config.arch.moe.num_experts) == ("yarn", 4.0, 8, 8)
    assert config.arch.attn_scale != pytest.approx(24 ** -0.5)


def test_the_sarvam_moe_bias_is_read_from_its_release_name(checkpoints):
    """transformers saves the router's correction bias as the release names it, ``mlp.gate.expert_bias``."""
    from safetensors import safe_open

    with safe_open(str(checkpoints["sarvam_moe"][0] / "model.safetensors"), framework="numpy") as f:
        assert "model.layers.1.mlp.gate.expert_bias" in f.keys()
        assert "model.layers.1.attention.query_key_value.weight" in f.keys()


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("family", list(MAKERS))
def test_config_defaults_and_aliases_are_transformers(family):
    """The release's names (num_experts, num_shared_experts, use_qkv_bias, num_mtp_layers) are read as transformers
    reads them; the defaults are the families' config classes'."""
    make = MAKERS[family]
    aliases = dict(num_experts=6, num_shared_experts=2, num_mtp_layers=1, **(
        {"use_qkv_bias": True} if family == "sarvam_moe" else {}))
    raw = {k: v for k, v in make().to_dict().items() if k not in (
        "n_routed_experts", "n_shared_experts", "attention_bias", "num_nextn_predict_layers")}
    config, want = ModelConfig.from_dict({**raw, **aliases}), make(**aliases)
    assert (config.arch.moe.num_experts, config.arch.moe.shared_expert_size, config.arch.mtp_layers) == (
        want.n_routed_experts, want.n_shared_experts * 24, want.num_nextn_predict_layers)
    assert config.arch.qkv_bias == want.attention_bias
    bare = {k: v for k, v in raw.items() if k not in (
        "n_group", "topk_group", "num_experts_per_tok", "moe_intermediate_size", "routed_scaling_factor",
        "first_k_dense_replace", "rope_parameters", "head_dim", "q_lora_rank")}
    config, want = ModelConfig.from_dict(bare), type(make())(**bare)
    moe = config.arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.routed_scale, moe.n_group) == (
        want.n_routed_experts, want.num_experts_per_tok, want.moe_intermediate_size, want.routed_scaling_factor,
        want.n_group)
    assert [spec.mlp for spec in config.arch.layers].count("dense") == want.first_k_dense_replace
    assert config.arch.layers[0].rope.theta == want.rope_parameters["rope_theta"]
    if family == "sarvam_moe":
        assert config.head_dim == want.head_dim and config.arch.layers[0].rope.rotary_dim == want.head_dim
    else:
        assert config.arch.mla.q_lora_rank is want.q_lora_rank is None


@pytest.mark.parametrize("family", list(MAKERS))
def test_a_key_and_its_alias_that_disagree_are_refused(family):
    raw = {**MAKERS[family]().to_dict(), "num_experts": 6}
    with pytest.raises(ConfigError, match=re.escape("'num_experts' is 6, but 'n_routed_experts', which it is another "
                                                    "name of, is 8")):
        ModelConfig.from_dict(raw)
