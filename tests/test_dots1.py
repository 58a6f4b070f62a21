"""rednote's dots.llm1 (``dots1``): Qwen 3's attention (per-head q/k norms before rope, its window rule without
use_sliding_window) over DeepSeek-V3's MoE (grouped sigmoid routing with correction biases, float32 routers, ungated
shared experts, dense first layers); against transformers' Dots1ForCausalLM on every runnable backend, and mlx-lm's
Dots1 and its conversions.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from ferrum.model import DecoderOnlyLLM
from support import assert_forward_and_decode_match, reference_logits, runnable_backends, saved_references, scaled_error

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
WINDOW = 4  # shorter than TOKENS


def dots_config(**extra) -> transformers.Dots1Config:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=2,
                    first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True,
                    sliding_window=WINDOW, max_window_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    return transformers.Dots1Config(**{**settings, **extra})


#: Two groups (one kept), biased attention, the last layer sliding; and dots.llm1's own layout: one group,
#: unnormalized weights unscaled, every layer full (no window), heads of hidden / heads.
VARIANTS = {"grouped": {}, "release": dict(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                                           attention_bias=False, sliding_window=None, head_dim=16,
                                           num_experts_per_tok=3, n_shared_experts=1)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, dots_config)


# ------------------------------------------------------------------ whole models


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch = model.config.arch
    assert [spec.mlp for spec in arch.layers] == ["dense", "moe", "moe"]
    assert [spec.window for spec in arch.layers] == ([None, None, WINDOW] if variant == "grouped" else [None] * 3)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_checks_the_window(checkpoints):
    """Dropping the last layer's window moves transformers' logits: it matters in the comparison above (the
    correction biases' control is tests/test_moe_families.py's)."""
    folder, hf = checkpoints["grouped"]
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(
        folder, layer_types=["full_attention"] * 3).float().eval()
    assert scaled_error(reference_logits(unwindowed, TOKENS), reference_logits(hf, TOKENS)) > 1e-2


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    raw = {**dots_config().to_dict(), **changes}
    return {k: v for k, v in raw.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize("changes, words", [
    ({"n_routed_experts": None}, "'n_routed_experts' must be set: transformers has no default expert count"),
    ({"num_experts_per_tok": _DROP}, "'num_experts_per_tok' must be a positive integer, got None"),
    ({"n_shared_experts": None}, "'n_shared_experts' must be a positive integer, got None"),
    ({"topk_group": 3}, "'topk_group' (3) exceeds the 2 expert groups"),
    ({"num_experts_per_tok": 5}, "'num_experts_per_tok' (5) exceeds the 4 experts of the 1 group"),
    ({"layer_types": None, "max_window_layers": None}, "'max_window_layers' is null, but a sliding_window needs"),
    ({"sliding_window": None}, "'sliding_window' must be set when layer_types lists sliding layers"),
    ({"layer_types": None, "use_sliding_window": False},
     "'use_sliding_window' is false, but transformers' dots1 ignores it and slides layers [2]"),
])
def test_bad_keys_are_refused_by_name(changes, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


def test_windows_follow_transformers_rule():
    """transformers' Dots1Config: layers from max_window_layers on slide wherever sliding_window is set (no
    use_sliding_window switch); layer_types overrides; a use_sliding_window that agrees is accepted."""
    def windows(**changes):
        return [layer.window for layer in ModelConfig.from_dict(_raw(**{"layer_types": None, **changes})).arch.layers]

    assert windows() == [None, None, WINDOW]
    assert windows(max_window_layers=0, use_sliding_window=True) == [WINDOW] * 3
    assert windows(sliding_window=None, use_sliding_window=False) == [None] * 3
    assert windows(layer_types=["sliding_attention", "full_attention", "full_attention"]) == [WINDOW, None, None]
    assert dots_config(layer_types=None).layer_types == ["full_attention"] * 2 + ["sliding_attention"]


def test_transformers_defaults_are_read():
    """Keys a config leaves out take Dots1Config's defaults: no groups, unnormalized weights, scale 1, every layer
    sparse, experts of 1408; the window rule's 62 full layers (for a 3-layer model, none slides)."""
    raw = {k: v for k, v in _raw().items() if k not in (
        "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace",
        "moe_intermediate_size", "max_window_layers", "layer_types", "rope_parameters")}
    arch = ModelConfig.from_dict(raw).arch
    moe = arch.moe
    assert (moe.n_group, moe.topk_group, moe.normalize, moe.routed_scale, moe.expert_size) == (1, 1, False, 1.0, 1408)
    assert moe.shared_expert_size == 2 * 1408 and moe.routing == "sigmoid_grouped" and moe.router_float32
    assert [layer.mlp for layer in arch.layers] == ["moe"] * 3 and [layer.window for layer in arch.layers] == [None] * 3
    assert arch.layers[0].rope.theta == 10000.0 and arch.qk_norm == "head" and not arch.qk_norm_after_rope
