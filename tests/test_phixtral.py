"""Phixtral (``phixtral``, its releases' ``phi-msft``; no transformers class, its release ships remote code): Phi-2's
parallel blocks (one biased LayerNorm feeding attention and the experts, fused biased q/k/v, partial rope) over an
unbiased router whose top-k logits' softmax weighs ungated GELU (tanh form) experts with biased projections, stored one
by one under ``moe.mlp.{e}``, and a biased LM head after its own LayerNorm; against mlx-lm's phixtral in float32 on
every runnable backend (and the JAX plugin), the release's names and mlx-lm's conversions, plain and packed."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.moe.activation import Gelu
from mlx_lm_release import (
    assert_conversion_runs_as_mlx_lm, assert_engine_keeps_mlx_lm_greedy_tokens, model_logits, normal,
    random_mlx_lm_model, unstacked, with_zeroed, write_release,
)
from support import assert_forward_and_decode_match, float32_model, runnable_backends, scaled_error

pytest.importorskip("mlx_lm")
BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def phixtral_config(**extra) -> dict:
    """A tiny config as a release's config.json spells it: mlx-lm's keys beside the phi-msft ones it ignores."""
    settings = dict(model_type="phi-msft", architectures=["PhiForCausalLM"], model_dim=64, num_heads=4, num_layers=2,
                    num_vocab=VOCAB, rotary_dim=8, num_local_experts=4, num_experts_per_tok=2, n_embd=64, n_head=4,
                    n_layer=2, vocab_size=VOCAB, n_inner=None, n_positions=256, layer_norm_epsilon=1e-5,
                    activation_function="gelu_new", tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    return {**settings, **extra}


def as_released(tensors: dict) -> dict:
    """mlx-lm's phixtral names -> the release's: its sanitize stacks ``moe.mlp.{e}.*`` into ``moe.switch_mlp.*``."""
    return unstacked(tensors, "switch_mlp", "mlp")


def build_checkpoints(tmp_path_factory) -> dict:
    """variant -> (the release's folder, mlx-lm's model of it)."""
    config = phixtral_config()
    model, folder = random_mlx_lm_model(config, draw=normal(stds={"fc1": 0.3})), tmp_path_factory.mktemp("phixtral")
    write_release(folder, model, config, TOKENS, as_released, vocab=VOCAB)
    return {"release": (folder, model)}


@pytest.mark.parametrize("backend", [*BACKENDS, "jax"])
def test_model_matches_mlx_lm(checkpoints, backend):
    folder, reference = checkpoints["release"]
    model = float32_model(folder, backend, block_size=4)
    arch, moe = model.config.arch, model.config.arch.moe
    assert (arch.parallel, arch.norm, arch.fused_qkv, arch.lm_head_bias, arch.layers[0].rope.rotary_dim) == (
        True, "layer", True, True, 8)
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.normalize, moe.activation) == (
        4, 2, 256, True, Gelu(tanh=True))
    assert moe.biased and moe.unbiased_router and moe.expert_names[0] is None
    want = model_logits(reference, TOKENS)
    assert_forward_and_decode_match(model, TOKENS, want)
    # GELU's exact form moves these logits by about 1e-4 (the control below): the forward pass is held far closer
    assert scaled_error(model.forward_verify("tight", TOKENS), want) <= 1e-5


def test_engine_keeps_greedy_tokens(checkpoints):
    assert_engine_keeps_mlx_lm_greedy_tokens(*checkpoints["release"], VOCAB)


@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(checkpoints, tmp_path, bits):
    """mlx-lm's conversion (experts and their biases stacked under moe.switch_mlp), plain or packed in groups of 32,
    runs on every backend as mlx-lm runs it; the plain one as mlx-lm runs the release."""
    stored = assert_conversion_runs_as_mlx_lm(*checkpoints["release"], tmp_path / "mlx", TOKENS, bits)
    assert stored["transformer.h.1.moe.switch_mlp.fc1.bias"].shape == (4, 256)
    assert ("transformer.h.1.moe.switch_mlp.fc1.scales" in stored) == (bits is not None)


def test_ferrum_quantize_stacks_the_experts_biases(checkpoints, tmp_path):
    """`ferrum quantize` of the release stacks each expert's biases where mlx-lm reads them: mlx-lm loads its output,
    and every backend runs it as mlx-lm does."""
    from ferrum.quant.convert import quantize_checkpoint
    from support import assert_every_backend_runs_it_as_mlx_lm, mlx_lm_logits

    packed = quantize_checkpoint(checkpoints["release"][0], tmp_path / "q4", bits=4, group_size=32)
    assert_every_backend_runs_it_as_mlx_lm(packed, TOKENS, mlx_lm_logits(packed, TOKENS), packed=True)


# ------------------------------------------------------------------ controls


def test_tanh_gelu_and_expert_biases_move_mlx_lm_s_logits(checkpoints, monkeypatch):
    """Controls: the experts' biases zeroed, or their GELU exact instead of mlx-lm's "precise" (the tanh form, Phi-2's
    gelu_new, which the release's activation_function names), mlx-lm's logits move (the latter by far more than the
    1e-5 every backend is held to)."""
    import mlx.nn as nn

    _, reference = checkpoints["release"]
    want = model_logits(reference, TOKENS)
    assert scaled_error(model_logits(with_zeroed(reference, "switch_mlp.fc1.bias"), TOKENS), want) > 1e-2
    for layer in reference.layers:
        monkeypatch.setattr(layer.moe.switch_mlp, "activation", nn.GELU(approx="none"))
    assert scaled_error(model_logits(reference, TOKENS), want) > 5e-5


# ------------------------------------------------------------------ config


def test_defaults_are_mlx_lm_s():
    """Keys a config leaves out take mlx-lm's ModelArgs defaults (Phi-2's sizes); the experts are 4 x model_dim."""
    from mlx_lm.models.phixtral import ModelArgs

    config, want = ModelConfig.from_dict({"model_type": "phixtral"}), ModelArgs("phixtral")
    assert (config.hidden_size, config.num_heads, config.num_kv_heads, config.num_layers, config.vocab_size,
            config.arch.layers[0].rope.rotary_dim, config.arch.moe.num_experts, config.arch.moe.top_k) == (
        want.model_dim, want.num_heads, want.num_heads, want.num_layers, want.num_vocab, want.rotary_dim,
        want.num_local_experts, want.num_experts_per_tok)
    assert config.intermediate_size == 4 * want.model_dim and config.rms_norm_eps == 1e-5


@pytest.mark.parametrize("changes, error, words", [
    (dict(n_embd=128), ConfigError, "'n_embd' is 128, but mlx-lm's phixtral reads model_dim (64)"),
    (dict(n_inner=100), UnsupportedFeatureError, "'n_inner' is 100"),
    (dict(layer_norm_epsilon=1e-6), UnsupportedFeatureError, "runs its LayerNorms with 1e-5"),
    (dict(tie_word_embeddings=True), UnsupportedFeatureError, "tie_word_embeddings"),
    (dict(num_experts_per_tok=5), ConfigError, "num_experts_per_tok"),
    (dict(rotary_dim=20), ConfigError, "rotary_dim"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(phixtral_config(**changes))
