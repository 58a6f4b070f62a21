"""DeepSeek-V2 (``deepseek_v2``: V2, V2-Lite, V2.5, Coder-V2): DeepSeek-V3's Multi-head Latent Attention with rope in
transformers' complex (adjacent-pair) form, over softmax routing, "greedy" or "group_limited_greedy" (a group scored
by its best expert), scaled by routed_scaling_factor; against transformers' own model and router on every runnable
backend.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

from ferrum.backends import BackendInfo
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from ferrum.moe.kind import routes_natively
from ferrum.moe.routing import GROUP_LIMITED_GREEDY, NOAUX_TC, GroupRule, route_grouped
from support import (
    assert_forward_and_decode_match, reference_logits, runnable_backends, saved_references, scaled_error,
)

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}


def dsv2_config(**extra) -> transformers.DeepseekV2Config:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                    num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, max_position_embeddings=256,
                    topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,
                    rms_norm_eps=1e-6)
    return transformers.DeepseekV2Config(**{**settings, **extra})


#: DeepSeek-V2's and V2.5's layout (low-rank q, groups limited, weights scaled); V2-Lite's and Coder-V2-Lite's
#: (a plain q_proj, greedy over every expert, unscaled, YaRN with mscale_all_dim); greedy scaled, with biases and
#: value heads as wide as q/k heads.
VARIANTS = {
    "limited": {},
    "lite": dict(q_lora_rank=None, topk_method="greedy", n_group=None, topk_group=None, routed_scaling_factor=1.0,
                 num_experts_per_tok=2, rope_parameters=YARN),
    "greedy_scaled": dict(topk_method="greedy", routed_scaling_factor=2.5, attention_bias=True, v_head_dim=24,
                          first_k_dense_replace=2),
}


def build_checkpoints(tmp_path_factory) -> dict:
    """variant -> (folder, transformers model), random weights."""
    return saved_references(tmp_path_factory, VARIANTS, dsv2_config)


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize("method, experts, groups, kept, top_k", [
    ("group_limited_greedy", 8, 4, 2, 3), ("group_limited_greedy", 16, 8, 3, 6), ("group_limited_greedy", 6, 3, 1, 2),
    ("greedy", 8, 1, 1, 3), ("greedy", 6, 2, 1, 4),
])
def test_routing_matches_transformers_router(method, experts, groups, kept, top_k):
    """route_grouped under DeepSeek-V2's rule against ``DeepseekV2TopkRouter`` on random logits and small integers
    full of ties between experts and between groups; "greedy" is the rule with one group whatever n_group says."""
    config = dsv2_config(hidden_size=experts, num_attention_heads=experts // 2, num_key_value_heads=experts // 2,
                         n_routed_experts=experts, n_group=groups, topk_group=kept, num_experts_per_tok=top_k,
                         topk_method=method, routed_scaling_factor=16.0)
    router = DeepseekV2TopkRouter(config)
    rng = np.random.default_rng(experts + groups)
    logits = rng.integers(-1, 2, size=(300, experts)).astype(np.float32)
    logits[:100] = rng.standard_normal((100, experts))
    logits[100] = 0.0  # every expert ties
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
        _, want_weights, want_ids = router(torch.from_numpy(logits))
    n_group, topk_group = (groups, kept) if method == "group_limited_greedy" else (1, 1)
    ids, weights = route_grouped(logits, None, top_k, n_group, topk_group, False, 16.0, GROUP_LIMITED_GREEDY)
    order, want_order = np.argsort(ids, 1), np.argsort(want_ids.numpy(), 1)
    np.testing.assert_array_equal(np.take_along_axis(ids, order, 1),
                                  np.take_along_axis(want_ids.numpy(), want_order, 1))
    np.testing.assert_allclose(np.take_along_axis(weights, order, 1),
                               np.take_along_axis(want_weights.numpy(), want_order, 1), rtol=1e-6)


def test_a_group_is_scored_by_its_best_expert():
    """Group 0 holds the best expert, group 1 the better pair: V2 keeps group 0, V3's two-best sum group 1."""
    logits = np.log(np.array([[0.40, 0.02, 0.30, 0.28]], np.float32))  # softmax: these probabilities
    ids, weights = route_grouped(logits, None, 1, 2, 1, False, 2.0, GROUP_LIMITED_GREEDY)
    assert ids.tolist() == [[0]]
    np.testing.assert_allclose(weights, [[0.8]], rtol=1e-5)
    top2 = GroupRule("softmax", "top2_sum", corrected=False, masked=0.0)
    assert route_grouped(logits, None, 1, 2, 1, False, 2.0, top2)[0].tolist() == [[2]]


def test_a_plugin_declaring_api_1_12_is_not_handed_deepseek_v2s_rule():
    """1.12's ``routing`` always meant DeepSeek-V3's rule: a plugin written for it would run V2's as V3's."""
    for version, native in (("1.12", False), ("1.13", True)):
        info = BackendInfo("p", "cpu", ("float32",), "float32", api_version=version)
        ops = SimpleNamespace(info=info, accepts=lambda op, arg: (op, arg) == ("moe_route", "routing"))
        assert routes_natively(ops, NOAUX_TC)
        assert routes_natively(ops, GROUP_LIMITED_GREEDY) == native


# ------------------------------------------------------------------ whole models


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    """A full forward and token-by-token decode, against transformers' logits."""
    folder, hf = checkpoints[variant]
    want = reference_logits(hf, TOKENS)
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    dense = VARIANTS[variant].get("first_k_dense_replace", 1)
    assert [spec.mlp for spec in model.config.arch.layers] == ["dense"] * dense + ["moe"] * (3 - dense)
    assert (model.config.head_dim, model.config.num_kv_heads) == (24, 4)
    assert_forward_and_decode_match(model, TOKENS, want)


def test_the_parity_is_sensitive_to_each_routing_setting(checkpoints):
    """The checkpoints' routers decide differently under the other topk_method, and their weights are scaled: each
    change moves transformers' logits here. V2-Lite's greedy, unscaled rule is the plain softmax rule."""
    folder, hf = checkpoints["limited"]
    want = reference_logits(hf, TOKENS)
    for changes in ({"topk_method": "greedy"}, {"routed_scaling_factor": 1.0}):
        other = transformers.AutoModelForCausalLM.from_pretrained(folder, **changes).float().eval()
        assert scaled_error(reference_logits(other, TOKENS), want) > 1e-3, changes
    routings = {v: ModelConfig.from_file(checkpoints[v][0]).arch.moe for v in VARIANTS}
    assert [(m.routing, m.n_group, m.topk_group, m.routed_scale, m.normalize) for m in routings.values()] == [
        ("softmax_grouped", 4, 2, 16.0, False), ("softmax", 1, 1, 1.0, False), ("softmax_grouped", 1, 1, 2.5, False)]


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**dsv2_config().to_dict(), **changes}


@pytest.mark.parametrize("changes, error, words", [
    ({"norm_topk_prob": True}, UnsupportedFeatureError, "'norm_topk_prob' is True, which Ferrum does not support"),
    ({"topk_method": "noaux_tc"}, UnsupportedFeatureError, "'topk_method' is 'noaux_tc'; Ferrum supports"),
    ({"scoring_func": "sigmoid"}, UnsupportedFeatureError, "'scoring_func' is 'sigmoid'; Ferrum supports 'softmax'"),
    ({"moe_layer_freq": 2}, UnsupportedFeatureError, "'moe_layer_freq' is 2; Ferrum supports 1"),
    ({"mlp_bias": True}, UnsupportedFeatureError, "'mlp_bias' is True"),
    ({"n_group": None}, ConfigError, "'n_group' must be set with topk_method 'group_limited_greedy'"),
    ({"n_group": 3}, ConfigError, "'n_group' (3) must divide the 8 routed experts"),
    ({"topk_group": 5}, ConfigError, "'topk_group' (5) exceeds the 4 expert groups"),
    ({"num_experts_per_tok": 5}, ConfigError, "'num_experts_per_tok' (5) exceeds the 4 experts of the 2 group"),
    ({"num_experts_per_tok": None}, ConfigError, "'num_experts_per_tok' must be a positive integer, got None"),
    ({"num_key_value_heads": 2}, ConfigError, "'num_key_value_heads' is 2, but latent attention expands"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


def test_greedy_ignores_the_groups():
    """transformers' "greedy" never reads n_group or topk_group (V2-Lite's are 1, others' may be null)."""
    moe = ModelConfig.from_dict(_raw(topk_method="greedy", n_group=3, topk_group=None)).arch.moe
    assert (moe.n_group, moe.topk_group, moe.routing) == (1, 1, "softmax_grouped")


DEEPSEEK_V2_LITE = {  # DeepSeek-V2-Lite's config.json as deepseek-ai ships it (auto_map left out)
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1,
    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}


def test_deepseek_v2_lite_and_v2_configs_read_as_released():
    """V2-Lite: a plain q_proj, greedy, the plain softmax rule; V2 (and V2.5): low-rank q, 160 experts in 8 groups,
    3 kept, weights times 16."""
    lite = ModelConfig.from_dict(json.loads(json.dumps(DEEPSEEK_V2_LITE)))
    assert (lite.head_dim, lite.num_heads, lite.num_kv_heads) == (192, 16, 16)
    assert [layer.mlp for layer in lite.arch.layers[:2]] == ["dense", "moe"]
    rope = lite.arch.layers[0].rope
    assert (rope.kind, rope.rotary_dim, rope.factor, rope.interleaved) == ("yarn", 64, 40, True)
    assert rope.attention_factor == pytest.approx(1.0)
    assert lite.arch.attn_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * np.log(40) + 1) ** 2)
    assert lite.arch.mla.q_lora_rank is None
    moe = lite.arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size, moe.routing) == (
        64, 6, 1408, 2816, "softmax")
    v2 = ModelConfig.from_dict({**DEEPSEEK_V2_LITE, "hidden_size": 5120, "intermediate_size": 12288,
                                "moe_intermediate_size": 1536, "num_attention_heads": 128, "num_key_value_heads": 128,
                                "num_hidden_layers": 60, "q_lora_rank": 1536, "n_routed_experts": 160, "n_group": 8,
                                "topk_group": 3, "topk_method": "group_limited_greedy",
                                "routed_scaling_factor": 16.0})
    moe = v2.arch.moe
    assert (moe.num_experts, moe.n_group, moe.topk_group, moe.routed_scale, moe.routing, moe.normalize) == (
        160, 8, 3, 16.0, "softmax_grouped", False)
    assert v2.arch.mla.q_lora_rank == 1536
