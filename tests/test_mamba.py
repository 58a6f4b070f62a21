"""Mamba (``mamba``) and Falcon Mamba (``falcon_mamba``): blocks of one RMSNorm and one Mamba-1 mixer carrying a
convolution window and per-channel state-space matrices per sequence (``selective_scan``, API 1.19); against
transformers (and mlx-lm's conversions against mlx-lm) on every runnable backend, and the engine's batching, chunked
prefill, preemption and prefix caching over those states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_every_backend_runs_it_as_mlx_lm, mlx_lm_converted,
    float32_model, small_pool_engine,
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_random_checkpoint_is_what_transformers_reads, built_checkpoints, reference_logits,
    runnable_backends, scaled_error, staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, state_size=8, conv_kernel=4)
VARIANTS = {
    # mamba-*-hf's layout: tied embeddings, a biased convolution, unbiased projections, a step of rank 6
    "mamba": lambda: transformers.MambaConfig(**COMMON, time_step_rank=6),
    # Falcon Mamba 7B's: the step, B and C RMS-normed without weights (a large eps here, so that it shows), an
    # untied head; with biased projections and an unbiased convolution, the rank "auto" (hidden / 16)
    "falcon": lambda: transformers.FalconMambaConfig(**COMMON, expand=3, mixer_rms_eps=0.3, use_bias=True,
                                                     use_conv_bias=False, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, VARIANTS, VOCAB)


def test_reads_the_blocks_sizes_and_names(checkpoints):
    """transformers saves the releases' names (``backbone.embeddings``, each block's ``norm`` and ``mixer``,
    ``norm_f``); no layer attends, so the KV pool holds none."""
    model = float32_model(checkpoints["mamba"][0])
    arch = model.config.arch
    assert [(s.mixer, s.mlp) for s in arch.layers] == [("mamba", "none")] * 3 and arch.kv_pool_layers == 0
    assert arch.prefix == "backbone." and model.config.tie_word_embeddings
    assert (arch.mamba.inner, arch.mamba.state_size, arch.mamba.dt_rank, arch.mamba.inner_norms) == (128, 8, 6, None)
    falcon = float32_model(checkpoints["falcon"][0]).config.arch.mamba
    assert (falcon.inner, falcon.dt_rank, falcon.inner_norms, falcon.norm_eps) == (192, 4, "weightless", 0.3)
    assert (falcon.conv_bias, falcon.proj_bias) == (False, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    """Decode steps too: each carries the convolution window and the state-space matrices of the step before."""
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_falcon_mambas_norms_count(checkpoints):
    """Run without its step / B / C norms, Falcon Mamba misses transformers' logits by far more than the match
    holds to."""
    folder, hf = checkpoints["falcon"]
    model = float32_model(folder)
    for layer in model.layers:
        layer.recurrent.norms = None
    assert scaled_error(model.forward_verify("a", TOKENS), reference_logits(hf, TOKENS)) > 1e-2


def test_the_releases_config_reads_as_transformers_does(checkpoints, tmp_path):
    """mamba-*-hf's config.json gives intermediate_size beside expand, and mamba_ssm's keys (rms_norm, n_layer...)
    transformers ignores."""
    folder, hf = checkpoints["mamba"]
    raw = {**json.loads((folder / "config.json").read_text()), "rms_norm": True, "fused_add_norm": True,
           "n_layer": 3}
    assert ModelConfig.from_dict(raw).arch.mamba.inner == 128


@pytest.mark.parametrize(("change", "message", "error"), [
    ({"hidden_act": "gelu"}, "'hidden_act' is 'gelu'", UnsupportedFeatureError),
    ({"rms_norm": False}, "'rms_norm' is False", UnsupportedFeatureError),
    ({"time_step_rank": "big"}, "'time_step_rank' must be a positive integer or \"auto\"", ConfigError),
])
def test_what_ferrum_does_not_run_is_refused_by_name(change, message, error):
    raw = {**json.loads(VARIANTS["mamba"]().to_json_string()), **change}
    with pytest.raises(error, match=message):
        ModelConfig.from_dict(raw)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    folder, hf = checkpoints["falcon"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoints, monkeypatch):
    folder, hf = checkpoints["mamba"]
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), hf, TOKENS, "selective_scan", monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["falcon"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def assert_next_turn_from_the_prefix_cache_is_transformers(folder, hf, backend: str) -> None:
    """A second turn (the first's prompt and reply, then more) is served partly from the prefix cache (the states
    kept at a block boundary) and gives transformers' greedy tokens; so does a batch of it beside a shorter prompt."""
    import torch

    import ferrum

    llm = ferrum.load(folder, backend=backend, dtype="float32")
    first = llm.run([TOKENS], max_tokens=4, temperature=0.0, ignore_eos=True)[0]
    turn = [*TOKENS, *first.token_ids, 5, 6, 7]
    second = llm.run([turn], max_tokens=6, temperature=0.0, ignore_eos=True)[0]
    assert llm.engine.metrics().prefix_cache_hit_tokens > 0
    with torch.no_grad():
        want = hf.generate(torch.tensor([turn]), max_new_tokens=6, do_sample=False)[0, len(turn):].tolist()
    assert list(second.token_ids) == want
    assert_generates_greedily_as_transformers(folder, hf, backend, turn, max_tokens=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cached_requests_generate_transformers_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["mamba"]
    assert_next_turn_from_the_prefix_cache_is_transformers(folder, hf, backend)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
@pytest.mark.parametrize(("variant", "bits"), [("mamba", None), ("falcon", None), ("mamba", 4)])
def test_mlx_lm_conversion_loads(checkpoints, tmp_path, variant, bits):
    """mlx-lm's conversion keeps the releases' names and stores the convolution [C, K, 1]; float or packed, it runs
    on every backend as mlx-lm runs it (Falcon Mamba as mlx-lm's mamba with use_bcdt_rms)."""
    folder, hf = checkpoints[variant]
    stored, want = mlx_lm_converted(folder, tmp_path / "mlx", TOKENS, bits)
    assert stored["backbone.layers.0.mixer.conv1d.weight"].shape[-1] == 1
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    else:
        assert "backbone.layers.1.mixer.in_proj.scales" in stored
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    """ferrum.random_checkpoint (benchmarks, the JAX plugin's tests) writes Mamba's tensors as stored."""
    raw = json.loads(VARIANTS[variant]().to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)


def test_lora_is_refused_as_on_a_model_without_attention(checkpoints, tmp_path):
    """Not as on a hybrid model (which Mamba is not)."""
    from ferrum.errors import AdapterError
    from ferrum.model import DecoderOnlyLLM

    folder = next(iter(checkpoints.values()))[0]
    with pytest.raises(AdapterError, match=r"recurrent models \(no attention layers\).*Mamba layers' projections"):
        DecoderOnlyLLM.from_pretrained(folder, backend="cpu").adapters.load("x", tmp_path)
