"""AI21's Jamba (``jamba``): Mamba-1 layers (the step, B and C RMS-normed with weights) and attention layers without
rope, each followed by a SwiGLU MLP or softmax experts whose top-k weights are not renormalized; against
transformers (and mlx-lm's conversions) on every runnable backend, and the engine's batching, chunked prefill,
preemption and prefix caching over the Mamba states."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_every_backend_runs_it_as_mlx_lm, mlx_lm_converted,
    float32_model, small_pool_engine,
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_engine_keeps_greedy_tokens,
    assert_forward_and_decode_match, assert_random_checkpoint_is_what_transformers_reads, built_checkpoints,
    mlx_lm_logits, reference_logits, runnable_backends, scaled_error, staggered_greedy_workload,
)
from test_mamba import assert_next_turn_from_the_prefix_cache_is_transformers

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
              num_key_value_heads=2, attn_layer_period=3, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4,
              tie_word_embeddings=False)
VARIANTS = {
    # the releases' layout, shrunk: experts on every second layer from the first (4 of them, top 2), the step's
    # rank "auto" (hidden / 16)
    "moe": lambda: transformers.JambaConfig(**COMMON, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                                            num_experts_per_tok=2),
    # one expert: every MLP dense; biased projections, an unbiased convolution, a rank of its own, wider Mamba
    "dense": lambda: transformers.JambaConfig(**COMMON, num_experts=1, mamba_proj_bias=True, mamba_conv_bias=False,
                                              mamba_dt_rank=6, mamba_expand=3),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, VARIANTS, VOCAB)


def test_reads_the_layer_kinds_sizes_and_names(checkpoints):
    model = float32_model(checkpoints["moe"][0])
    arch = model.config.arch
    assert [(s.mixer, s.mlp) for s in arch.layers] == [
        ("mamba", "dense"), ("attention", "moe"), ("mamba", "dense"), ("mamba", "moe"), ("attention", "dense")]
    assert sorted(model.states.layers) == [0, 2, 3] and arch.kv_pool_layers == 2
    assert arch.layers[1].rope.rotary_dim == 0 and arch.attn_scale == pytest.approx(16 ** -0.5)
    assert (arch.mamba.inner, arch.mamba.dt_rank, arch.mamba.inner_norms, arch.mamba.module) == (
        128, 4, "weighted", "mamba")
    assert (arch.moe.num_experts, arch.moe.top_k, arch.moe.normalize) == (4, 2, False)
    dense = float32_model(checkpoints["dense"][0]).config.arch
    assert dense.moe is None and {s.mlp for s in dense.layers} == {"dense"}
    assert (dense.mamba.inner, dense.mamba.dt_rank, dense.mamba.conv_bias, dense.mamba.proj_bias) == (
        192, 6, False, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_the_unrenormalized_routing_and_the_inner_norms_weights_count(checkpoints):
    """Each is honoured: renormalized top-k weights (as mlx-lm computes them), or the step / B / C norms run
    without their weights, miss transformers' logits by far more than the match holds to."""
    folder, hf = checkpoints["moe"]
    want = reference_logits(hf, TOKENS)
    renormalized = float32_model(folder)
    moe = [layer.mlp for layer in renormalized.layers if hasattr(layer.mlp, "normalize")]
    assert len(moe) == 2
    for mlp in moe:
        mlp.normalize = True
    unweighted = float32_model(folder)
    for layer in unweighted.layers:
        if layer.recurrent is not None:
            layer.recurrent.spec = replace(layer.recurrent.spec, inner_norms="weightless")
            layer.recurrent.norms = [unweighted.ops.from_numpy(np.ones(n, np.float32), "float32") for n in (4, 8, 8)]
    for model in (renormalized, unweighted):
        assert scaled_error(model.forward_verify("a", TOKENS), want) > 1e-3


def test_the_v0_1_config_reads_as_transformers_does(checkpoints):
    """Jamba-v0.1's config.json (written for its remote code) gives n_ctx for the context, no
    max_position_embeddings, and mamba_inner_layernorms; without those norms it is refused by name."""
    raw = json.loads((checkpoints["moe"][0] / "config.json").read_text())
    del raw["max_position_embeddings"]
    raw.update(n_ctx=262144, mamba_inner_layernorms=True, use_mamba_kernels=True, sliding_window=None)
    assert ModelConfig.from_dict(raw).max_seq_len == 262144
    with pytest.raises(UnsupportedFeatureError, match="'mamba_inner_layernorms' is False"):
        ModelConfig.from_dict({**raw, "mamba_inner_layernorms": False})


@pytest.mark.parametrize(("change", "message"), [
    ({"attn_layer_offset": 3, "attn_layer_period": 3}, r"'attn_layer_offset' \(3\) must be below attn_layer_period"),
    ({"expert_layer_offset": 2}, r"'expert_layer_offset' \(2\) must be below expert_layer_period"),
    ({"num_experts_per_tok": 5}, r"'num_experts_per_tok' \(5\) exceeds the 4 experts"),
])
def test_inconsistent_configs_are_refused_by_name(change, message):
    raw = {**json.loads(VARIANTS["moe"]().to_json_string()), **change}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    folder, hf = checkpoints["moe"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["moe"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cached_requests_generate_transformers_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["moe"]
    assert_next_turn_from_the_prefix_cache_is_transformers(folder, hf, backend)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversion_of_a_dense_jamba_runs_as_mlx_lm_runs_it(checkpoints, tmp_path, bits):
    """mlx-lm's conversion keeps transformers' names and stores the convolution [C, K, 1]; float or packed, it runs
    on every backend as mlx-lm runs it."""
    folder, hf = checkpoints["dense"]
    stored, want = mlx_lm_converted(folder, tmp_path / "mlx", TOKENS, bits)
    assert stored["model.layers.0.mamba.conv1d.weight"].shape[-1] == 1
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    else:
        assert "model.layers.0.mamba.in_proj.scales" in stored
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
def test_mlx_lm_conversion_of_experts_runs_as_transformers_runs_them(checkpoints, tmp_path):
    """mlx-lm stacks the experts (``feed_forward.switch_mlp``); Ferrum reads them and weighs them as transformers
    does, where mlx-lm 0.32 renormalizes the top-k weights (so its own logits differ)."""
    from mlx_lm.convert import convert

    folder, hf = checkpoints["moe"]
    convert(str(folder), str(tmp_path / "mlx"))
    assert "model.layers.1.feed_forward.switch_mlp.gate_proj.weight" in load_file(tmp_path / "mlx" /
                                                                                   "model.safetensors")
    want = reference_logits(hf, TOKENS)
    assert scaled_error(mlx_lm_logits(tmp_path / "mlx", TOKENS), want) > 1e-3
    assert scaled_error(float32_model(tmp_path / "mlx").forward_verify("m", TOKENS), want) <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    raw = json.loads(VARIANTS[variant]().to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)
