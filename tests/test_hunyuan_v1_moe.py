"""Tencent's Hunyuan-A13B (``hunyuan_v1_moe``): the dense Hunyuan's blocks (q/k normed once rotated, rope "dynamic"
with a fixed alpha) with experts on every layer: a float32 router ``gate.wg``, softmax top-k weights renormalized,
and an ungated ``shared_mlp``; against transformers' HunYuanMoEV1ForCausalLM on every runnable backend. (mlx-lm
0.32 has no hunyuan_v1_moe; its ``hunyuan`` does not renormalize the weights.)
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.backends import load_backend
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, assert_router_computes_in_float32, reference_logits, runnable_backends,
    saved_references,
)

BACKENDS = runnable_backends()
BFLOAT16 = [b for b in BACKENDS if "bfloat16" in load_backend(b).info.dtypes]
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
ALPHA_ROPE = {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}
#: The keys of Tencent's own code that Hunyuan-A13B's config.json carries, valued as transformers runs them.
RELEASE_KEYS = dict(moe_intermediate_size=[48, 48], num_shared_expert=[1, 1], use_mixed_mlp_moe=True,
                    use_qk_norm=True, use_cla=False, cla_share_factor=2)


def hunyuan_config(**extra) -> transformers.HunYuanMoEV1Config:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=24, num_experts=6, moe_topk=2, attention_bias=True,
                    rope_parameters=ALPHA_ROPE, max_position_embeddings=256, rms_norm_eps=1e-5)
    return transformers.HunYuanMoEV1Config(**{**settings, **extra})


#: Biased attention, the alpha rope; and Hunyuan-A13B's own layout: per-layer lists, its release keys, plain rope,
#: tied embeddings.
VARIANTS = {"alpha": {}, "release": dict(moe_topk=[3, 3], attention_bias=False, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                         **RELEASE_KEYS)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, hunyuan_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    moe = model.config.arch.moe
    assert [spec.mlp for spec in model.config.arch.layers] == ["moe", "moe"]
    assert (moe.top_k, moe.expert_size, moe.shared_expert_size, moe.normalize) == (
        3 if variant == "release" else 2, 48, 48, True)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("backend", BFLOAT16)
def test_routers_compute_in_float32_in_bfloat16(checkpoints, backend):
    """transformers builds Hunyuan's router (``gate.wg``) in float32, keeps it so in a bfloat16 model and casts the
    router's input up: so does Ferrum."""
    folder, hf = checkpoints["alpha"]
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert bf16.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="bfloat16")
    mlp, ops = model.layers[0].mlp, model.ops
    weight = hf.model.layers[0].mlp.gate.wg.weight.detach().numpy()
    assert_router_computes_in_float32(mlp, ops, weight)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**hunyuan_config().to_dict(), **RELEASE_KEYS, **changes}


def test_aliases_are_read_as_transformers_reads_them():
    """transformers maps num_experts_per_tok onto moe_topk and num_local_experts onto num_experts; the alias wins
    where a config gives both."""
    raw = _raw(num_experts_per_tok=3, num_local_experts=5)
    want = transformers.HunYuanMoEV1Config(**raw)
    moe = ModelConfig.from_dict(raw).arch.moe
    assert (moe.top_k, moe.num_experts) == (want.moe_topk, want.num_experts) == (3, 5)


@pytest.mark.parametrize("changes, error, words", [
    ({"moe_topk": [2, 3]}, UnsupportedFeatureError, "'moe_topk' is [2, 3], a different value per layer"),
    ({"moe_topk": [2, 2, 2]}, ConfigError, "'moe_topk' lists 3 values, but the model has 2 layers"),
    ({"moe_topk": 7}, ConfigError, "'num_experts_per_tok' (7) exceeds the 6 experts"),
    ({"num_experts": [6, 6]}, ConfigError, "'num_experts' must be a positive integer"),
    ({"moe_intermediate_size": [32, 32]}, UnsupportedFeatureError,
     "'moe_intermediate_size' is [32, 32], but transformers sizes Hunyuan's experts by intermediate_size (48)"),
    ({"num_shared_expert": 2}, UnsupportedFeatureError, "'num_shared_expert' is 2, but transformers runs one"),
    ({"use_mixed_mlp_moe": False}, UnsupportedFeatureError, "always adds the shared MLP"),
    ({"use_qk_norm": False}, UnsupportedFeatureError, "'use_qk_norm' is False, but transformers norms q and k"),
    ({"use_cla": True}, UnsupportedFeatureError, "cross-layer attention"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


def test_transformers_defaults_are_read():
    """Keys a config leaves out take HunYuanMoEV1Config's defaults: one expert, routed top-1, its shared MLP."""
    raw = {k: v for k, v in hunyuan_config().to_dict().items() if k not in ("num_experts", "moe_topk")}
    moe = ModelConfig.from_dict(raw).arch.moe
    assert (moe.num_experts, moe.top_k, moe.shared_module, moe.shared_gate, moe.router) == (
        1, 1, "shared_mlp", None, "gate.wg")
