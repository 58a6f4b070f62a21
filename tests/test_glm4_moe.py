"""GLM-4.5 / 4.6 (``glm4_moe``): DeepSeek-V3's grouped sigmoid routing, an ungated shared expert, dense first
layers, partial rope; against transformers' own router and model on every runnable backend.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

import ferrum
import ferrum.moe.reference
import ferrum.moe.routing
from ferrum.backends import load_backend
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from ferrum.hookspec import hookimpl
from ferrum.model import DecoderOnlyLLM
from ferrum.moe.routing import route_grouped
from support import (
    assert_forward_and_decode_match, cpu_like_plugin, grouped_routing_backends, reference_logits, runnable_backends,
    saved_references, scaled_error, with_prediction_layer,
)

BACKENDS = runnable_backends()
NATIVE = grouped_routing_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]


def glm_config(**extra) -> transformers.Glm4MoeConfig:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8,
                    num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                    partial_rotary_factor=0.5, max_position_embeddings=256, attention_bias=True,
                    routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-5)
    return transformers.Glm4MoeConfig(**{**settings, **extra})


#: GLM-4.5's layout; GLM-4.5-Air's without groups, with q/k norms, unnormalized weights and two shared experts.
VARIANTS = {"grouped": {}, "qk_norm": dict(n_group=1, topk_group=1, use_qk_norm=True, attention_bias=False,
                                           norm_topk_prob=False, n_shared_experts=2, num_experts_per_tok=3,
                                           first_k_dense_replace=2, routed_scaling_factor=1.0)}

def build_checkpoints(tmp_path_factory) -> dict:
    """variant -> (folder, transformers model): random weights, random correction biases large enough to change
    which experts the routers choose."""
    return saved_references(tmp_path_factory, VARIANTS, glm_config)


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize("experts, groups, kept, top_k", [(8, 2, 1, 2), (8, 1, 1, 2), (16, 4, 2, 3), (12, 3, 2, 4),
                                                          (64, 8, 4, 8), (256, 8, 4, 8)])
def test_grouped_routing_matches_transformers_router_including_ties(experts, groups, kept, top_k):
    """transformers' router on logits it reads as they are (an identity router weight): random ones, and small
    integers, full of ties between experts and between groups, with biases that are zero, tie, or random."""
    config = glm_config(hidden_size=experts, n_routed_experts=experts, n_group=groups, topk_group=kept,
                        num_experts_per_tok=top_k)
    router = Glm4MoeTopkRouter(config)
    rng = np.random.default_rng(experts + groups)
    logits = rng.integers(-1, 2, size=(300, experts)).astype(np.float32)
    logits[:100] = rng.standard_normal((100, experts))
    logits[100] = 0.0  # every expert ties
    biases = {"zero": np.zeros(experts), "ties": rng.integers(0, 2, experts) * 0.5,
              "random": rng.standard_normal(experts) * 0.1}
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
        for bias in biases.values():
            bias = bias.astype(np.float32)
            router.e_score_correction_bias.copy_(torch.from_numpy(bias))
            for normalize in (True, False):
                router.norm_topk_prob = normalize
                _, want_weights, want_ids = router(torch.from_numpy(logits))
                ids, weights = route_grouped(logits, bias, top_k, groups, kept, normalize, 2.5)
                order, want_order = np.argsort(ids, 1), np.argsort(want_ids.numpy(), 1)
                np.testing.assert_array_equal(np.take_along_axis(ids, order, 1),
                                              np.take_along_axis(want_ids.numpy(), want_order, 1))
                np.testing.assert_allclose(np.take_along_axis(weights, order, 1),
                                           np.take_along_axis(want_weights.numpy(), want_order, 1), rtol=1e-6)


def test_the_correction_bias_chooses_but_does_not_weigh():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], dtype=np.float32)
    ids, weights = route_grouped(logits, np.array([0, 0, 5, 0], np.float32), 2, 1, 1, False, 1.0)
    assert sorted(ids[0].tolist()) == [0, 2]
    np.testing.assert_allclose(np.sort(weights[0]), np.sort(1 / (1 + np.exp(-logits[0, [0, 2]]))), rtol=1e-6)


@pytest.fixture
def host_routing_forbidden(monkeypatch):
    """The core's host reference for grouped layers (the fallback moe_route's) fails the test if called."""
    def routed_on_the_host(*args):
        raise AssertionError("a grouped layer was routed on the host")

    for module in (ferrum.moe.reference, ferrum.moe.routing):
        monkeypatch.setattr(module, "route_grouped", routed_on_the_host)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", NATIVE)
def test_backends_declaring_routing_route_grouped_layers_themselves(checkpoints, backend, variant,
                                                                   host_routing_forbidden):
    """No layer's logits go to the host for routing (the test below shows a fallback would be noticed), and the
    model still matches transformers: two groups with one kept, and GLM-4.5-Air's single group."""
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert model.ops.accepts("moe_route", "routing")
    sparse = [layer.mlp for layer, spec in zip(model.layers, model.config.arch.layers) if spec.mlp == "moe"]
    assert sparse and all(mlp.route is None for mlp in sparse)  # None: the backend's own moe_route
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


@hookimpl
def moe_route_knowing_softmax_only(logits, shared_logit, top_k, normalize):
    raise AssertionError("a moe_route without the routing argument was handed a grouped layer")


def test_a_moe_route_without_the_routing_argument_is_never_handed_it(checkpoints, registered, request):
    """A plugin's own moe_route that knows softmax routing only: grouped layers route through the core's."""
    registered("softmaxonly", cpu_like_plugin("softmaxonly", extra={"moe_route": moe_route_knowing_softmax_only}))
    ops = load_backend("softmaxonly").ops
    assert "moe_route" in ops.native and not ops.accepts("moe_route", "routing")
    folder, hf = checkpoints["grouped"]
    model = DecoderOnlyLLM.from_pretrained(folder, backend="softmaxonly", dtype="float32")
    sparse = [layer.mlp for layer, spec in zip(model.layers, model.config.arch.layers) if spec.mlp == "moe"]
    assert sparse and all(mlp.route == model.ops.fallback["moe_route"] for mlp in sparse)
    assert scaled_error(model.forward_verify("q", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4
    request.getfixturevalue("host_routing_forbidden")  # the test above would notice a fallback
    with pytest.raises(AssertionError, match="routed on the host"):
        model.forward_verify("q", TOKENS)


# ------------------------------------------------------------------ whole models


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    want = reference_logits(hf, TOKENS)
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    dense = VARIANTS[variant].get("first_k_dense_replace", 1)
    assert [spec.mlp for spec in model.config.arch.layers] == ["dense"] * dense + ["moe"] * (3 - dense)
    assert_forward_and_decode_match(model, TOKENS, want)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**glm_config().to_dict(), **changes}


@pytest.mark.parametrize("changes, words", [
    ({"topk_group": 3}, "'topk_group' (3) exceeds the 2 expert groups"),
    ({"n_group": 3}, "'n_group' (3) must divide the 8 routed experts"),
    ({"n_group": 8}, "leaves 1 expert per group"),
    ({"num_experts_per_tok": 5}, "'num_experts_per_tok' (5) exceeds the 4 experts of the 1 group"),
    ({"first_k_dense_replace": None}, "'first_k_dense_replace' must be a non-negative integer"),
    ({"routed_scaling_factor": 0}, "'routed_scaling_factor' must be a positive number"),
    ({"routed_scaling_factor": float("inf")}, "'routed_scaling_factor' must be a positive number"),  # loaded
    ({"n_shared_experts": 0}, "'n_shared_experts' must be a positive integer"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}},
     "'partial_rotary_factor' must be in (0, 1]"),
])
def test_bad_routing_keys_are_refused_by_name(changes, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


def test_glm_4_5_config_reads_as_released():
    """GLM-4.5's config.json (its sizes and keys as zai-org ships them, top-level partial_rotary_factor)."""
    raw = json.loads(json.dumps({
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True,
        "first_k_dense_replace": 3, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
        "intermediate_size": 12288, "max_position_embeddings": 131072, "moe_intermediate_size": 1536,
        "n_group": 1, "n_routed_experts": 160, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 96, "num_experts_per_tok": 8, "num_hidden_layers": 92, "num_key_value_heads": 8,
        "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_theta": 1000000,
        "routed_scaling_factor": 2.5, "tie_word_embeddings": False, "topk_group": 1, "use_qk_norm": True,
        "vocab_size": 151552}))
    arch = ModelConfig.from_dict(raw).arch
    assert [layer.mlp for layer in arch.layers[:4]] == ["dense"] * 3 + ["moe"]
    assert arch.layers[0].rope.rotary_dim == 64 and arch.layers[0].rope.theta == 1e6
    assert not arch.layers[0].rope.interleaved and arch.qk_norm == "head" and arch.qkv_bias and not arch.o_bias
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size) == (160, 8, 1536, 1536)
    assert (moe.routing, moe.n_group, moe.topk_group, moe.routed_scale, moe.normalize) == (
        "sigmoid_grouped", 1, 1, 2.5, True)


def test_a_released_checkpoints_prediction_layer_is_left_out_quietly(checkpoints, tmp_path):
    """GLM-4.5's releases store the multi-token prediction layer after the decoder's
    (``num_nextn_predict_layers``): not run, as transformers does not, and not reported as unread (44 tensors
    were); a layer config.json does not announce still is."""
    import warnings

    folder, model = checkpoints["grouped"]
    with pytest.warns(UserWarning, match=r"model\.layers\.3\.eh_proj\.weight"):
        ferrum.load(with_prediction_layer(folder, tmp_path / "unannounced", 0), backend="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm = ferrum.load(with_prediction_layer(folder, tmp_path / "mtp", 1), backend="cpu")
    assert scaled_error(llm.model.forward_verify("mtp", TOKENS), reference_logits(model, TOKENS)) < 1e-4
