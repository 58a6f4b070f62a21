"""MiniMax-M3's text model (``minimax_m3_vl_text``, and the ``minimax_m3_vl`` wrapper's): Gemma-normed blocks with
per-head q/k norms, rope on half of each head, dense MLPs and experts (sigmoid routing with a correction bias,
renormalized, scaled, beside a shared expert) all running gpt-oss's clamped SwiGLU, and block-sparse attention run
as the dense attention it equals up to index_topk_blocks * index_block_size tokens; against transformers'
MiniMaxM3VLForCausalLM (its text layout) and MiniMaxM3SparseForConditionalGeneration (the release's layout, which
its save writes) on every runnable backend."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, ContextLengthExceededError, UnsupportedFeatureError
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    assert_logits_move, float32_model, mlx_lm_converted, randomized_reference, reference_logits, runnable_backends,
    scaled_error, small_pool_engine, staggered_greedy_workload, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
BLOCK, TOPK = 4, 12  # the indexers keep 12 blocks of 4 keys: dense attention up to 48 tokens


def text_config(**extra) -> dict:
    """Three layers: the first dense (48 wide) and full, the others sparse and indexed; eight experts of 32, three
    a token, a shared expert of 24; rope on 8 of each head's 16 dims; the SwiGLU clamped at 0.5 so that it bites."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, dense_intermediate_size=48,
                    shared_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, rotary_dim=8, partial_rotary_factor=0.5, num_local_experts=8, num_experts_per_tok=3,
                    swiglu_limit=0.5, mlp_layer_types=["dense", "sparse", "sparse"],
                    layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"], index_n_heads=2,
                    index_head_dim=16, index_block_size=BLOCK, index_topk_blocks=TOPK, index_local_blocks=1,
                    max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    return {**settings, **extra}


def _wrapper(**extra) -> transformers.MiniMaxM3VLConfig:
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=2,
                  image_size=8)
    return transformers.MiniMaxM3VLConfig(text_config=text_config(**extra), vision_config=vision,
                                          projector_hidden_size=64)


def build_checkpoints(tmp_path_factory) -> dict:
    """"text": transformers' text model as it saves it (fused experts, shared expert and dense MLP, under mlp);
    "wrapper": the multimodal model, which it saves in the release's layout (language_model.model.*, experts per
    expert under block_sparse_moe, the indexers' index_* modules)."""
    out = {}
    for name, model in (("text", randomized_reference(transformers.MiniMaxM3VLTextConfig(**text_config()))),
                        ("wrapper", randomized_reference(_wrapper(),
                                                         transformers.MiniMaxM3SparseForConditionalGeneration))):
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = folder, model
    return out


def test_reads_the_layers_the_activation_and_the_routing(checkpoints):
    config = float32_model(checkpoints["text"][0]).config
    arch, moe = config.arch, config.arch.moe
    assert [(s.rope.rotary_dim, s.mlp, s.intermediate_size) for s in arch.layers] == [
        (8, "dense", 48), (8, "moe", 48), (8, "moe", 48)]
    assert (arch.norm_offset, arch.qk_norm, arch.activation.limit, arch.indexer.layers) == (
        1.0, "head", 0.5, (False, True, True))
    assert (moe.routing, moe.normalize, moe.routed_scale, moe.shared_expert_size, moe.activation.alpha) == (
        "sigmoid_grouped", True, 2.0, 24, 1.702)
    assert moe.shared_activation == moe.activation  # its shared expert is a MiniMaxM3VLDenseMLP
    assert config.max_seq_len == BLOCK * TOPK  # the indexers' dense range, below max_position_embeddings


@pytest.mark.parametrize("layout", ["text", "wrapper"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(checkpoints, layout, backend):
    folder, hf = checkpoints[layout]
    with torch.no_grad():
        want = hf(torch.tensor([TOKENS])).logits[0].float().numpy()
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_engine_keeps_transformers_greedy_tokens(checkpoints):
    folder, hf = checkpoints["text"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def test_the_clamp_the_partial_rope_and_the_correction_bias_count(checkpoints):
    """Controls: transformers' logits move where the SwiGLU is clamped elsewhere, where rope turns whole heads, or
    where the correction biases are zero, so the parity above checks each."""
    hf = checkpoints["text"][1]
    for extra in (dict(swiglu_limit=7.0), dict(partial_rotary_factor=1.0, rotary_dim=16)):
        changed = transformers.MiniMaxM3VLForCausalLM(transformers.MiniMaxM3VLTextConfig(**text_config(**extra)))
        changed.load_state_dict(hf.state_dict())
        assert_logits_move(changed.float().eval(), hf, TOKENS)
    unbiased = transformers.MiniMaxM3VLForCausalLM(hf.config)
    unbiased.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for layer in unbiased.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
    assert_logits_move(unbiased.float().eval(), hf, TOKENS)


def test_past_the_cap_the_indexer_selects_and_ferrum_refuses(checkpoints):
    """Past index_topk_blocks * index_block_size tokens transformers' indexers drop blocks (its logits leave those of
    the same weights with every block kept), so Ferrum, which runs dense attention, refuses such a context."""
    folder, hf = checkpoints["text"]
    tokens = [int(t) for t in np.random.RandomState(1).randint(0, VOCAB, size=BLOCK * TOPK + 12)]
    dense = transformers.MiniMaxM3VLForCausalLM(transformers.MiniMaxM3VLTextConfig(**text_config(
        index_topk_blocks=64)))
    dense.load_state_dict(hf.state_dict())
    dense = dense.float().eval()
    want, full = reference_logits(hf, tokens), reference_logits(dense, tokens)
    cap = BLOCK * TOPK
    assert scaled_error(want[:cap], full[:cap]) < 1e-5  # exactly dense below the cap
    assert scaled_error(want[cap:], full[cap:]) > 1e-3
    model = float32_model(folder)
    assert scaled_error(model.forward_verify("below", tokens[:cap]), want[:cap]) <= 1e-4
    with pytest.raises(ContextLengthExceededError):
        model.forward_verify("past", tokens)


def _release_config(folder, tmp_path, edit) -> ModelConfig:
    raw = json.loads((folder / "config.json").read_text())
    edit(raw["text_config"])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return ModelConfig.from_file(tmp_path)


def test_reads_the_release_spellings(checkpoints, tmp_path):
    """The release nests the indexers' sizes in sparse_attention_config (with its layers' kinds) and lists the
    sparse MLPs as moe_layer_freq, as transformers reads them."""
    folder = checkpoints["wrapper"][0]

    def nested(text):
        for key in ("index_n_heads", "index_head_dim", "index_block_size", "index_topk_blocks", "index_local_blocks",
                    "layer_types", "mlp_layer_types"):
            text.pop(key)
        text.update(sparse_attention_config=dict(
            sparse_num_index_heads=2, sparse_index_dim=16, sparse_block_size=BLOCK, sparse_topk_blocks=TOPK,
            sparse_local_block=1, sparse_attention_freq=[0, 1, 1], sparse_score_type="max", sparse_init_block=0),
            moe_layer_freq=[0, 1, 1], hidden_act="swigluoai", use_qk_norm=True, use_gemma_norm=True,
            qk_norm_type="per_head", n_shared_experts=1, scoring_func="sigmoid", use_routing_bias=True)

    assert _release_config(folder, tmp_path, nested).arch == ModelConfig.from_file(folder).arch


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.update(rotary_dim=16), "rotary_dim"),  # transformers would rotate 8 dims, MiniMax's code 16
    (lambda t: t["rope_parameters"].pop("partial_rotary_factor"), "rotary_dim"),  # transformers: whole heads
    (lambda t: t.update(use_gemma_norm=False), "use_gemma_norm"),
    (lambda t: t.update(n_shared_experts=2), "n_shared_experts"),
    (lambda t: t.update(layer_types=["full_attention", "sliding_attention", "full_attention"]), "layer_types"),
    # falsy but given: not the default of full layers (they read as no layer_types: no indexers, no cap)
    (lambda t: t.update(layer_types=[]), "layer_types"), (lambda t: t.update(layer_types=0), "layer_types"),
    (lambda t: t.update(layer_types=[["full_attention"]] * 3), "layer_types"),
    (lambda t: t.update(rotary_dim=None), "rotary_dim"),  # transformers refuses null too (it was a TypeError)
])
def test_refuses_what_transformers_runs_otherwise(checkpoints, tmp_path, edit, key):
    with pytest.raises((ConfigError, UnsupportedFeatureError), match=key):
        _release_config(checkpoints["wrapper"][0], tmp_path, edit)


def test_a_model_without_indexed_layers_keeps_its_context(checkpoints, tmp_path):
    shutil.copytree(checkpoints["wrapper"][0], tmp_path / "all_full")
    config = _release_config(tmp_path / "all_full", tmp_path, lambda t: t.update(layer_types=["full_attention"] * 3))
    assert (config.arch.indexer, config.max_seq_len) == (None, 256)


@pytest.mark.slow  # mlx-lm converts (and packs) the checkpoint: ~3 s
@pytest.mark.skipif("mlx" not in runnable_backends(), reason="mlx-lm needs MLX")
@pytest.mark.parametrize("bits, group", [(None, 64), (4, 32), (4, 64)])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(checkpoints, bits, group, tmp_path):
    """mlx-lm's minimax_m3_vl reads the wrapper (the release's layout; it has no text-only model): its conversions,
    float or packed, run on every backend as mlx-lm runs them, the float one as transformers."""
    folder, hf = checkpoints["wrapper"]
    source = tmp_path / "hf"
    shutil.copytree(folder, source)
    write_tokenizer(source)
    _, want = mlx_lm_converted(source, tmp_path / "mlx", TOKENS, bits, group)
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)
