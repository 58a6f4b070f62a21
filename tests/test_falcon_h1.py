"""Falcon-H1 (``falcon_h1``): every layer runs attention and a Mamba-2 mixer side by side on its normed input and adds
both outputs (``LayerSpec.beside``), with muP multipliers folded into the weights at load; against transformers (and
mlx-lm's conversions against mlx-lm) on every runnable backend, and the engine's batching, chunked prefill,
preemption and prefix caching over a layer that holds both K/V and a recurrent state."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

import ferrum
from ferrum.config import ModelConfig
from ferrum.errors import AdapterError, ConfigError, UnsupportedFeatureError
from support import (
    float32_model, small_pool_engine,
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_random_checkpoint_is_what_transformers_reads, build_transformers_model, built_checkpoints, mlx_lm_logits,
    reference_logits, runnable_backends, scaled_error, staggered_greedy_workload, with_v4_rope_keys, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
#: Every multiplier away from 1 and from the others, so that one applied to the wrong projection shows.
MULTIPLIERS = dict(embedding_multiplier=2.0, lm_head_multiplier=0.5, attention_in_multiplier=0.7,
                   attention_out_multiplier=0.9, key_multiplier=0.4, ssm_in_multiplier=1.25, ssm_out_multiplier=0.3,
                   mlp_multipliers=[0.8, 0.6], ssm_multipliers=[0.35, 0.25, 0.4, 0.5, 0.3])
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, mamba_d_ssm=96, mamba_n_heads=6, mamba_d_head="auto",
              mamba_d_state=8, mamba_d_conv=4, max_position_embeddings=256, **MULTIPLIERS)
VARIANTS = {
    # 1.5B-Deep / 3B / 7B / 34B: the gated norm (gate, then norm, per group of heads), an untied head, two B/C
    # groups, biased projections and a step limit
    "gated": lambda: transformers.FalconH1Config(**COMMON, mamba_n_groups=2, mamba_rms_norm=True,
                                                 mamba_norm_before_gate=False, tie_word_embeddings=False,
                                                 attention_bias=True, mlp_bias=True, mamba_proj_bias=True,
                                                 projectors_bias=True, time_step_limit=(0.3, 1.2)),
    # 0.5B: no norm in the mixer, tied embeddings
    "plain": lambda: transformers.FalconH1Config(**COMMON, mamba_n_groups=1, mamba_rms_norm=False,
                                                 tie_word_embeddings=True),
    # transformers' default order: the norm, then the gate
    "norm_first": lambda: transformers.FalconH1Config(**COMMON, mamba_n_groups=2, mamba_rms_norm=True,
                                                      mamba_norm_before_gate=True, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, VARIANTS, VOCAB)


def test_every_layer_attends_and_carries_a_state(checkpoints):
    model = float32_model(checkpoints["gated"][0])
    arch = model.config.arch
    assert [(s.mixer, s.beside) for s in arch.layers] == [("attention", "mamba2")] * 3
    assert sorted(model.states.layers) == [0, 1, 2] and arch.kv_pool_layers == 3 and arch.recurrent
    assert (arch.mamba2.inner, arch.mamba2.head_dim, arch.mamba2.gate) == (96, 16, "before_norm")
    assert (arch.embed_scale, arch.logit_scale) == (2.0, 0.5)
    assert float32_model(checkpoints["plain"][0]).config.arch.mamba2.gate == "no_norm"
    assert float32_model(checkpoints["norm_first"][0]).config.arch.mamba2.gate == "after_norm"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def _with_config(folder, destination, **changes):
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    (destination / "config.json").write_text(json.dumps({**config, **changes}))
    return destination


@pytest.mark.parametrize("key", [*MULTIPLIERS, "mamba_norm_before_gate"])
def test_each_multiplier_and_the_norm_order_count(checkpoints, tmp_path, key):
    """Each multiplier (and ssm_multipliers' every part) is applied: the model read with it at 1 misses
    transformers' logits."""
    folder, hf = checkpoints["gated"]
    want = reference_logits(hf, TOKENS)
    values = {"mlp_multipliers": [[1.0, 0.6], [0.8, 1.0]], "mamba_norm_before_gate": [True],
              "ssm_multipliers": [[0.35, 0.25, 0.4, 0.5, 0.3][:i] + [1.0] + [0.35, 0.25, 0.4, 0.5, 0.3][i + 1:]
                                  for i in range(5)]}.get(key, [1.0])
    for n, value in enumerate(values):
        changed = float32_model(_with_config(folder, tmp_path / str(n), **{key: value}))
        assert scaled_error(changed.forward_verify("a", TOKENS), want) > 1e-3, value


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    folder, hf = checkpoints["gated"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoints, monkeypatch):
    """A batch that fails in its third scan, after K/V was written and two layers made new states, changes
    nothing."""
    folder, hf = checkpoints["plain"]
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), hf, TOKENS, "ssd_update", monkeypatch)


def test_speculative_decoding_and_lora_are_refused(checkpoints, tmp_path):
    folder, _ = checkpoints["plain"]
    with pytest.raises(UnsupportedFeatureError, match="speculative decoding cannot run 'falcon_h1'"):
        ferrum.load(folder, backend="cpu", speculative="lookup")
    with pytest.raises(AdapterError, match=r"Mamba-2 layers' projections"):
        float32_model(folder).adapters.load("x", tmp_path)


@pytest.mark.parametrize("value", [[1.0], [1, 2, 3, 4, "a"], 3.0])
def test_malformed_multiplier_lists_are_refused_by_name(value):
    raw = {**VARIANTS["plain"]().to_dict(), "ssm_multipliers": value}
    with pytest.raises(ConfigError, match="ssm_multipliers"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["gated"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def test_prefix_caching_gives_transformers_greedy_tokens(checkpoints):
    folder, hf = checkpoints["gated"]
    assert_generates_greedily_as_transformers(folder, hf, "cpu", TOKENS + TOKENS[:7])


#: What mlx-lm converts as transformers runs it: its conversion scales k_proj by attention_in_multiplier alone
#: (its key_multiplier rule names a "key_proj" no checkpoint has) and leaves v_proj unscaled, and its gated norm
#: takes every head as one group; at 1 and one group those differences vanish.
MLX_LM = dict(COMMON, key_multiplier=1.0, attention_in_multiplier=1.0, mamba_n_groups=1)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("tied", [True, False])
def test_mlx_lm_conversions_match_mlx_lm(tmp_path, tied):
    """mlx-lm's conversion folds the multipliers into the weights (the embeddings' too, divided back out of a tied
    head) and stores the convolution [C, K, 1]: read so, it runs on every backend as mlx-lm runs it, in float and
    quantized to 4 bits. Under MLX_LM's settings, where mlx-lm's own model runs transformers' math, so that its
    logits are the reference for the 4-bit conversion too (the test below covers the multipliers it leaves out)."""
    from mlx_lm.convert import convert

    source = tmp_path / "hf"
    hf = build_transformers_model(source, transformers.FalconH1Config(**MLX_LM, mamba_rms_norm=tied,
                                                                      tie_word_embeddings=tied))
    write_tokenizer(source, VOCAB)
    with_v4_rope_keys(source, tmp_path / "v4")
    for quantize in (False, True):
        converted = tmp_path / f"mlx{quantize}"
        convert(str(tmp_path / "v4"), str(converted), quantize=quantize, q_bits=4, q_group_size=32)
        assert load_file(converted / "model.safetensors")["model.layers.0.mamba.conv1d.weight"].shape[-1] == 1
        want = mlx_lm_logits(converted, TOKENS)
        if not quantize:
            assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
        for backend in BACKENDS:
            assert scaled_error(float32_model(converted, backend).forward_verify("m", TOKENS), want) <= 1e-4, (backend,
                                                                                                   quantize)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
def test_mlx_lm_conversions_run_as_transformers_runs_the_model(checkpoints, tmp_path):
    """mlx-lm's conversion leaves key_multiplier and v_proj's attention_in_multiplier out of the weights and every
    multiplier out of the biases: Ferrum applies them, and the conversion of a model with all of them away from 1,
    biased projections and two B/C groups gives transformers' logits on every backend."""
    from mlx_lm.convert import convert

    folder, hf = checkpoints["gated"]
    with_v4_rope_keys(folder, tmp_path / "v4")
    convert(str(tmp_path / "v4"), str(tmp_path / "mlx"), dtype="float32")
    assert load_file(tmp_path / "mlx" / "model.safetensors")["model.layers.0.mamba.conv1d.weight"].shape[-1] == 1
    want = reference_logits(hf, TOKENS)
    for backend in BACKENDS:
        assert scaled_error(float32_model(tmp_path / "mlx", backend).forward_verify("m", TOKENS), want) <= 1e-4, backend


@pytest.mark.parametrize("variant", ["gated", "plain"])
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    raw = json.loads(VARIANTS[variant]().to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)


def test_a_mixer_beside_attention_in_parallel_blocks_is_refused_when_built():
    """A parallel block's attention runs the MLP in its first half, which the Beside kind's blocks do not."""
    import dataclasses

    arch = ModelConfig.from_dict(VARIANTS["plain"]().to_dict()).arch
    with pytest.raises(UnsupportedFeatureError, match="layer 0 runs mamba2 beside attention, which Ferrum does not run "
                                                      "in parallel blocks"):
        dataclasses.replace(arch, parallel=True)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
@pytest.mark.parametrize("tied", [True, False])
def test_ferrum_quantize_writes_mlx_lms_conversion(tmp_path, tied):
    """``ferrum quantize`` wrote the taps as transformers stores them, [C, 1, K], and the multipliers unfolded: mlx-lm's
    sanitize took that for an unconverted checkpoint and multiplied the packed words by the multipliers (mlx-lm failed
    to run it). Now it writes mlx-lm's own 4-bit conversion, tensor for tensor, which mlx-lm and every backend run
    alike (under MLX_LM's settings, as in test_mlx_lm_conversions_match_mlx_lm)."""
    from mlx_lm.convert import convert

    from ferrum.quant.convert import quantize_checkpoint

    source = tmp_path / "hf"
    build_transformers_model(source, transformers.FalconH1Config(**MLX_LM, mamba_rms_norm=tied,
                                                                 tie_word_embeddings=tied))
    write_tokenizer(source, VOCAB)
    convert(str(with_v4_rope_keys(source, tmp_path / "v4")), str(tmp_path / "mlx"), quantize=True, q_bits=4,
            q_group_size=32)
    ours = quantize_checkpoint(source, tmp_path / "ferrum", bits=4, group_size=32)
    stored, theirs = load_file(ours / "model.safetensors"), load_file(tmp_path / "mlx" / "model.safetensors")
    assert sorted(stored) == sorted(theirs)
    for name, array in theirs.items():
        np.testing.assert_array_equal(stored[name], array, err_msg=name)
    want = mlx_lm_logits(with_v4_rope_keys(ours, tmp_path / "ferrum_v4"), TOKENS)
    for backend in BACKENDS:
        assert scaled_error(float32_model(ours, backend).forward_verify("q", TOKENS), want) <= 1e-4, backend


@pytest.mark.parametrize("variant", ["gated", "plain"])
def test_ferrum_quantize_folds_each_multiplier_as_ferrum_reads_it_back(checkpoints, tmp_path, variant):
    """Every multiplier away from 1, biases, two B/C groups: at a group size that divides no matrix nothing is packed,
    so the folded conversion (taps [C, K, 1]) must give transformers' logits on every backend as they are."""
    import warnings

    from ferrum.quant.convert import quantize_checkpoint

    folder, hf = checkpoints[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = quantize_checkpoint(folder, tmp_path / "ferrum", bits=4, group_size=128)
    stored = load_file(ours / "model.safetensors")
    assert stored["model.layers.0.mamba.conv1d.weight"].shape == (96 + 2 * 8 * (2 if variant == "gated" else 1), 4, 1)
    assert not any(name.endswith(".scales") for name in stored)
    want = reference_logits(hf, TOKENS)
    for backend in BACKENDS:
        assert scaled_error(float32_model(ours, backend).forward_verify("q", TOKENS), want) <= 1e-4, backend
