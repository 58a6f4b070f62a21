"""Tencent's Hy4 (``hy_v4``): latent attention with DSA's indexers (run densely up to index_topk, the context capped
there), gpt-oss's sinks, sigmoid-gated heads, hyper-connections (ferrum.arch.hyper) and GLM-4.7-Flash's routing over
SwiGLU experts clamped at swiglu_limit; against transformers' HYV4ForCausalLM in float32."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, assert_logits_move, float32_model,
    reference_logits, runnable_backends, saved_references, scaled_error, small_pool_engine,
    staggered_greedy_workload, with_edited_tensors,
)

BACKENDS = runnable_backends()
TOPK, VOCAB = 48, 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=20)]
LONG = [int(t) for t in np.random.RandomState(1).randint(0, VOCAB, size=TOPK + 8)]


def hy_config(**extra):
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, hc_mult=3,
                    max_position_embeddings=256, index_topk=TOPK, index_head_dim=16, index_n_heads=2,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.HYV4Config(**{**settings, **extra})


#: The release's clamp (10, which these random experts never reach), and one that clamps (0.05); the default
#: indexer kinds make layer 2 share layer 1's selection.
VARIANTS = {"hy_v4": {}, "clamped": dict(swiglu_limit=0.05)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, hy_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    """A full forward and token-by-token decode, against transformers' logits."""
    folder, hf = checkpoints[variant]
    model = float32_model(folder, backend, block_size=4)
    assert model.config.max_seq_len == TOPK
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def _changed(folder, **settings):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **settings).float().eval()


def test_the_parts_count(checkpoints):
    """The controls: transformers' logits move without the streams' mixes (every fn zero: each stream read and
    written alike), with another write magnitude, and without the experts' clamp, so matching them tests each."""
    folder, hf = checkpoints["clamped"]
    unmixed = _changed(folder)
    with torch.no_grad():
        for name, p in unmixed.named_parameters():
            if name.endswith((".fn", "hc_fn")):
                p.zero_()
    assert_logits_move(unmixed, hf, TOKENS)
    assert_logits_move(_changed(folder, hc_magnitude=1.0), hf, TOKENS)
    assert_logits_move(_changed(folder, swiglu_limit=10.0), hf, TOKENS)


def test_the_indexer_selects_past_index_topk(checkpoints):
    """Past index_topk keys transformers' attention is no longer dense, which is why Ferrum caps the context."""
    folder, hf = checkpoints["hy_v4"]
    sparse, full = reference_logits(hf, LONG), reference_logits(_changed(folder, index_topk=len(LONG)), LONG)
    assert scaled_error(sparse[:TOPK], full[:TOPK]) < 1e-5
    assert scaled_error(sparse[TOPK:], full[TOPK:]) > 1e-3


@pytest.mark.slow
def test_the_engine_keeps_transformers_greedy_tokens(checkpoints):
    folder, hf = checkpoints["clamped"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def test_the_release_names_its_mlps_gate_proj(checkpoints, tmp_path):
    """transformers' save_pretrained renames every gate_proj linear_gate (its mapping's reverse); the release's
    MLPs keep gate_proj (only attention's is linear_gate), and load so."""
    folder, hf = checkpoints["hy_v4"]

    def rename(tensors):
        for name in [n for n in tensors if ".mlp." in n and ".linear_gate." in n]:
            tensors[name.replace(".linear_gate.", ".gate_proj.")] = tensors.pop(name)

    release = with_edited_tensors(folder, tmp_path / "release", rename)
    assert_forward_and_decode_match(float32_model(release, block_size=4), TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("changes, words", [
    (dict(v_head_dim=12), "'v_head_dim' (12) differs from a query/key head's 16 dims"),
    (dict(indexer_types=["shared", "full", "full"]), "'indexer_types' makes the first layer 'shared'"),
    (dict(layer_types=["sliding_attention"] * 3), "'layer_types' must list 'indexed_attention'"),
])
def test_unsupported_variants_are_refused_by_name(tmp_path, changes, words):
    raw = {**hy_config().to_dict(), **changes}
    with pytest.raises((ConfigError, UnsupportedFeatureError), match=re.escape(words)):
        ModelConfig.from_dict(raw)


def test_defaults_are_transformers_defaults():
    """A config of nothing but the model type reads as HYV4Config's defaults."""
    hf, config = transformers.HYV4Config(), ModelConfig.from_dict({"model_type": "hy_v4"})
    arch = config.arch
    assert (config.hidden_size, config.num_layers, config.head_dim, config.rms_norm_eps, config.max_seq_len) == (
        hf.hidden_size, hf.num_hidden_layers, hf.qk_head_dim, hf.rms_norm_eps, hf.index_topk)
    assert (arch.hyper.copies, arch.hyper.magnitude, arch.hyper.hc_eps) == (hf.hc_mult, hf.hc_magnitude, hf.hc_eps)
    assert arch.indexer.layers == tuple(kind == "full" for kind in hf.indexer_types)
    assert [layer.mlp == "moe" for layer in arch.layers] == [kind == "sparse" for kind in hf.mlp_layer_types]
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.routed_scale, moe.activation.limit) == (
        hf.n_routed_experts, hf.num_experts_per_tok, hf.moe_intermediate_size, hf.routed_scaling_factor,
        hf.swiglu_limit)
    assert moe.shared_activation is None  # HYV4MLP: plain SwiGLU, the experts' clamp not shared
