"""Granite 3 MoE with a shared expert (``granitemoeshared``): GraniteMoE's multipliers and stacked experts, plus a
layer-level shared MLP (gate and up in one ``input_linear``) added to the experts' output before residual_multiplier
scales it; against transformers on every runnable backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from ferrum.model import DecoderOnlyLLM
from support import assert_forward_and_decode_match, build_transformers_model, reference_logits, runnable_backends

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
#: every multiplier away from 1, tied; a shared MLP 40 wide, or none (shared_intermediate_size 0)
VARIANTS = {"shared": dict(shared_intermediate_size=40), "unshared": dict(shared_intermediate_size=0)}


def granite_config(**extra) -> transformers.GraniteMoeSharedConfig:
    return transformers.GraniteMoeSharedConfig(
        vocab_size=97, hidden_size=64, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=True, embedding_multiplier=3.0, residual_multiplier=0.5,
        attention_multiplier=0.09, logits_scaling=4.0, **extra)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for variant, extra in VARIANTS.items():
        folder = tmp_path_factory.mktemp(variant)
        out[variant] = folder, build_transformers_model(folder, granite_config(**extra))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert (model.config.arch.moe.shared_expert_size is None) == (variant == "unshared")
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_checks_the_shared_mlp(checkpoints):
    """Zeroing the shared MLP's output moves transformers' logits: the parity above sees it."""
    import torch

    folder, hf = checkpoints["shared"]
    unshared = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        for layer in unshared.model.layers:
            layer.shared_mlp.output_linear.weight.zero_()
    want = reference_logits(hf, TOKENS)
    assert np.abs(reference_logits(unshared, TOKENS) - want).max() > 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("overrides, key", [({"shared_intermediate_size": -1}, "shared_intermediate_size"),
                                            ({"num_experts_per_tok": 6}, "num_experts_per_tok"),
                                            ({"residual_multiplier": 0}, "residual_multiplier")])
def test_bad_values_are_refused_by_name(checkpoints, overrides, key):
    raw = json.loads((checkpoints["shared"][0] / "config.json").read_text())
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict({**raw, **overrides})
