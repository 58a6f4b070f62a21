"""SK Telecom's A.X-K1 (``axk1``): DeepSeek-V3 with each sparse MLP's output RMS-normed (``post_mlp_layernorm``)
before it joins the residual stream; against transformers' own model on every runnable backend."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, reference_logits, runnable_backends, saved_references, scaled_error,
    with_edited_tensors,
)

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=11)]


def axk1_config(**extra) -> transformers.AXK1Config:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                    num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, max_position_embeddings=256,
                    bos_token_id=0, eos_token_id=1)
    return transformers.AXK1Config(**{**settings, **extra})


#: The release's layout (first_k_dense_replace 1: the first layer dense); a dense layer between sparse ones by
#: moe_layer_freq, rotate-half rope.
VARIANTS = {"release": {}, "freq": dict(first_k_dense_replace=0, moe_layer_freq=2, rope_interleave=False)}
DENSE = {"release": [0], "freq": [1]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_references(tmp_path_factory, VARIANTS, axk1_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert [i for i, spec in enumerate(model.config.arch.layers) if spec.mlp == "dense"] == DENSE[variant]
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_is_sensitive_to_the_post_moe_norm(checkpoints):
    """The control: transformers' logits move where the sparse MLPs' output norm's weights do."""
    _, hf = checkpoints["release"]
    want = reference_logits(hf, TOKENS)
    with torch.no_grad():
        hf.model.layers[1].mlp.post_mlp_layernorm.weight.mul_(1.5)
        moved = reference_logits(hf, TOKENS)
        hf.model.layers[1].mlp.post_mlp_layernorm.weight.div_(1.5)
    assert scaled_error(moved, want) > 1e-3


def test_release_layouts_load_as_transformers_loads_them(checkpoints, tmp_path):
    """The releases store the norm on the dense layers too (transformers skips it): quiet; and they may route without
    correction biases, which transformers then reads as zeros: said, and run so."""
    folder, hf = checkpoints["release"]
    stored = with_edited_tensors(folder, tmp_path / "stored", lambda t: t.update({
        "model.layers.0.post_mlp_layernorm.weight": np.ones(64, np.float32)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = DecoderOnlyLLM.from_pretrained(stored, backend="cpu", dtype="float32")
    assert scaled_error(model.forward_verify("s", TOKENS), reference_logits(hf, TOKENS)) < 1e-4
    unbiased = with_edited_tensors(folder, tmp_path / "unbiased", lambda t: [
        t.pop(name) for name in list(t) if name.endswith("e_score_correction_bias")])
    with pytest.warns(UserWarning, match="correction bias"):
        model = DecoderOnlyLLM.from_pretrained(unbiased, backend="cpu", dtype="float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(unbiased).float().eval()
    assert not reference.model.layers[1].mlp.gate.e_score_correction_bias.any()
    want = reference_logits(reference, TOKENS)
    assert scaled_error(want, reference_logits(hf, TOKENS)) > 1e-3  # the biases chose other experts
    assert scaled_error(model.forward_verify("u", TOKENS), want) < 1e-4


#: A.X-K1's release config.json (its remote code's keys, model_type "AXK1"), as transformers' AXK1Config reads it.
RELEASE = {
    "architectures": ["AXK1ForCausalLM"], "model_type": "AXK1", "attention_bias": False, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 131072, "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 192, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 64, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 163840}


def test_release_config_reads_as_transformers_reads_it():
    config = ModelConfig.from_dict(dict(RELEASE))
    hf = transformers.AXK1Config(**{k: v for k, v in RELEASE.items() if k != "model_type"})
    arch = config.arch
    assert [layer.mlp == "moe" for layer in arch.layers] == [kind == "sparse" for kind in hf.mlp_layer_types]
    assert arch.layers[1].block_norms(arch)["post_mlp"] == "post_mlp_layernorm"
    assert "post_mlp" not in arch.layers[0].block_norms(arch) and arch.mtp_layers == 1
    assert re.search(arch.unloaded, "model.layers.0.post_mlp_layernorm.weight")
    assert not re.search(arch.unloaded, "model.layers.1.post_mlp_layernorm.weight")
    moe = arch.moe
    assert (moe.num_experts, moe.n_group, moe.topk_group, moe.routed_scale, moe.routing) == (
        192, 8, 4, 2.5, "sigmoid_grouped")
    assert arch.layers[0].rope.interleaved and config.max_seq_len == 131072


@pytest.mark.parametrize("changes, words", [
    ({"q_lora_rank": None}, "'q_lora_rank' must be a positive integer"),
    ({"mlp_layer_types": ["dense", "dense", "sparse"], "first_k_dense_replace": 1},
     "'first_k_dense_replace' is 1, but mlp_layer_types makes layers [0, 1] dense"),
])
def test_bad_keys_are_refused_by_name(changes, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        ModelConfig.from_dict({**axk1_config().to_dict(), **changes})
