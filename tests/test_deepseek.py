"""DeepSeek-MoE 16B (v1, ``deepseek``; no transformers class, its release ships remote code): Llama's blocks, every
attention projection biased by attention_bias, over softmax routing whose top-k probabilities weigh the experts as they
are, shared experts beside them, the first first_k_dense_replace layers (and those off moe_layer_freq) dense; against
mlx-lm's deepseek in float32 on every runnable backend (and the JAX plugin), the release's names and mlx-lm's
conversions, plain and packed."""

from __future__ import annotations

import re
import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, MissingTensorError, UnsupportedFeatureError
from mlx_lm_release import (
    assert_conversion_runs_as_mlx_lm, assert_engine_keeps_mlx_lm_greedy_tokens, model_logits, normal,
    random_mlx_lm_model, unstacked, with_zeroed, write_release,
)
from support import assert_forward_and_decode_match, float32_model, runnable_backends, scaled_error

pytest.importorskip("mlx_lm")
BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def deepseek_config(**extra) -> dict:
    """A tiny config as the release's config.json spells it (its remote code's keys mlx-lm ignores included)."""
    settings = dict(model_type="deepseek", architectures=["DeepseekForCausalLM"], vocab_size=VOCAB, hidden_size=64,
                    intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                    first_k_dense_replace=1, moe_layer_freq=1, max_position_embeddings=256, rms_norm_eps=1e-6,
                    rope_theta=10000.0, rope_scaling=None, attention_bias=False, hidden_act="silu",
                    norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
                    pretraining_tp=1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    return {**settings, **extra}


#: The release's layout (every layer but the first sparse); and every other layer sparse from the first, biased
#: attention, linear rope scaling, no shared experts.
VARIANTS = {"release": {}, "every_other": dict(num_hidden_layers=4, first_k_dense_replace=0, moe_layer_freq=2,
                                               attention_bias=True, n_shared_experts=None,
                                               rope_scaling={"type": "linear", "factor": 2.0})}


def as_released(tensors: dict) -> dict:
    """mlx-lm's deepseek names -> the release's: its sanitize stacks ``mlp.experts.{e}.*`` into ``mlp.switch_mlp.*``."""
    return unstacked(tensors, "switch_mlp", "experts")


def build_checkpoints(tmp_path_factory) -> dict:
    """variant -> (the release's folder, mlx-lm's model of it)."""
    out = {}
    for variant, extra in VARIANTS.items():
        config = deepseek_config(**extra)
        model = random_mlx_lm_model(config, draw=normal())
        folder = tmp_path_factory.mktemp(variant)
        write_release(folder, model, config, TOKENS, as_released)
        out[variant] = folder, model
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", [*BACKENDS, "jax"])
def test_model_matches_mlx_lm(checkpoints, backend, variant):
    folder, reference = checkpoints[variant]
    model = float32_model(folder, backend, block_size=4)
    arch, moe = model.config.arch, model.config.arch.moe
    release = variant == "release"
    assert [spec.mlp for spec in arch.layers] == (["dense", "moe", "moe"] if release else ["moe", "dense"] * 2)
    assert (arch.qkv_bias, arch.o_bias, arch.layers[0].rope.factor) == ((False, False, 1.0) if release else (
        True, True, 2.0))
    assert (moe.routing, moe.normalize, moe.shared_expert_size, moe.router_float32) == (
        "softmax", False, 64 if release else None, False)
    assert_forward_and_decode_match(model, TOKENS, model_logits(reference, TOKENS))


def test_engine_keeps_greedy_tokens(checkpoints):
    assert_engine_keeps_mlx_lm_greedy_tokens(*checkpoints["release"], VOCAB)


@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(checkpoints, tmp_path, bits):
    """mlx-lm's conversion (experts stacked under switch_mlp), plain or packed in groups of 32, runs on every backend
    as mlx-lm runs it; the plain one as mlx-lm runs the release."""
    stored = assert_conversion_runs_as_mlx_lm(*checkpoints["release"], tmp_path / "mlx", TOKENS, bits)
    assert "model.layers.1.mlp.switch_mlp.gate_proj.weight" in stored
    assert ("model.layers.1.mlp.switch_mlp.gate_proj.scales" in stored) == (bits is not None)


# ------------------------------------------------------------------ controls


def test_the_shared_experts_and_the_unrenormalized_weights_count(checkpoints, monkeypatch):
    """Controls: the shared experts zeroed, or the top-k probabilities renormalized (as DeepSeek's code would under
    norm_topk_prob), mlx-lm's logits move."""
    import mlx.core as mx
    from mlx_lm.models import deepseek

    _, reference = checkpoints["release"]
    want = model_logits(reference, TOKENS)
    assert scaled_error(model_logits(with_zeroed(reference, "shared_experts"), TOKENS), want) > 1e-2
    plain = deepseek.MoEGate.__call__

    def renormalized(self, x):
        inds, scores = plain(self, x)
        return inds, scores / mx.sum(scores, axis=-1, keepdims=True)

    monkeypatch.setattr(deepseek.MoEGate, "__call__", renormalized)
    assert scaled_error(model_logits(reference, TOKENS), want) > 1e-2


def test_moe_layer_freq_is_read(checkpoints, tmp_path):
    """Control: the every-other-layer checkpoint read with moe_layer_freq 1 asks for experts its odd layers lack."""
    import json
    import shutil

    folder = shutil.copytree(checkpoints["every_other"][0], tmp_path / "freq1")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "moe_layer_freq": 1}))
    with pytest.raises(MissingTensorError, match="layers.1.mlp"):
        float32_model(folder)


# ------------------------------------------------------------------ config


def test_defaults_are_mlx_lm_s():
    """Keys a config leaves out take mlx-lm's ModelArgs defaults; heads are hidden_size / num_attention_heads
    whatever head_dim says, as in mlx-lm and DeepSeek's code."""
    from mlx_lm.models.deepseek import ModelArgs

    raw = {"model_type": "deepseek", "n_routed_experts": 64, "num_experts_per_tok": 6, "head_dim": 7}
    config, want = ModelConfig.from_dict(raw), ModelArgs()
    moe = config.arch.moe
    assert (config.hidden_size, config.intermediate_size, config.num_layers, config.num_heads, config.head_dim,
            config.vocab_size, moe.expert_size, config.rms_norm_eps, config.arch.layers[0].rope.theta) == (
        want.hidden_size, want.intermediate_size, want.num_hidden_layers, want.num_attention_heads,
        want.hidden_size // want.num_attention_heads, want.vocab_size, want.moe_intermediate_size, want.rms_norm_eps,
        want.rope_theta)
    assert moe.shared_expert_size is None and all(layer.mlp == "moe" for layer in config.arch.layers)


@pytest.mark.parametrize("changes, error, words", [
    (dict(norm_topk_prob=True), UnsupportedFeatureError, "norm_topk_prob"),
    (dict(scoring_func="sigmoid"), UnsupportedFeatureError, "scoring_func"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), UnsupportedFeatureError, "rope type 'dynamic'"),
    (dict(tie_word_embeddings=True), UnsupportedFeatureError, "tie_word_embeddings"),
    (dict(n_routed_experts=None), ConfigError, "n_routed_experts' must be set"),
    (dict(num_experts_per_tok=9), ConfigError, "num_experts_per_tok"),
    (dict(moe_layer_freq=0), ConfigError, "moe_layer_freq"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(deepseek_config(**changes))
