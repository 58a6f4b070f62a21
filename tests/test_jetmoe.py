"""JetMoE (``jetmoe``): a mixture of attention heads (each token's top-k query/output projection experts around shared
keys and values, ferrum.arch.moa) and GraniteMoE-style stacked experts with an output bias; the blocks' norms at eps
1e-6, the final norm at rms_norm_eps. Against transformers in float32 on every runnable backend."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
import transformers

from ferrum.arch.moa import MoaLayer
from ferrum.config import ModelConfig
from ferrum.errors import AdapterError, ConfigError, UnsupportedFeatureError
from support import (
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_random_checkpoint_is_what_transformers_reads, built_checkpoints, float32_model, reference_logits,
    runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def jetmoe_config(**extra) -> transformers.JetMoeConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=24, num_hidden_layers=2, num_key_value_heads=2,
                    kv_channels=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                    rms_norm_eps=0.3, tie_word_embeddings=True, eos_token_id=None)  # generate runs to max tokens
    return transformers.JetMoeConfig(**{**settings, **extra})


#: two slots over two key/value heads, tied, a final norm eps far from the blocks' 1e-6 (so it shows); three slots
#: of five experts over one key/value head, untied, transformers' default eps
VARIANTS = {"tied": jetmoe_config,
            "three_slots": partial(jetmoe_config, num_key_value_heads=1, kv_channels=8, num_local_experts=5,
                                   num_experts_per_tok=3, rms_norm_eps=1e-6, tie_word_embeddings=False)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, VARIANTS, vocab=VOCAB)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = float32_model(folder, backend, block_size=4)
    assert model.config.num_heads == hf.config.num_key_value_heads * hf.config.num_experts_per_tok
    assert model.config.rms_norm_eps == 1e-6 and model.config.arch.norm_eps == {"final": hf.config.rms_norm_eps}
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def _slot_major(self: MoaLayer, queries, ids):
    """Each token's heads in transformers' own order, slot-major (head ``j * kv + i``), which Ferrum's grouped
    attention (head ``h`` reads key/value head ``h // top_k``) reads wrongly."""
    s, ops = self.spec, self.ops
    t = np.arange(len(ids))[:, None, None]
    rows = (t * s.num_experts + ids[:, :, None]) * s.kv_heads + np.arange(s.kv_heads)[None, None, :]
    picked = ops.take_rows(ops.reshape(queries, (-1, s.head_dim)), ops.from_numpy(rows.reshape(-1).astype(
        np.int32), None))
    return ops.reshape(picked, (-1, s.kv_heads * s.top_k, s.head_dim))


def test_the_parity_sees_the_head_order(checkpoints, monkeypatch):
    """Control: the query heads left in transformers' tiled order miss its logits by far."""
    folder, hf = checkpoints["tied"]
    want = reference_logits(hf, TOKENS)
    monkeypatch.setattr(MoaLayer, "heads", _slot_major)
    assert scaled_error(float32_model(folder).forward_verify("x", TOKENS), want) > 1e-2


def test_the_parity_sees_each_norms_eps_and_both_biases(checkpoints):
    """Control: transformers' logits move where the final norm took the blocks' eps, where the blocks took
    rms_norm_eps, and without either expert bias (the attention experts' or the MLP's)."""
    folder, hf = checkpoints["tied"]
    want = reference_logits(hf, TOKENS)

    def moved(change) -> float:
        other = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
        with torch.no_grad():
            change(other.model)
        return scaled_error(reference_logits(other, TOKENS), want)

    def layer_eps(model):
        for layer in model.layers:
            layer.input_layernorm.variance_epsilon = layer.post_attention_layernorm.variance_epsilon = 0.3

    assert moved(lambda m: setattr(m.norm, "variance_epsilon", 1e-6)) > 1e-3
    assert moved(layer_eps) > 1e-3
    assert moved(lambda m: [layer.self_attention.experts.bias.zero_() for layer in m.layers]) > 1e-3
    assert moved(lambda m: [layer.mlp.bias.zero_() for layer in m.layers]) > 1e-3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_keeps_transformers_greedy_tokens(checkpoints, variant):
    """Batched, chunked and preempted, and from the prefix cache."""
    folder, hf = checkpoints[variant]
    assert_engine_keeps_greedy_tokens(partial(small_pool_engine, folder), hf, staggered_greedy_workload(VOCAB))
    assert_generates_greedily_as_transformers(folder, hf, "cpu", TOKENS)


def test_names_the_tensors_transformers_saves(checkpoints):
    from safetensors import safe_open

    from ferrum.model import weight_shapes

    folder, _ = checkpoints["three_slots"]
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    shapes = weight_shapes(ModelConfig.from_file(folder))
    stacks = (".mlp.input_linear.", ".mlp.output_linear.")  # the experts the loader reads as switch_mlp's
    assert {n: s for n, s in shapes.items() if ".switch_mlp." not in n} == {
        n: s for n, s in saved.items() if not any(stack in n for stack in stacks)}


def test_random_checkpoint_is_what_transformers_reads(checkpoints, tmp_path):
    folder, _ = checkpoints["tied"]
    raw = json.loads((folder / "config.json").read_text())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path, raw, TOKENS)


@pytest.mark.parametrize("overrides, key, error", [
    ({"moe_num_experts": 8}, "moe_num_experts", UnsupportedFeatureError),
    ({"moe_top_k": 2}, "moe_top_k", UnsupportedFeatureError),
    ({"activation_function": "gelu"}, "activation_function", UnsupportedFeatureError),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok", ConfigError),
    ({"kv_channels": 0}, "kv_channels", ConfigError),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}}, "rope_parameters",
     UnsupportedFeatureError),
])
def test_unsupported_or_bad_configs_are_refused_by_name(checkpoints, overrides, key, error):
    raw = json.loads((checkpoints["tied"][0] / "config.json").read_text())
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**raw, **overrides})


def test_num_attention_heads_is_derived_as_transformers_derives_it(checkpoints):
    """transformers sets num_attention_heads to num_key_value_heads * num_experts_per_tok whatever a config says."""
    raw = json.loads((checkpoints["tied"][0] / "config.json").read_text())
    assert ModelConfig.from_dict({**raw, "num_attention_heads": 32}).num_heads == 4


def test_lora_adapters_are_refused_by_name(checkpoints, tmp_path):
    """The attention experts are not adapted: loading an adapter says so before reading it."""
    with pytest.raises(AdapterError, match="mixture of attention heads"):
        float32_model(checkpoints["tied"][0]).adapters.load("a", tmp_path)


def test_ferrum_quantize_keeps_the_attention_experts_float_and_its_output_runs(checkpoints, tmp_path):
    """The load splits kv_proj and reorders the attention experts' stacks on the host, from float only: `ferrum
    quantize` leaves them in float (false in config.json) and packs the rest, a folder Ferrum runs near transformers'
    float logits."""
    from ferrum.quant.convert import quantize_checkpoint

    folder, hf = checkpoints["tied"]
    out = quantize_checkpoint(folder, tmp_path / "q", bits=8, group_size=32)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    for module in ("kv_proj", "experts.input_linear", "experts.output_linear"):
        assert quantization[f"model.layers.0.self_attention.{module}"] is False
    assert "model.layers.0.self_attention.experts.router.layer" not in quantization  # packed at 8 bits, group 32
    got = float32_model(out).forward_verify("q", TOKENS)
    assert scaled_error(got, reference_logits(hf, TOKENS)) < 2e-2
