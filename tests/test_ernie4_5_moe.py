"""Baidu's ERNIE 4.5 MoE (``ernie4_5_moe``): the dense ERNIE 4.5's blocks (GPT-J's interleaved rope, use_bias on
every projection and on the LM head) with experts from moe_layer_start_index to moe_layer_end_index every
moe_layer_interval: a float32 router ``gate`` whose softmax probabilities plus ``gate.moe_statics.
e_score_correction_bias`` (float32, ``[1, E]``) choose the top-k, weighed by the uncorrected probabilities
renormalized, unbiased experts and an ungated ``shared_experts`` MLP; against transformers'
Ernie4_5_MoeForCausalLM on every runnable backend, and mlx-lm's ernie4_5_moe (which drops the correction bias).
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, mlx_lm_logits, reference_logits, runnable_backends, saved_references, scaled_error,
    write_tokenizer,
)

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]


def ernie_config(**extra) -> transformers.Ernie4_5_MoeConfig:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, moe_num_experts=6, moe_k=2,
                    moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1,
                    use_bias=True, tie_word_embeddings=False, max_position_embeddings=256, rms_norm_eps=1e-5)
    return transformers.Ernie4_5_MoeConfig(**{**settings, **extra})


#: Biased projections and LM head, two shared experts, sparse layers 1-3; and ERNIE-4.5-21B-A3B's own layout:
#: unbiased, tied, one shared expert, its sparse layers bounded and spaced (here layers 1 and 3 of 0-3).
VARIANTS = {"biased": {}, "release": dict(use_bias=False, tie_word_embeddings=True, moe_num_shared_experts=1,
                                          moe_k=3, moe_layer_end_index=3, moe_layer_interval=2)}
SPARSE = {"biased": ["dense", "moe", "moe", "moe"], "release": ["dense", "moe", "dense", "moe"]}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, ernie_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    moe = model.config.arch.moe
    assert [spec.mlp for spec in model.config.arch.layers] == SPARSE[variant]
    assert (moe.top_k, moe.expert_size, moe.shared_expert_size, moe.routing) == (
        3 if variant == "release" else 2, 32, 32 if variant == "release" else 64, "softmax_corrected")
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**ernie_config().to_dict(), **changes}


def test_aliases_are_read_as_transformers_reads_them():
    """transformers maps num_experts_per_tok onto moe_k and num_experts onto moe_num_experts: the alias wins where
    a config gives both."""
    raw = _raw(num_experts_per_tok=3, num_experts=5)
    want = transformers.Ernie4_5_MoeConfig(**raw)
    moe = ModelConfig.from_dict(raw).arch.moe
    assert (moe.top_k, moe.num_experts) == (want.moe_k, want.moe_num_experts) == (3, 5)


def test_sparse_layers_follow_transformers_rule():
    def kinds(**changes):
        raw = _raw(num_hidden_layers=6, **{"moe_layer_end_index": -1, **changes})
        return [layer.mlp for layer in ModelConfig.from_dict(raw).arch.layers]

    assert kinds() == ["dense"] + ["moe"] * 5
    assert kinds(moe_layer_start_index=0, moe_layer_end_index=3, moe_layer_interval=2) == [
        "dense", "moe", "dense", "moe", "dense", "dense"]
    assert kinds(moe_layer_end_index=4) == ["dense"] + ["moe"] * 4 + ["dense"]
    for changes in ({}, dict(moe_layer_start_index=0, moe_layer_end_index=3, moe_layer_interval=2)):
        want = transformers.Ernie4_5_MoeForCausalLM(ernie_config(num_hidden_layers=6, **changes)).model.layers
        assert kinds(**changes) == ["moe" if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts") else "dense"
                                    for layer in want]
    assert ModelConfig.from_dict(_raw(moe_num_shared_experts=0)).arch.moe.shared_expert_size is None


@pytest.mark.parametrize("changes, error, words", [
    ({"moe_k": 7}, ConfigError, "'num_experts_per_tok' (7) exceeds the 6 experts"),
    ({"moe_layer_start_index": [1, 2]}, ConfigError, "'moe_layer_start_index' must be a layer index"),
    ({"moe_gate_act": "sigmoid"}, UnsupportedFeatureError, "transformers routes ERNIE 4.5 by softmax"),
    ({"moe_norm_min": 0.01}, UnsupportedFeatureError, "'moe_norm_min' (0.01) would clamp the chosen experts'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


def test_transformers_defaults_are_read():
    """Keys a config leaves out take Ernie4_5_MoeConfig's defaults: 64 experts routed top-6, two shared, experts of
    1536, every layer from the second sparse, heads of hidden_size / num_attention_heads, a tied unbiased head."""
    left_out = ("moe_num_experts", "moe_k", "moe_num_shared_experts", "moe_intermediate_size",
                "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "use_bias",
                "tie_word_embeddings", "rope_parameters")
    config = ModelConfig.from_dict({k: v for k, v in _raw().items() if k not in left_out})
    moe, arch = config.arch.moe, config.arch
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size) == (64, 6, 1536, 2 * 1536)
    assert [layer.mlp for layer in arch.layers] == ["dense", "moe", "moe", "moe"]
    assert config.head_dim == 16 and config.tie_word_embeddings and not arch.lm_head_bias
    assert arch.layers[0].rope.theta == 500_000.0 and arch.layers[0].rope.interleaved


# ------------------------------------------------------------------ mlx-lm

needs_mlx = pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")


def _as_mlx_lm_reads_it(folder, destination):
    """The release checkpoint with the transformers-4 rope key mlx-lm reads, and a tokenizer for its
    conversion."""
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (destination / "config.json").write_text(json.dumps(config))
    write_tokenizer(destination)
    return destination


@needs_mlx
@pytest.mark.parametrize("quantize", [False, True])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them_and_say_so(checkpoints, tmp_path, quantize):
    """mlx-lm's sanitize drops the correction bias (mlx-lm routes ERNIE by the plain softmax): its conversions (every
    mlx-community ERNIE 4.5 MoE) load with the biases read as zeros, a warning saying so, and give mlx-lm's logits
    on every backend."""
    from mlx_lm.convert import convert

    source = _as_mlx_lm_reads_it(checkpoints["release"][0], tmp_path / "hf")
    convert(str(source), str(tmp_path / "mlx"), quantize=quantize, q_group_size=32, dtype="float32")
    want = mlx_lm_logits(tmp_path / "mlx", TOKENS)
    for backend in BACKENDS:
        with pytest.warns(UserWarning, match=r"correction bias\(es\) \(e.g. model.layers.1.mlp.moe_statics."
                          r"e_score_correction_bias\) are not in the checkpoint, as some ernie4_5_moe checkpoints "
                          r"leave them out \(mlx-lm's ERNIE 4.5 conversions\)"):
            model = DecoderOnlyLLM.from_pretrained(tmp_path / "mlx", backend=backend, dtype="float32")
        assert scaled_error(model.forward_verify("m", TOKENS), want) <= 1e-4, backend


def test_a_checkpoint_missing_only_some_correction_biases_is_refused(checkpoints, tmp_path):
    """All the biases left out is mlx-lm's conversion; only some is a damaged checkpoint (a lost shard), refused
    naming what is missing rather than run with those layers unbiased."""
    from safetensors.numpy import load_file, save_file

    from ferrum.errors import MissingTensorError

    folder = shutil.copytree(checkpoints["release"][0], tmp_path / "damaged")
    tensors = load_file(str(folder / "model.safetensors"))
    lost = next(name for name in tensors if name.endswith("moe_statics.e_score_correction_bias"))
    save_file({k: v for k, v in tensors.items() if k != lost}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(MissingTensorError, match=re.escape(lost)):
        DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32")


@needs_mlx
def test_mlx_backend_matches_mlx_lm_without_the_bias(checkpoints, tmp_path):
    """With zero correction biases (where mlx-lm's plain softmax routing is transformers'), Ferrum's MLX backend
    gives mlx-lm's logits: the same rope, norms and experts."""
    from safetensors.numpy import load_file, save_file

    folder = _as_mlx_lm_reads_it(checkpoints["release"][0], tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    for name in tensors:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = np.zeros_like(tensors[name])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    got = DecoderOnlyLLM.from_pretrained(folder, backend="mlx", dtype="float32").forward_verify("m", TOKENS)
    assert scaled_error(got, mlx_lm_logits(folder, TOKENS)) <= 1e-4


def test_the_releases_prediction_heads_are_left_out_quietly(checkpoints, tmp_path):
    """ERNIE 4.5 MoE's releases store multi-token prediction heads (mtp_block.*, mtp_emb_norm.*, ...), which
    transformers does not load: not run, not reported unread."""
    from support import assert_stray_tensors_quiet_only_where_transformers_skips_them

    folder, hf = checkpoints["release"]
    skipped = ["model.mtp_block.0.mlp.up_proj.weight", "model.mtp_emb_norm.0.weight", "model.mtp_hidden_norm.0.weight",
               "model.mtp_linear_proj.0.weight"]
    assert_stray_tensors_quiet_only_where_transformers_skips_them(folder, tmp_path, skipped, hf, TOKENS)
