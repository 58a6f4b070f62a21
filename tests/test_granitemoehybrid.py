"""Granite 4.0-H (``granitemoehybrid``): Mamba-2 layers carrying a state per sequence between attention layers
(NoPE or rope), Granite's multipliers, experts with a shared MLP or the shared MLP alone, against transformers (and
mlx-lm's conversion against mlx-lm) on every runnable backend; and the engine's batching, chunked prefill and
preemption over those states."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

import ferrum
from ferrum.errors import AdapterError, ConfigError, UnsupportedFeatureError
from ferrum.sampling import SamplingParams
from support import (
    float32_model, small_pool_engine,
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_engine_keeps_greedy_tokens,
    assert_forward_and_decode_match, assert_random_checkpoint_is_what_transformers_reads, build_transformers_model,
    built_checkpoints, mlx_lm_logits, reference_logits, runnable_backends, scaled_error, staggered_greedy_workload,
    write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=8,
              mamba_d_state=16, mamba_d_head=16, mamba_d_conv=4, mamba_expand=2, shared_intermediate_size=40,
              embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.5,
              max_position_embeddings=256, tie_word_embeddings=False)
VARIANTS = {
    # H-Micro / 1B / 350M: the shared MLP alone, no rope, two B/C groups of heads, no step limit
    "dense": lambda: transformers.GraniteMoeHybridConfig(**COMMON, num_local_experts=0, mamba_n_groups=2,
                                                         position_embedding_type="nope"),
    # H-Tiny / H-Small: experts beside the shared MLP, rope, a step limit that clips both ends
    "moe": lambda: transformers.GraniteMoeHybridConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                       mamba_n_groups=1, position_embedding_type="rope",
                                                       time_step_limit=(0.3, 1.2)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, VARIANTS, VOCAB)


def test_reads_layer_kinds_positions_multipliers_and_mlps(checkpoints):
    dense, moe = (float32_model(checkpoints[name][0]) for name in ("dense", "moe"))
    arch = dense.config.arch
    assert [spec.mixer for spec in arch.layers] == ["mamba2", "attention", "mamba2", "mamba2"]
    assert sorted(dense.states.layers) == [0, 2, 3] and arch.mamba2.num_groups == 2
    assert arch.layers[1].rope.rotary_dim == 0 and moe.config.arch.layers[1].rope.rotary_dim == 16
    assert (arch.embed_scale, arch.residual_scale, arch.attn_scale, arch.logit_scale) == (3.0, 0.5, 0.2, 0.4)
    assert [s.mlp for s in arch.layers] == ["dense"] * 4 and dense.config.intermediate_size == 40
    assert [s.mlp for s in moe.config.arch.layers] == ["moe"] * 4
    assert moe.config.arch.moe.expert_size == 48 and moe.config.arch.moe.shared_expert_size == 40
    assert moe.config.arch.mamba2.dt_limit == (0.3, 1.2) and arch.mamba2.dt_limit == (0.0, float("inf"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    """Decode steps too: each carries the convolution window and the state-space matrices of the step before.
    (transformers' own decode path leaves the step limit out; its full pass, the reference, applies it.)"""
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_the_step_limit_and_the_convolution_bias_count(checkpoints):
    """Each is honoured: a model that ignored the limit, or dropped the bias, would miss the 1e-4 the match holds
    to."""
    folder, hf = checkpoints["moe"]
    want = reference_logits(hf, TOKENS)
    model_spec = float32_model(folder).config.arch.mamba2
    for change in ({"spec": replace(model_spec, dt_limit=(0.0, float("inf")))},
                   {"conv_bias": None}):
        model = float32_model(folder)
        for layer in model.layers:
            if layer.recurrent is not None:
                vars(layer.recurrent).update(change)
        assert scaled_error(model.forward_verify("a", TOKENS), want) > 2e-4, change
    assert model_spec.dt_limit == (0.3, 1.2)


@pytest.mark.parametrize("limit", [5, "abc", [1], [2.0, 1.0], [-1, 2]])
def test_a_malformed_step_limit_is_refused_by_name(limit):
    """time_step_limit is [min, max]; a number was read with len() and escaped as a TypeError."""
    from ferrum.config import ModelConfig

    raw = {**VARIANTS["dense"]().to_dict(), "time_step_limit": limit}
    with pytest.raises(ConfigError, match="time_step_limit"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_on_another_thread_than_the_load(checkpoints, backend):
    """The engine's thread (llm.astream, ferrum serve) runs passes on a model loaded on another: the convolution's
    bias, reshaped lazily at load, was tied to the loading thread's MLX stream, and every such pass failed."""
    import threading

    folder, hf = checkpoints["moe"]
    model = float32_model(folder, backend)
    got = {}
    thread = threading.Thread(target=lambda: got.update(logits=model.forward_verify("t", TOKENS)))
    thread.start()
    thread.join()
    assert scaled_error(got["logits"], reference_logits(hf, TOKENS)) <= 1e-4


def test_finished_requests_leave_no_states(checkpoints):
    """The scheduler releases a finished request's KV alone; its recurrent states stayed in the store, pinning
    their batch's arrays, until a later pass pruned them."""
    engine = small_pool_engine(checkpoints["dense"][0])
    ids = [engine.add_request(TOKENS[: 5 + i], SamplingParams(max_tokens=3, ignore_eos=True)) for i in range(3)]
    while engine.has_unfinished():
        engine.step()
    assert not engine.model.kv.sequences() and not any(request in engine.model.states for request in ids)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    folder, hf = checkpoints["dense"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


def test_speculative_decoding_and_lora_are_refused_and_the_cache_cannot_be_cut_back(checkpoints, tmp_path):
    folder, _ = checkpoints["dense"]
    with pytest.raises(UnsupportedFeatureError, match="speculative decoding cannot run 'granitemoehybrid'"):
        ferrum.load(folder, backend="cpu", speculative="lookup")
    with pytest.raises(AdapterError, match=r"\(Ferrum does not adapt the Mamba-2 layers' projections\); run"):
        float32_model(folder).adapters.load("x", tmp_path)
    model = float32_model(folder)
    model.prefill("s", TOKENS)
    with pytest.raises(UnsupportedFeatureError, match="cannot be cut back"):
        model.truncate_kv("s", 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["dense"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("variant", VARIANTS)
def test_mlx_lm_conversion_loads(checkpoints, tmp_path, variant):
    """mlx-lm's conversion stacks the experts in switch_mlp, renames a dense model's shared MLP to mlp.gate_proj /
    up_proj / down_proj and stores the convolution [C, K, 1]: it runs on every backend as mlx-lm runs it (mlx-lm
    reads transformers 4's layer type names). The dense model is built as the dense releases are: mlx-lm sizes its
    MLP by intermediate_size, which they set to shared_intermediate_size, and norms all heads as one group, as
    their one group of B/C does."""
    from mlx_lm.convert import convert

    source, converted = tmp_path / "hf", tmp_path / "mlx"
    if variant == "dense":
        config = VARIANTS["dense"]()
        config.mamba_n_groups, config.intermediate_size = 1, config.shared_intermediate_size
        hf = build_transformers_model(source, config)
        write_tokenizer(source, VOCAB)
    else:
        folder, hf = checkpoints[variant]
        shutil.copytree(folder, source)
    config = json.loads((source / "config.json").read_text())
    config["layer_types"] = [{"linear_attention": "mamba", "full_attention": "attention"}[t]
                             for t in config["layer_types"]]
    (source / "config.json").write_text(json.dumps(config))
    convert(str(source), str(converted))
    stored = load_file(converted / "model.safetensors")
    assert stored["model.layers.0.mamba.conv1d.weight"].shape[-1] == 1
    assert {"moe": "model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight",
            "dense": "model.layers.0.mlp.gate_proj.weight"}[variant] in stored
    want = mlx_lm_logits(converted, TOKENS)
    assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    for backend in BACKENDS:
        assert scaled_error(float32_model(converted, backend).forward_verify("m", TOKENS), want) <= 1e-4, backend


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    """ferrum.random_checkpoint (benchmarks, the JAX plugin's tests) writes Granite 4.0-H's tensors as stored."""
    raw = json.loads(VARIANTS[variant]().to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)
