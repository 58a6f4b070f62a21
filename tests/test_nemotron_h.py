"""Nemotron-H / Nemotron Nano 2 (``nemotron_h``): blocks of one norm and one module, a Mamba-2 mixer carrying a state
per sequence, attention without rope, or a squared-ReLU MLP alone, as the block pattern lists them; against
transformers (and mlx-lm's conversion against mlx-lm) on every runnable backend, and the engine's batching,
chunked prefill and preemption over those states."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_every_backend_runs_it_as_mlx_lm, mlx_lm_converted,
    float32_model, small_pool_engine,
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_engine_keeps_greedy_tokens,
    assert_forward_and_decode_match, assert_random_checkpoint_is_what_transformers_reads, build_transformers_model,
    built_checkpoints, reference_logits, runnable_backends, scaled_error, staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              head_dim=24, mamba_num_heads=8, mamba_head_dim=12, ssm_state_size=16, conv_kernel=4,
              max_position_embeddings=256, tie_word_embeddings=False)
BLOCKS = ["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "linear_attention", "mlp"]
VARIANTS = {
    # Nemotron Nano 2's layout: Mamba-2 with B/C groups (the gated norm per group), heads narrower than the width's
    # share (mamba_num_heads * mamba_head_dim is not 2 * hidden_size), wider attention heads, no step limit
    "nano2": lambda: transformers.NemotronHConfig(**COMMON, layers_block_type=BLOCKS, n_groups=2),
    # one group, an unbiased convolution, biased projections (transformers reads use_bias, mlx-lm mamba_proj_bias)
    # and MLPs, and a step floor (transformers 5 floors the
    # step at time_step_min, the releases' code at time_step_limit's: the two are set alike here)
    "biased": lambda: transformers.NemotronHConfig(**COMMON, layers_block_type=BLOCKS, n_groups=1, use_conv_bias=False,
                                                   use_bias=True, mamba_proj_bias=True, mlp_bias=True,
                                                   time_step_limit=(0.6, float("inf")),
                                                   time_step_min=0.6),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, VARIANTS, VOCAB)


def test_reads_the_block_kinds_sizes_and_names(checkpoints):
    """transformers saves the NVIDIA releases' names (``backbone.``, each block's ``mixer`` and ``norm``) and no
    num_hidden_layers: the block list counts the layers."""
    folder, _ = checkpoints["nano2"]
    assert "num_hidden_layers" not in json.loads((folder / "config.json").read_text())
    model = float32_model(folder)
    arch = model.config.arch
    assert [(s.mixer, s.mlp) for s in arch.layers] == [
        ("mamba2", "none"), ("none", "plain"), ("attention", "none"), ("none", "plain"), ("mamba2", "none"),
        ("mamba2", "none"), ("none", "plain")]
    assert arch.prefix == "backbone." and sorted(model.states.layers) == [0, 4, 5] and arch.kv_pool_layers == 1
    assert (arch.mamba2.num_heads, arch.mamba2.head_dim, arch.mamba2.num_groups) == (8, 12, 2)
    assert arch.layers[2].rope.rotary_dim == 0 and arch.attn_scale == pytest.approx(24 ** -0.5)
    assert float32_model(checkpoints["biased"][0]).config.arch.mamba2.dt_limit == (0.6, float("inf"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pattern_without_attention_runs(backend, tmp_path):
    """A block pattern of Mamba-2 and MLP blocks alone (no attention, so no KV pool layer and no layer to narrow
    past) loads and matches transformers; it failed with a bare ValueError."""
    hf = build_transformers_model(tmp_path, transformers.NemotronHConfig(
        **COMMON, layers_block_type=["linear_attention", "mlp", "linear_attention", "mlp"], n_groups=1))
    import torch

    model = float32_model(tmp_path, backend)
    assert model.config.arch.kv_pool_layers == 0
    with torch.no_grad():  # transformers' cache needs an attention layer to count its length: run without it
        want = hf(torch.tensor([TOKENS]), use_cache=False).logits[0].numpy()
    assert_forward_and_decode_match(model, TOKENS, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    """Decode steps too: each carries the convolution window and the state-space matrices of the step before."""
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_the_step_floor_and_the_group_norm_count(checkpoints):
    """Each is honoured: a model that dropped the floor, or normed all heads as one group, would miss the 1e-4 the
    match holds to."""
    from dataclasses import replace

    for variant, change in (("biased", lambda spec: {"spec": replace(spec, dt_limit=(0.0, float("inf")))}),
                            ("nano2", lambda spec: {"group_norm": None})):
        folder, hf = checkpoints[variant]
        model = float32_model(folder)
        for layer in model.layers:
            if layer.recurrent is not None:
                vars(layer.recurrent).update(change(layer.recurrent.spec))
        assert scaled_error(model.forward_verify("a", TOKENS), reference_logits(hf, TOKENS)) > 2e-4, variant


def test_the_releases_pattern_string_and_layer_count_read_alike(checkpoints, tmp_path):
    """The NVIDIA releases' config.json gives ``hybrid_override_pattern`` and num_hidden_layers."""
    folder, hf = checkpoints["nano2"]
    shutil.copytree(folder, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["layers_block_type"]
    config.update(hybrid_override_pattern="M-*-MM-", num_hidden_layers=7)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert scaled_error(float32_model(tmp_path / "m").forward_verify("a", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize(("change", "message"), [
    ({"hybrid_override_pattern": "M-X*", "num_hidden_layers": 4}, r"'hybrid_override_pattern' must list the blocks"),
    ({"layers_block_type": ["mamba", "conv"]}, "'layers_block_type' must list the blocks as 'linear_attention'"),
    ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act' is 'gelu'; Ferrum supports 'relu2'"),
])
def test_what_ferrum_does_not_run_is_refused_by_name(change, message):
    raw = {**json.loads(VARIANTS["nano2"]().to_json_string()), **change}
    if "hybrid_override_pattern" in change:
        del raw["layers_block_type"]
    with pytest.raises((UnsupportedFeatureError, ConfigError), match=message):
        ModelConfig.from_dict(raw)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    folder, hf = checkpoints["nano2"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["nano2"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("bits", [None, 8])
def test_mlx_lm_conversion_loads(checkpoints, tmp_path, bits):
    """mlx-lm's conversion keeps the releases' names and stores the convolution [C, K, 1]; float or packed, it runs
    on every backend as mlx-lm runs it."""
    folder, hf = checkpoints["biased"]
    stored, want = mlx_lm_converted(folder, tmp_path / "mlx", TOKENS, bits)
    assert stored["backbone.layers.0.mixer.conv1d.weight"].shape[-1] == 1
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    else:
        assert "backbone.layers.1.mixer.up_proj.scales" in stored
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    """ferrum.random_checkpoint (benchmarks, the JAX plugin's tests) writes Nemotron-H's tensors as stored."""
    raw = json.loads(VARIANTS[variant]().to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)
