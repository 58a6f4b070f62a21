"""RecurrentGemma (``recurrent_gemma``, Griffin): RG-LRU recurrent blocks (``rg_lru``, API 1.25) and local MQA
attention, two to one; against transformers on every runnable backend, controls that drop the RG-LRU's reset or its
input normalization, and the engine's batching, chunked prefill, preemption and prefix caching over the blocks'
states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match,
    assert_random_checkpoint_is_what_transformers_reads, built_checkpoints, float32_model, mlx_lm_logits,
    reference_logits, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload, write_tokenizer,
)
from test_rg_lru import WRONG

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, conv1d_width=4)
VARIANTS = {
    # RecurrentGemma-2B's layout: blocks recurrent, recurrent, attention (MQA), the RG-LRU as wide as the model, a
    # window of 6 here so that prompts outrun it
    "2b": lambda: transformers.RecurrentGemmaConfig(**COMMON, num_hidden_layers=4, num_key_value_heads=1,
                                                    attention_window_size=6),
    # a wider RG-LRU, two key/value heads, biased q/k/v, an untied head, a softer cap
    "wide": lambda: transformers.RecurrentGemmaConfig(**COMMON, num_hidden_layers=3, num_key_value_heads=2,
                                                      lru_width=96, attention_window_size=5, attention_bias=True,
                                                      tie_word_embeddings=False, logits_soft_cap=5.0),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random checkpoints whose recurrence parameters are as transformers initializes them (decays ``a`` in
    [0.9, 0.999] at gate 1): random ones of 0.2 leave ``a`` near 0, where the reset and sqrt(1 - a^2) hardly show."""
    import torch

    out = built_checkpoints(tmp_path_factory, VARIANTS, VOCAB)
    rng = np.random.default_rng(0)
    for folder, hf in out.values():
        with torch.no_grad():
            for layer in hf.model.layers:
                lru = getattr(layer.temporal_block, "rg_lru", None)
                if lru is not None:
                    squared = rng.uniform(0.9 ** 2, 0.999 ** 2, lru.recurrent_param.shape)
                    lru.recurrent_param.copy_(torch.tensor(np.log(np.exp(-0.5 * np.log(squared)) - 1.0)))
        hf.save_pretrained(folder)
    return out


def test_reads_the_blocks_kinds_sizes_and_names(checkpoints):
    """block_types cycles; the MLP is half intermediate_size wide; the embeddings' scale is sqrt(64) = 8 (bfloat16
    holds it exactly); only attention layers hold a KV pool layer."""
    arch = float32_model(checkpoints["2b"][0]).config.arch
    assert [s.mixer for s in arch.layers] == ["rg_lru", "rg_lru", "attention", "rg_lru"]
    assert arch.kv_pool_layers == 1 and arch.layers[2].window == 6 and arch.layers[2].rope.rotary_dim == 8
    assert (arch.rg_lru.width, arch.rg_lru.heads, arch.final_softcap, arch.embed_scale) == (64, 4, 30.0, 8.0)
    wide = ModelConfig.from_dict(json.loads(VARIANTS["wide"]().to_json_string()))
    assert wide.intermediate_size == 48 and wide.arch.rg_lru.width == 96 and wide.arch.qkv_bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    """Thirteen tokens, past the window; decode steps carry the convolution window and the RG-LRU's state."""
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_the_embedding_scale_is_rounded_to_bfloat16_as_transformers_does():
    """sqrt(2560) is 50.596; transformers' normalizer buffer holds it in bfloat16, 50.5."""
    raw = {**json.loads(VARIANTS["2b"]().to_json_string()), "hidden_size": 2560, "lru_width": 2560,
           "num_attention_heads": 10}
    assert ModelConfig.from_dict(raw).arch.embed_scale == 50.5


def test_the_release_config_reads_as_transformers_does():
    """recurrentgemma-2b's config.json (transformers 4.40's): head_dim beside hidden / heads, partial_rotary_factor at
    the top level, rope_theta, the init-only and scaling keys."""
    raw = {"architectures": ["RecurrentGemmaForCausalLM"], "model_type": "recurrent_gemma", "attention_bias": False,
           "attention_window_size": 2048, "block_types": ["recurrent", "recurrent", "attention"], "conv1d_width": 4,
           "embeddings_scale_by_sqrt_dim": True, "final_w_init_variance_scale": 0.0769, "head_dim": 256,
           "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2560, "intermediate_size": 15360,
           "logits_soft_cap": 30.0, "lru_width": 2560, "num_attention_heads": 10, "num_hidden_layers": 26,
           "num_key_value_heads": 1, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
           "vocab_size": 256000, "w_init_variance_scale": 0.01}
    config = ModelConfig.from_dict(raw)
    assert (config.head_dim, config.intermediate_size, config.num_kv_heads) == (256, 7680, 1)
    assert [s.mixer for s in config.arch.layers].count("attention") == 8
    assert config.arch.layers[2].rope.rotary_dim == 128 and config.arch.layers[2].window == 2048


@pytest.mark.parametrize(("change", "message", "error"), [
    ({"hidden_activation": "gelu"}, "'hidden_activation' is 'gelu'", UnsupportedFeatureError),
    ({"embeddings_scale_by_sqrt_dim": False}, "'embeddings_scale_by_sqrt_dim' is False", UnsupportedFeatureError),
    ({"block_types": ["recurrent", "mlp"]}, "'block_types' must list block kinds", ConfigError),
    ({"lru_width": 66}, "'lru_width'.*multiple of num_attention_heads", ConfigError),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'linear'",
     UnsupportedFeatureError),
])
def test_what_ferrum_does_not_run_is_refused_by_name(change, message, error):
    raw = {**json.loads(VARIANTS["2b"]().to_json_string()), **change}
    with pytest.raises(error, match=message):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("wrong", WRONG)
def test_the_reset_and_the_input_normalization_count(checkpoints, wrong):
    """Run with either slip, the model misses transformers' logits by far more than the match holds to."""
    folder, hf = checkpoints["2b"]
    model = float32_model(folder)
    ops = model.ops

    def run(x, gx, ga, a_param, state, cu, starts):
        host = [np.asarray(ops.to_numpy(t), np.float32) for t in (x, gx, ga, a_param, state)]
        y, new = WRONG[wrong](*host, cu, starts)
        return ops.from_numpy(y, "float32"), ops.from_numpy(new, "float32")

    for layer in model.layers:
        if layer.recurrent is not None:
            layer.recurrent.native = False
    ops.fallback = {**ops.fallback, "rg_lru": run}
    assert scaled_error(model.forward_verify("a", TOKENS), reference_logits(hf, TOKENS)) > 1e-2  # 0.51, 1.01


# ------------------------------------------------------------------------------------------------ serving

def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    """Prefill chunks resumed mid-sequence carry their state; those at position 0 reset."""
    folder, hf = checkpoints["2b"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoints, monkeypatch):
    folder, hf = checkpoints["2b"]
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), hf, TOKENS, "rg_lru", monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["2b"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cached_requests_generate_transformers_greedy_tokens(checkpoints, backend):
    """A second turn served partly from the prefix cache (the states kept at a block boundary) gives transformers'
    greedy tokens."""
    from test_mamba import assert_next_turn_from_the_prefix_cache_is_transformers

    folder, hf = checkpoints["2b"]
    assert_next_turn_from_the_prefix_cache_is_transformers(folder, hf, backend)


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    raw = json.loads(VARIANTS[variant]().to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)


@pytest.mark.slow  # mlx-lm converts (and packs) the checkpoint: ~3 s
@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
@pytest.mark.parametrize("bits, group", [(None, 32), (4, 32), (4, 64)])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(checkpoints, bits, group, tmp_path):
    """mlx-lm's conversions store the convolutions' taps ``[W, K, 1]`` (RgLruSpec.conv_last). Its port reads the
    transformers-4 rope_theta and has no attention biases (the "wide" variant's), so RecurrentGemma-2B's layout only;
    the float conversion runs as transformers does."""
    import shutil

    from mlx_lm.convert import convert

    folder, hf = checkpoints["2b"]
    source = tmp_path / "hf"
    shutil.copytree(folder, source)
    config = json.loads((source / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (source / "config.json").write_text(json.dumps(config))
    write_tokenizer(source)
    converted = tmp_path / "mlx"
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=group)
    want = mlx_lm_logits(converted, TOKENS)
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    for backend in BACKENDS:
        assert scaled_error(float32_model(converted, backend).forward_verify("m", TOKENS), want) <= 1e-4, backend
