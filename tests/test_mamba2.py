"""Pure Mamba-2 (``mamba2``: state-spaces' mamba2-*, Mamba-Codestral): every block an RMSNorm and a Mamba-2 mixer
carrying a state per sequence, no attention and no KV; against transformers (and mlx-lm's conversion against
mlx-lm) on every runnable backend, and the engine's batching, chunked prefill, preemption and prefix caching."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from support import (
    float32_model, small_pool_engine,
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_random_checkpoint_is_what_transformers_reads, build_transformers_model, built_checkpoints, mlx_lm_logits,
    reference_logits, runnable_backends, scaled_error, staggered_greedy_workload, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_heads=8, head_dim=16, state_size=16,
              expand=2, conv_kernel=4)
VARIANTS = {
    # Mamba-Codestral's layout: B/C groups (the gated norm per group), an untied head, no step limit
    "grouped": lambda: transformers.Mamba2Config(**COMMON, n_groups=2, tie_word_embeddings=False),
    # state-spaces' mamba2-*: one group, a tied head; biased projections, an unbiased convolution, a step limit
    "tied": lambda: transformers.Mamba2Config(**COMMON, n_groups=1, tie_word_embeddings=True, use_bias=True,
                                              use_conv_bias=False, time_step_limit=(0.3, 1.2)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, VARIANTS, VOCAB)


def test_every_block_is_a_mamba2_mixer_without_kv(checkpoints):
    model = float32_model(checkpoints["grouped"][0])
    arch = model.config.arch
    assert [(s.mixer, s.mlp) for s in arch.layers] == [("mamba2", "none")] * 3
    assert sorted(model.states.layers) == [0, 1, 2] and arch.kv_pool_layers == 0 and arch.prefix == "backbone."
    assert (arch.mamba2.num_heads, arch.mamba2.head_dim, arch.mamba2.num_groups) == (8, 16, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_the_first_releases_embedding_name_loads(checkpoints, tmp_path):
    """state-spaces' first conversions store ``backbone.embedding`` (transformers renames it on load)."""
    folder, hf = checkpoints["grouped"]
    shutil.copytree(folder, tmp_path / "old")
    tensors = load_file(tmp_path / "old" / "model.safetensors")
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    save_file(tensors, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    got = float32_model(tmp_path / "old").forward_verify("a", TOKENS)
    assert scaled_error(got, reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("change", [{"num_heads": 6}, {"n_groups": 3}, {"time_step_limit": [2.0, 1.0]}])
def test_inconsistent_sizes_are_refused_by_name(change):
    raw = {**VARIANTS["grouped"]().to_dict(), **change}
    with pytest.raises(ConfigError, match=next(iter(change))):
        ModelConfig.from_dict(raw)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    folder, hf = checkpoints["grouped"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoints, monkeypatch):
    folder, hf = checkpoints["tied"]
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), hf, TOKENS, "ssd_update", monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["grouped"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def test_prefix_caching_gives_transformers_greedy_tokens(checkpoints):
    folder, hf = checkpoints["tied"]
    assert_generates_greedily_as_transformers(folder, hf, "cpu", TOKENS + TOKENS[:7])


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
def test_mlx_lm_conversion_matches_mlx_lm(tmp_path):
    """mlx-lm's conversion stores the convolution [C, K, 1]; it runs on every backend as mlx-lm runs it, in float and
    quantized to 4 bits. (mlx-lm reads intermediate_size, which transformers' config does not save, and norms all
    heads as one group: one group here.)"""
    from mlx_lm.convert import convert

    source = tmp_path / "hf"
    hf = build_transformers_model(source, transformers.Mamba2Config(**COMMON, n_groups=1))
    write_tokenizer(source, VOCAB)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    for quantize in (False, True):
        converted = tmp_path / f"mlx{quantize}"
        convert(str(source), str(converted), quantize=quantize, q_bits=4, q_group_size=32)
        assert load_file(converted / "model.safetensors")["backbone.layers.0.mixer.conv1d.weight"].shape[-1] == 1
        want = mlx_lm_logits(converted, TOKENS)
        if not quantize:
            assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
        for backend in BACKENDS:
            assert scaled_error(float32_model(converted, backend).forward_verify("m", TOKENS), want) <= 1e-4, (backend,
                                                                                                   quantize)


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    raw = json.loads(VARIANTS[variant]().to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)
