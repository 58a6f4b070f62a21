"""Ling / Ring v1 and 2.0 (``bailing_moe``) against mlx-lm's own model, which transformers has no code for: random
checkpoints built from mlx-lm's bailing_moe Model and written under the releases' names (mlx-lm's ``sanitize``
inverted, and shown to read back as the model written), Ferrum's logits on every backend, the engine's greedy
tokens, mlx-lm's float and packed conversions, a control per feature and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import MlxLmReference, random_mlx_lm_model, unstacked, write_release
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    edited_checkpoint, float32_model, mlx_lm_converted, mlx_lm_logits, runnable_backends, scaled_error,
    small_pool_engine, staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
BASE = dict(model_type="bailing_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
            max_position_embeddings=256, moe_intermediate_size=32, num_experts=8, num_shared_experts=1,
            norm_topk_prob=True, num_attention_heads=4, num_experts_per_tok=2, num_hidden_layers=3,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, first_k_dense_replace=1,
            tie_word_embeddings=False)
CONFIGS = {
    # Ling-lite's (v1): softmax routing, whole-head rope, biased q/k/v, the LM head normed at load
    "v1": {**BASE, "architectures": ["BailingMoeForCausalLM"], "use_qkv_bias": True, "norm_head": True},
    # Ling-mini-2.0's: q/k norms, half-head rope, sigmoid scores chosen with an expert bias in groups, scaled,
    # shared experts of their own width (its release's head_dim too, which agrees)
    "v2": {**BASE, "architectures": ["BailingMoeV2ForCausalLM"], "num_experts": 16, "use_qk_norm": True,
           "partial_rotary_factor": 0.5, "score_function": "sigmoid", "moe_router_enable_expert_bias": True,
           "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "moe_shared_expert_intermediate_size": 48,
           "head_dim": 16, "num_nextn_predict_layers": 0},
}


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """O(1) activations with every path mattering: norms near 1, expert biases positive (a corrected score never
    falls below the 0 dropped groups score), the rest N(0, 0.2)."""
    if name.endswith("norm.weight") or "layernorm" in name:
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith("expert_bias"):
        return rng.uniform(0.0, 0.3, size=shape)
    return 0.2 * rng.standard_normal(shape)


def as_released(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mlx-lm's parameters of a Ling model (bailing_moe, bailing_moe_linear) under the release's names: their
    ``sanitize`` inverted (the experts one by one, the router ``gate.weight``)."""
    return {name.replace(".gate.gate_proj.", ".gate."): value
            for name, value in unstacked(tensors, "switch_mlp", "experts").items()}


def build_mlx_lm_checkpoint(folder, config: dict, tokens: list[int], seed: int = 0):
    """A random mlx-lm Model of Ling ``config`` (bailing_moe, bailing_moe_linear) written to ``folder`` under the
    release's names (with norm_head the stored head unnormed: mlx-lm's sanitize norms it), proven by mlx-lm's load
    over ``tokens``. Returns the model."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model = random_mlx_lm_model(config, seed, _draw)
    head = np.array(model.lm_head.weight)
    if config.get("norm_head"):
        normed = head / (np.linalg.norm(head, axis=0, keepdims=True) + np.float32(1e-7))
        model.update(tree_unflatten([("lm_head.weight", mx.array(normed))]))
    write_release(folder, model, config, tokens, lambda tensors: as_released({**tensors, "lm_head.weight": head}),
                  tolerance=1e-6)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (folder, mlx-lm's model, its logits over TOKENS)."""
    out = {}
    for name, config in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        model = build_mlx_lm_checkpoint(folder, config, TOKENS)
        out[name] = folder, model, mlx_lm_logits(folder, TOKENS)
    return out


def test_reads_ling_2_as_mlx_lm_does():
    arch = ModelConfig.from_dict(CONFIGS["v2"]).arch
    assert (arch.layers[0].rope.rotary_dim, arch.qk_norm, arch.fused_qkv, arch.head_normed) == (8, "head", True,
                                                                                                False)
    assert [layer.mlp for layer in arch.layers] == ["dense", "moe", "moe"]
    moe = arch.moe
    assert (moe.routing, moe.n_group, moe.topk_group, moe.routed_scale, moe.shared_expert_size, moe.bias_name) == (
        "sigmoid_grouped_zero_masked", 4, 2, 2.5, 48, "gate.expert_bias")
    v1 = ModelConfig.from_dict(CONFIGS["v1"]).arch
    assert (v1.moe.routing, v1.moe.shared_expert_size, v1.head_normed, v1.qkv_bias) == ("softmax", 32, True, True)


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_mlx_lm(checkpoints, backend, variant):
    folder, _, want = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_engine_keeps_mlx_lm_greedy_tokens(checkpoints):
    folder, model, _ = checkpoints["v2"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), MlxLmReference(model),
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm's conversion needs MLX")
@pytest.mark.parametrize(("variant", "bits"), [("v2", None), ("v2", 4), ("v1", 4)])
def test_mlx_lm_conversion_runs_as_mlx_lm_runs_it(checkpoints, tmp_path, variant, bits):
    """mlx-lm's conversion stacks the experts and names the router ``gate.gate_proj`` (packed at 8 bits), its
    expert bias kept in float beside it; a packed one's head was normed before packing. mlx-lm's own load of a packed
    normed head norms the packed words again (its sanitize does not look), so its logits there are read with
    norm_head off, as the conversion means them."""
    folder, _, want = checkpoints[variant]
    stored, converted = mlx_lm_converted(folder, tmp_path / "mlx", TOKENS, bits)
    if bits is not None and CONFIGS[variant].get("norm_head"):
        unnormed = edited_checkpoint(tmp_path / "mlx", tmp_path / "unnormed", {"norm_head": False})
        converted = mlx_lm_logits(unnormed, TOKENS)
    assert "model.layers.1.mlp.switch_mlp.gate_proj.weight" in stored
    assert "model.layers.1.mlp.gate.gate_proj.weight" in stored
    assert ("model.layers.1.mlp.gate.expert_bias" in stored) == (variant == "v2")
    if bits is None:
        assert scaled_error(converted, want) <= 1e-4
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, converted, packed=bits is not None)


def test_ferrum_quantize_norms_the_head_before_packing_as_mlx_lm(checkpoints, tmp_path):
    """``ferrum quantize`` of Ling-lite's release packs its head normed, as mlx-lm's conversion does: the two give
    the same logits (mlx-lm's read with norm_head off, as in the conversion test)."""
    from ferrum.quant.convert import quantize_checkpoint

    folder = checkpoints["v1"][0]
    mlx_lm_converted(folder, tmp_path / "mlx", TOKENS, 4, group=32)
    want = mlx_lm_logits(edited_checkpoint(tmp_path / "mlx", tmp_path / "unnormed", {"norm_head": False}), TOKENS)
    out = quantize_checkpoint(folder, tmp_path / "q", bits=4, group_size=32)
    assert scaled_error(float32_model(out).forward_verify("q", TOKENS), want) <= 2e-3
    assert scaled_error(mlx_lm_logits(edited_checkpoint(out, tmp_path / "q_unnormed", {"norm_head": False}), TOKENS),
                        want) <= 1e-5


def _zero_expert_bias(stored):
    for name in stored:
        if name.endswith("expert_bias"):
            stored[name] = np.zeros_like(stored[name])


def _without_qk_norms(stored):
    for name in [name for name in stored if "_layernorm." in name and ".attention." in name]:
        del stored[name]


@pytest.mark.parametrize(("variant", "config", "tensors"), [
    ("v2", None, _zero_expert_bias), ("v2", {"partial_rotary_factor": 1.0}, None), ("v2", {"n_group": 1}, None),
    ("v2", {"use_qk_norm": False}, _without_qk_norms), ("v1", {"norm_head": False}, None),
    ("v1", {"norm_topk_prob": False}, None),
], ids=["expert_bias", "partial_rope", "groups", "qk_norm", "norm_head", "norm_topk_prob"])
def test_each_feature_moves_the_logits(checkpoints, tmp_path, variant, config, tensors):
    """Without it, mlx-lm's logits move from those Ferrum matches: each feature is in the parity checks."""
    folder, _, want = checkpoints[variant]
    edited = edited_checkpoint(folder, tmp_path / "edited", config, tensors)
    assert scaled_error(mlx_lm_logits(edited, TOKENS), want) > 1e-2


@pytest.mark.parametrize(("edit", "message"), [
    ({"head_dim": 32}, "'head_dim' is 32, but mlx-lm sizes"),
    ({"num_nextn_predict_layers": 1}, "multi-token prediction"),
    ({"use_bias": True}, "no Ling release biases"),
    ({"score_function": "softmax"}, "'n_group' is 4 with score_function 'softmax'"),
    ({"moe_router_enable_expert_bias": False}, "'n_group' is 4 with score_function 'sigmoid'"),
    ({"tie_word_embeddings": True, "norm_head": True}, "'norm_head' norms the LM head"),
    ({"rotary_dim": 5}, "'rotary_dim' is 5"),
])
def test_refuses_what_it_cannot_run_as_mlx_lm(edit, message):
    with pytest.raises((ConfigError, UnsupportedFeatureError), match=message):
        ModelConfig.from_dict({**CONFIGS["v2"], **edit})
