"""IBM's Bamba (``bamba``): Mamba-2 layers carrying a state per sequence with attention layers at attn_layer_indices
(rope on half of each head's dims), a gated MLP after each; against transformers on every runnable backend, and the
engine's batching, chunked prefill, preemption and prefix caching over those states."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from support import (
    float32_model, small_pool_engine,
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_engine_keeps_greedy_tokens,
    assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_random_checkpoint_is_what_transformers_reads, built_checkpoints, reference_logits, runnable_backends,
    scaled_error, staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_d_state=16, mamba_d_conv=4,
              mamba_expand=2, max_position_embeddings=256)
VARIANTS = {
    # Bamba-9B's layout: one B/C group, unbiased projections, no step limit, an untied head
    "released": lambda: transformers.BambaConfig(**COMMON, mamba_n_groups=1, tie_word_embeddings=False),
    # two groups (the gated norm per group), biased projections and attention, a step limit, a tied head
    "grouped": lambda: transformers.BambaConfig(**COMMON, mamba_n_groups=2, mamba_proj_bias=True, attention_bias=True,
                                                mlp_bias=True, time_step_limit=(0.3, 1.2), tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, VARIANTS, VOCAB)


def test_reads_the_layer_kinds_and_the_half_rotary_heads(checkpoints):
    model = float32_model(checkpoints["grouped"][0])
    arch = model.config.arch
    assert [s.mixer for s in arch.layers] == ["mamba2", "attention", "mamba2", "attention"]
    assert sorted(model.states.layers) == [0, 2] and arch.kv_pool_layers == 2
    assert arch.layers[1].rope.rotary_dim == 8 and arch.mamba2.num_groups == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_rope_turns_half_of_each_head(checkpoints, monkeypatch):
    """Read with every dim rotated, the model misses transformers' logits: the half is honoured."""
    folder, hf = checkpoints["released"]
    config = ModelConfig.from_file(folder)
    rope = replace(config.arch.layers[1].rope, rotary_dim=16)
    whole = replace(config, arch=replace(config.arch, layers=tuple(replace(s, rope=rope) for s in config.arch.layers)))
    monkeypatch.setattr(ModelConfig, "from_file", classmethod(lambda cls, path: whole))
    assert scaled_error(float32_model(folder).forward_verify("a", TOKENS), reference_logits(hf, TOKENS)) > 1e-3


@pytest.mark.parametrize("indices", [[4], "1", [True], [-1]])
def test_malformed_attention_indices_are_refused_by_name(indices):
    raw = {**VARIANTS["released"]().to_dict(), "attn_layer_indices": indices}
    with pytest.raises(ConfigError, match="attn_layer_indices"):
        ModelConfig.from_dict(raw)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    folder, hf = checkpoints["grouped"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["released"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def test_prefix_caching_gives_transformers_greedy_tokens(checkpoints):
    folder, hf = checkpoints["grouped"]
    assert_generates_greedily_as_transformers(folder, hf, "cpu", TOKENS + TOKENS[:7])


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    raw = json.loads(VARIANTS[variant]().to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)
