"""Ring-linear 2.0 (``bailing_moe_linear``) against mlx-lm's own model, which transformers has no code for: random
checkpoints built from mlx-lm's bailing_moe_linear Model and written under the releases' names (mlx-lm's ``sanitize``
inverted, and shown to read back as the model written), Ferrum's logits on every backend, the lightning states through
the engine (batching, chunking, preemption, prefix caching, mixed batches, a failed pass), mlx-lm's float and packed
conversions, a control per feature and the refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ferrum.arch import families
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import ForwardItem
from ferrum.recurrent.lightning import release_slope_rates
from ferrum.recurrent.snapshots import DEFAULT_BUDGET
from mlx_lm_release import MlxLmReference
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was,
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_engine_keeps_greedy_tokens,
    assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match, edited_checkpoint,
    float32_model, mlx_lm_converted, mlx_lm_logits, runnable_backends, scaled_error, small_pool_engine,
    staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=21)]
BASE = dict(model_type="bailing_moe_linear", architectures=["BailingMoeLinearV2ForCausalLM"], vocab_size=VOCAB,
            intermediate_size=128, max_position_embeddings=256, moe_intermediate_size=32, num_experts=8,
            num_shared_experts=1, norm_topk_prob=True, num_experts_per_tok=2, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=10000.0, first_k_dense_replace=1, tie_word_embeddings=False)
CONFIGS = {
    # Ring-mini-linear-2.0's: q/k norms, half-head rope, outputs normed in groups, sigmoid scores chosen with an
    # expert bias in groups; linear layers 0 and 2, full 1 and 3 ((i + 1) % 2 == 0) and 4 (past the last whole group)
    "mini": {**BASE, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "num_hidden_layers": 5,
             "layer_group_size": 2, "group_norm_size": 2, "use_qk_norm": True, "partial_rotary_factor": 0.5,
             "num_experts": 16, "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "n_group": 4,
             "topk_group": 2, "routed_scaling_factor": 2.5, "linear_silu": False, "num_nextn_predict_layers": 0},
    # biased q/k/v, whole-head rope, softmax routing, the LM head normed, 6 heads (ALiBi's slopes of a head count not
    # a power of two), one norm over all heads
    "lite": {**BASE, "hidden_size": 48, "num_attention_heads": 6, "num_hidden_layers": 3, "layer_group_size": 3,
             "group_norm_size": 1, "use_qkv_bias": True, "norm_head": True},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (folder, mlx-lm's model, its logits over TOKENS)."""
    from test_bailing_moe import build_mlx_lm_checkpoint

    out = {}
    for name, config in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        model = build_mlx_lm_checkpoint(folder, config, TOKENS)
        out[name] = folder, model, mlx_lm_logits(folder, TOKENS)
    return out


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_reads_layer_kinds_and_rates_as_mlx_lm_builds_them(checkpoints, variant):
    """Each layer's kind is mlx-lm's ``is_global``; each linear layer's decay per head is mlx-lm's ``_slope``."""
    _, model, _ = checkpoints[variant]
    arch = ModelConfig.from_dict(CONFIGS[variant]).arch
    assert [spec.mixer == "attention" for spec in arch.layers] == [layer.is_global for layer in model.layers]
    for i, layer in enumerate(model.layers):
        if not layer.is_global:
            np.testing.assert_allclose(np.exp(arch.computed[f"layers.{i}.self_attn.a_log"]),
                                       -np.array(layer.attention._slope), rtol=1e-6)
    spec = arch.lightning
    assert (spec.layout, spec.silu, spec.rotated, spec.query_scale, spec.norm_eps) == ("grouped", False, True,
                                                                                     0.25 if variant == "mini" else
                                                                                     8 ** -0.5, None)


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_mlx_lm(checkpoints, backend, variant):
    folder, _, want = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_engine_batching_chunking_and_preemption_keep_mlx_lm_greedy_tokens(checkpoints):
    folder, model, _ = checkpoints["mini"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), MlxLmReference(model),
                                      staggered_greedy_workload(VOCAB))


def test_a_sequence_started_from_a_kept_state_computes_mlx_lm_logits(checkpoints):
    """Prefix caching: the lightning states kept at a block boundary start a sequence sharing the prefix."""
    folder, _, want = checkpoints["mini"]
    model = float32_model(folder, num_kv_blocks=128, block_size=4)
    model.snapshots.budget = DEFAULT_BUDGET
    model.prefill("a", TOKENS[:16])
    match = model.kv.match_prefix(TOKENS)
    assert match.num_tokens == 16 and model.snapshots.count == 1
    model.kv.adopt("b", TOKENS, match)
    out = model.forward([ForwardItem("b", TOKENS[16:], 16)], all_logits=True)
    assert scaled_error(model.ops.to_numpy(out.logits), want[16:]) <= 1e-4


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    folder, model, _ = checkpoints["mini"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), MlxLmReference(model), VOCAB)


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoints, monkeypatch):
    """The pass fails in its second linear layer, after the first made new states."""
    folder, model, _ = checkpoints["mini"]
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), MlxLmReference(model), TOKENS,
                                                      "ssd_update", monkeypatch, fail_at=2)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm's conversion needs MLX")
@pytest.mark.parametrize(("variant", "bits"), [("mini", None), ("mini", 4), ("lite", 4)])
def test_mlx_lm_conversion_runs_as_mlx_lm_runs_it(checkpoints, tmp_path, variant, bits):
    """mlx-lm's conversion keeps the linear layers' names, stacks the experts and names the router
    ``gate.gate_proj``; a packed normed head was normed before packing, so mlx-lm's own logits of it are read with
    norm_head off (as test_bailing_moe's)."""
    folder, _, want = checkpoints[variant]
    stored, converted = mlx_lm_converted(folder, tmp_path / "mlx", TOKENS, bits, group=32)
    if bits is not None and CONFIGS[variant].get("norm_head"):
        converted = mlx_lm_logits(edited_checkpoint(tmp_path / "mlx", tmp_path / "unnormed", {"norm_head": False}),
                                  TOKENS)
    assert "model.layers.0.attention.g_norm.weight" in stored
    assert "model.layers.1.mlp.gate.gate_proj.weight" in stored
    if bits is None:
        assert scaled_error(converted, want) <= 1e-4
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, converted, packed=bits is not None)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm's conversion needs MLX")
def test_ferrum_quantize_packs_as_mlx_lm_converts(checkpoints, tmp_path):
    """``ferrum quantize`` of Ring-mini-linear's release packs as mlx-lm's conversion does (the router at 8 bits
    under ``gate.gate_proj``): mlx-lm reads it as its own conversion, and Ferrum runs it within 2e-3 of that."""
    from ferrum.quant.convert import quantize_checkpoint

    folder = checkpoints["mini"][0]
    want = mlx_lm_converted(folder, tmp_path / "mlx", TOKENS, 4, group=32)[1]
    out = quantize_checkpoint(folder, tmp_path / "q", bits=4, group_size=32)
    assert scaled_error(mlx_lm_logits(out, TOKENS), want) <= 1e-5
    assert scaled_error(float32_model(out).forward_verify("q", TOKENS), want) <= 2e-3


def _without_qk_norms(stored):
    for name in [name for name in stored if "_layernorm." in name and ".attention." in name]:
        del stored[name]


@pytest.mark.parametrize(("config", "tensors"), [
    ({"group_norm_size": 1}, None), ({"partial_rotary_factor": 1.0}, None),
    ({"use_qk_norm": False}, _without_qk_norms),
], ids=["norm_groups", "partial_rope", "qk_norm"])
def test_each_config_feature_moves_mlx_lm_logits(checkpoints, tmp_path, config, tensors):
    """Without it, mlx-lm's logits move from those Ferrum matches: each feature is in the parity checks."""
    folder, _, want = checkpoints["mini"]
    edited = edited_checkpoint(folder, tmp_path / "edited", config, tensors)
    assert scaled_error(mlx_lm_logits(edited, TOKENS), want) > 1e-2


@pytest.mark.parametrize(("variant", "change", "config"), [
    ("mini", dict(layout="per_head"), None), ("mini", dict(rotated=False), None), ("mini", dict(norm_groups=1), None),
    ("lite", dict(norm_eps=1e-1), None), ("mini", "minimax_rates", None),
    # the queries' scale reaches the logits through the output norm's epsilon alone: one as large as the outputs
    ("lite", dict(query_scale=1.0), {"rms_norm_eps": 0.5}),
], ids=["grouped_layout", "rope", "norm_groups", "norm_eps", "depth", "query_scale"])
def test_each_lightning_feature_moves_ferrums_logits(checkpoints, tmp_path, monkeypatch, variant, change, config):
    """Ferrum's lightning layers with one of Ring-linear's departures from MiniMax's undone (or MiniMax's release
    rates, which shrink from the first layer on, not the second) miss mlx-lm's logits, which Ferrum's match (of the
    checkpoint with ``config`` edited, where given)."""
    folder, _, want = checkpoints[variant]
    if config is not None:
        folder = edited_checkpoint(folder, tmp_path / "edited", config)
        want = mlx_lm_logits(folder, TOKENS)
        assert scaled_error(float32_model(folder).forward_verify("m", TOKENS), want) <= 1e-4
    family = families.FAMILIES["bailing_moe_linear"]

    def undone(r, sizes):
        arch = family.build(r, sizes)
        if change != "minimax_rates":
            return replace(arch, lightning=replace(arch.lightning, **change))
        return replace(arch, computed={name: tuple(np.log(release_slope_rates(sizes.num_heads, int(name.split(".")[1]),
                                                                              sizes.num_layers)).tolist())
                                       for name in arch.computed})

    monkeypatch.setitem(families.FAMILIES, "bailing_moe_linear", replace(family, build=undone))
    assert scaled_error(float32_model(folder).forward_verify("u", TOKENS), want) > 1e-3


@pytest.mark.parametrize(("edit", "message"), [
    ({"linear_silu": True}, "'linear_silu' puts q, k and v"),
    ({"group_norm_size": 3}, "'group_norm_size' .3. must divide"),
    ({"head_dim": 32}, "'head_dim' is 32, but mlx-lm sizes"),
    ({"num_nextn_predict_layers": 1}, "multi-token prediction"),
])
def test_refuses_what_it_cannot_run_as_mlx_lm(edit, message):
    with pytest.raises((ConfigError, UnsupportedFeatureError), match=message):
        ModelConfig.from_dict({**CONFIGS["mini"], **edit})
