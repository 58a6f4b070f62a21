"""FlexOlmo (``flex_olmo``): OLMo 2's blocks (q and k normed over their whole projections, each of attention's and
the MLP's outputs normed before it joins the residual stream) with OLMoE's experts on every layer (softmax top-k,
renormalized where norm_topk_prob says); against transformers' FlexOlmoForCausalLM on every runnable backend.
(mlx-lm 0.32 has no flex_olmo.)
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.model import DecoderOnlyLLM
from support import assert_forward_and_decode_match, reference_logits, runnable_backends, saved_references

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]


def flex_config(**extra) -> transformers.FlexOlmoConfig:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_experts=7, num_experts_per_tok=3, norm_topk_prob=True,
                    max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.FlexOlmoConfig(**{**settings, **extra})


#: GQA, renormalized top-3 weights; and the release's layout: every head its own keys and values, the weights as
#: the softmax gives them (norm_topk_prob false), biased attention, tied embeddings, a yarn rope.
VARIANTS = {"renormalized": {}, "release": dict(num_key_value_heads=4, norm_topk_prob=False, attention_bias=True,
                                                tie_word_embeddings=True, num_experts_per_tok=2,
                                                rope_parameters={"rope_type": "yarn", "rope_theta": 500.0,
                                                                 "factor": 4.0,
                                                                 "original_max_position_embeddings": 64})}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, flex_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch, moe = model.config.arch, model.config.arch.moe
    assert [spec.mlp for spec in arch.layers] == ["moe", "moe"] and arch.qk_norm == "projection"
    assert set(arch.norms) == {"post_attn", "post_mlp"}
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.normalize, moe.routing) == (
        7, 3 if variant == "renormalized" else 2, 48, variant == "renormalized", "softmax")
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_config_is_read_as_transformers_reads_it():
    """num_local_experts is num_experts' alias (it wins where both are given); keys a config leaves out take
    FlexOlmoConfig's defaults: 7 experts, top-5 unnormalized, rope_theta 500000, every head its own keys."""
    raw = {**flex_config().to_dict(), "num_local_experts": 5, "num_experts": 6}
    assert ModelConfig.from_dict(raw).arch.moe.num_experts == transformers.FlexOlmoConfig(**raw).num_experts == 5
    raw = {k: v for k, v in flex_config().to_dict().items() if k not in (
        "num_experts", "num_experts_per_tok", "norm_topk_prob", "rope_parameters", "num_key_value_heads",
        "rms_norm_eps")}
    want, config = transformers.FlexOlmoConfig(**raw), ModelConfig.from_dict(raw)
    moe = config.arch.moe
    assert (moe.num_experts, moe.top_k, moe.normalize) == (want.num_experts, want.num_experts_per_tok,
                                                            want.norm_topk_prob) == (7, 5, False)
    assert config.arch.layers[0].rope.theta == want.rope_parameters["rope_theta"] == 500_000.0
    assert config.num_kv_heads == want.num_key_value_heads == 4 and config.rms_norm_eps == want.rms_norm_eps
