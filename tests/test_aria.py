"""Rhymes' Aria (``aria_text``, and the text model of its ``aria`` wrapper): Llama's blocks over a sparse MLP on every
layer, its router's top-k logits softmaxed (the renormalized top-k probabilities) weighing SwiGLU experts stored fused
inputs first (``experts.fc1.weight``, ``experts.fc2.weight``), beside shared experts of moe_num_shared_experts times
their width; against transformers' AriaTextForCausalLM on every runnable backend. The checks every MoE family makes
alike are tests/test_moe_families.py's."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import transformers
from transformers.models.aria.modeling_aria import AriaTextTopKRouter

from ferrum.config import ModelConfig
from ferrum.errors import CheckpointError, ConfigError, UnsupportedFeatureError
from ferrum.moe.routing import route
from support import (
    assert_forward_and_decode_match, assert_logits_move, build_transformers_model, float32_model, reference_logits,
    runnable_backends, saved_references, scaled_error, with_edited_tensors,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=11)]


def aria_config(**extra) -> transformers.AriaTextConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, moe_num_experts=6, moe_topk=2, moe_num_shared_experts=2,
                    max_position_embeddings=256, pad_token_id=None)  # which transformers' generate would mask
    return transformers.AriaTextConfig(**{**settings, **extra})


#: The release's layout (two shared experts, no biases, untied; the experts' fused gate and up as wide as the hidden
#: size, which only the layout's one orientation tells apart), and one with every bias, one shared expert, a tied head.
VARIANTS = {"release": {}, "biased": dict(attention_bias=True, mlp_bias=True, moe_num_shared_experts=1, moe_topk=3,
                                          intermediate_size=24, tie_word_embeddings=True)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, aria_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = float32_model(folder, backend, block_size=4)
    moe = model.config.arch.moe
    assert {spec.mlp for spec in model.config.arch.layers} == {"moe"}
    assert (moe.normalize, moe.routing, moe.router_float32) == (True, "softmax", False)
    assert moe.shared_expert_size == {"release": 64, "biased": 24}[variant]
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_checks_the_shared_experts_and_the_experts_orientation(checkpoints, tmp_path):
    """Zeroing the shared experts moves transformers' logits; so does reading the fused stacks outputs first (each
    expert's matrix transposed, which the release's square fc1 would allow)."""
    folder, hf = checkpoints["release"]
    unshared = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in unshared.model.layers:
            layer.mlp.shared_experts.down_proj.weight.zero_()
    assert_logits_move(unshared, hf, TOKENS)
    transposed = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in transposed.model.layers:
            fused = layer.mlp.experts.gate_up_proj
            fused.copy_(fused.transpose(1, 2).clone())
    assert_logits_move(transposed, hf, TOKENS)


def test_the_routing_rule_is_transformers_router():
    """transformers' router softmaxes the top-k logits: Ferrum's softmax rule renormalized picks the same experts with
    the same weights; unrenormalized (Mixtral's rule with norm off) the weights differ."""
    torch.manual_seed(0)
    router = AriaTextTopKRouter(aria_config(hidden_size=32, moe_num_experts=8, moe_topk=3)).eval()
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        logits, weights, ids = router(torch.randn(40, 32, generator=torch.Generator().manual_seed(1)))
    got_ids, got = route(logits.numpy(), 3, True)
    np.testing.assert_array_equal(got_ids, ids.numpy())
    np.testing.assert_allclose(got, weights.numpy(), rtol=1e-6)
    assert not np.allclose(route(logits.numpy(), 3, False)[1], weights.numpy(), rtol=1e-2)


def test_the_wrapper_runs_its_text_model(tmp_path):
    """``aria`` as transformers saves AriaForConditionalGeneration (Aria's release layout): the text model under
    ``language_model.model``, its head ``language_model.lm_head``, the vision tower and projector beside them, unread
    (no warning)."""
    config = transformers.AriaConfig(
        text_config=aria_config().to_dict(), projector_patch_to_query_dict={1225: 4, 4900: 8},
        vision_config=dict(model_type="idefics3_vision", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=2))
    hf = build_transformers_model(tmp_path, config, model_class=transformers.AriaForConditionalGeneration)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = float32_model(tmp_path)
    assert model.config.model_type == "aria_text" and model.config.arch.prefix == "language_model.model."
    assert scaled_error(model.forward_verify("v", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


def test_a_stack_stored_outputs_first_is_refused(checkpoints, tmp_path):
    """Aria's stacks are only ever stored inputs first: one of the other orientation (here the down stack, which the
    shapes tell apart) is refused by name, not read transposed."""
    folder, _ = checkpoints["biased"]

    def edit(tensors: dict) -> None:
        name = "model.layers.0.mlp.experts.fc2.weight"
        tensors[name] = np.ascontiguousarray(tensors[name].transpose(0, 2, 1))

    with pytest.raises(CheckpointError, match=r"experts\.fc2\.weight has shape \(6, 64, 24\).*\(6, 24, 64\) "
                                              r"\(inputs first\)"):
        float32_model(with_edited_tensors(folder, tmp_path / "flipped", edit))


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**aria_config().to_dict(), **changes}


def test_transformers_defaults_are_read():
    """Keys a config leaves out take AriaTextConfig's defaults: 8 experts routed top-2, two shared experts."""
    left_out = ("moe_num_experts", "moe_topk", "moe_num_shared_experts")
    moe = ModelConfig.from_dict({k: v for k, v in _raw().items() if k not in left_out}).arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size) == (8, 2, 32, 64)
    assert ModelConfig.from_dict(_raw(moe_num_shared_experts=0)).arch.moe.shared_expert_size is None


@pytest.mark.parametrize("changes, error, words", [
    ({"moe_topk": 7}, ConfigError, "'moe_topk' (7) exceeds the 6 experts"),
    ({"moe_intermediate_size": 48}, UnsupportedFeatureError, "'moe_intermediate_size' is 48, but transformers sizes"),
    ({"hidden_act": "gelu"}, UnsupportedFeatureError, "'hidden_act'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


def test_the_remote_codes_expert_width_is_read_where_it_agrees():
    assert ModelConfig.from_dict(_raw(moe_intermediate_size=32)).arch.moe.expert_size == 32
