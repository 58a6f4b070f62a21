"""Zyphra's Zamba 2 (``zamba2``): Mamba-2 layers, and hybrid layers that run a shared attention + MLP block (one of
num_mem_blocks, each use with its own adapters, linear and KV pool layer) on ``[x, embeddings]`` before their
Mamba-2; against transformers on every runnable backend, and the engine's batching, chunked prefill, preemption and
prefix caching over those states."""

from __future__ import annotations

import json
import numpy as np
import pytest
import transformers

from ferrum.arch.shared_block import SharedBlockLayer, SharedBlockSpec
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_engine_keeps_greedy_tokens,
    assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_random_checkpoint_is_what_transformers_reads, built_checkpoints, float32_model, reference_logits,
    runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
LAYERS = ["mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"]
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, layers_block_type=LAYERS, mamba_d_state=8,
              n_mamba_heads=4, num_attention_heads=4, intermediate_size=48, adapter_rank=4,
              max_position_embeddings=256)
VARIANTS = {
    # Zamba2-1.2B's layout: one shared block, adapters on q/k/v too, rope, a tied head
    "one_block": lambda: transformers.Zamba2Config(**COMMON, num_mem_blocks=1, use_shared_attention_adapter=True,
                                                   use_mem_rope=True),
    # Zamba2-2.7B's / 7B's: two blocks in turn (the third use reads the first's), the MLP's adapters alone, no rope;
    # here with two B/C groups and fewer key/value heads
    "two_blocks": lambda: transformers.Zamba2Config(**COMMON, num_mem_blocks=2, num_key_value_heads=2,
                                                    mamba_ngroups=2),
    # an untied head: transformers 5 then ties no block either, and each use runs a block of its own
    "untied": lambda: transformers.Zamba2Config(**COMMON, num_mem_blocks=2, use_shared_attention_adapter=True,
                                                tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, VARIANTS, VOCAB)


def test_each_use_attends_its_own_pool_layer_and_reads_its_blocks_weights_once(checkpoints):
    model = float32_model(checkpoints["two_blocks"][0])
    arch = model.config.arch
    assert [s.mixer for s in arch.layers] == ["mamba2", "shared_mamba2"] * 3
    assert [s.shared_use for s in arch.layers] == [None, 0, None, 1, None, 2]
    assert arch.kv_pool_layers == 3 and sorted(model.states.layers) == list(range(6))
    assert model.config.head_dim == 16  # 2 * hidden / heads
    first, third = model.layers[1].recurrent, model.layers[5].recurrent
    assert first.o.weight is third.o.weight and first.down.weight is third.down.weight  # block 0, placed once
    assert first.gate_up.downs[0].weight is not third.gate_up.downs[0].weight  # each use's own adapter
    assert model.layers[3].recurrent.o.weight is not first.o.weight  # block 1
    untied = float32_model(checkpoints["untied"][0])
    assert untied.layers[1].recurrent.o.weight is not untied.layers[5].recurrent.o.weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_each_use_runs_its_own_adapters(checkpoints, monkeypatch):
    """Read with every use taking the first use's adapters, the model misses transformers' logits."""
    folder, hf = checkpoints["one_block"]
    monkeypatch.setattr(SharedBlockSpec, "layer", lambda self, ops, tensor, projection, eps, use: SharedBlockLayer(
        self, ops, tensor, projection, eps, use % self.num_blocks))
    assert scaled_error(float32_model(folder).forward_verify("a", TOKENS), reference_logits(hf, TOKENS)) > 1e-3


def test_the_releases_layer_names_read_as_transformers_remaps_them(checkpoints):
    raw = json.loads((checkpoints["two_blocks"][0] / "config.json").read_text())
    assert raw["layers_block_type"][0] == "linear_attention"  # transformers 5 saves them remapped
    legacy = ModelConfig.from_dict({**raw, "layers_block_type": LAYERS})
    assert legacy.arch.layers == ModelConfig.from_dict(raw).arch.layers


@pytest.mark.parametrize("key, value, error", [
    ("layers_block_type", ["mamba"] * 5 + ["attention"], ConfigError),
    ("layers_block_type", ["mamba"] * 4, ConfigError),
    ("add_bias_linear", True, UnsupportedFeatureError),
    ("hidden_act", "silu", UnsupportedFeatureError),
    ("num_key_value_heads", 2, ConfigError),  # with q/k/v adapters, whose k and v give every head
])
def test_unsupported_or_malformed_configs_are_refused_by_name(key, value, error):
    raw = {**VARIANTS["one_block"]().to_dict(), key: value}
    with pytest.raises(error, match=key):
        ModelConfig.from_dict(raw)


def test_use_long_context_extends_the_context_as_transformers_does():
    raw = VARIANTS["two_blocks"]().to_dict()
    assert ModelConfig.from_dict({**raw, "use_long_context": True}).max_seq_len == 16384


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    folder, hf = checkpoints["one_block"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["two_blocks"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def test_prefix_caching_gives_transformers_greedy_tokens(checkpoints):
    folder, hf = checkpoints["one_block"]
    assert_generates_greedily_as_transformers(folder, hf, "cpu", TOKENS + TOKENS[:7])


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    raw = json.loads(VARIANTS[variant]().to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)


def test_every_mamba_layers_gated_norm_runs_at_transformers_fixed_epsilon(tmp_path):
    """transformers' Zamba2RMSNormGated runs at 1e-5 in every Mamba-2 layer, plain or hybrid, whatever rms_norm_eps
    (which the other norms read): 1e-2 here, far enough from it to move the logits."""
    raw = {**json.loads(VARIANTS["two_blocks"]().to_json_string()), "rms_norm_eps": 1e-2}
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / "eps", raw, TOKENS)


def test_lora_adapters_are_refused_naming_the_shared_attention(checkpoints, tmp_path):
    """The hybrid layers attend (the shared blocks): a hybrid model, not one without attention layers."""
    from ferrum.errors import AdapterError

    folder, _ = checkpoints["one_block"]
    with pytest.raises(AdapterError, match=r"zamba2: LoRA adapters on hybrid models with recurrent layers .* the "
                                           r"Mamba-2 layers' projections nor the shared attention blocks'"):
        float32_model(folder).adapters.load("x", tmp_path)
