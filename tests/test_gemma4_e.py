"""Gemma 4 E2B / E4B: per-layer inputs (hidden_size_per_layer_input: a second embedding table giving every layer an
input of its own, a projection of the main embedding added to it, and each layer's gate, projection and norm mixing
it into the stream) and shared KV layers (num_kv_shared_layers: the last layers attend the keys and values of the
last earlier layer of their attention kind, with their own queries; twice as wide an MLP with use_double_wide_mlp).
Checked against transformers and mlx-lm (its conversions, 4-bit too) on every runnable backend; the shared layers
allocate no KV of their own."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.engine import Engine, EngineConfig
from ferrum.errors import ConfigError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM
from ferrum.sampling import SamplingParams
from support import (
    assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_names_the_tensors_transformers_saves, mlx_lm_logits, randomized_reference, reference_logits, run_staggered,
    runnable_backends, saved_references, scaled_error, with_layer_scalars, write_tokenizer,
)

BACKENDS = runnable_backends()
#: Longer than the window of 6, so sliding layers drop keys inside the prompt.
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=24)]
#: The last three layers (full, sliding, full) read layers 2, 4 and 2: two layers read one pool layer.
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention",
                                                                                  "full_attention"]
KV_LAYERS = (0, 1, 2, 3, 4, 2, 4, 2)


def e_config(**extra) -> transformers.Gemma4TextConfig:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, global_head_dim=32, attention_k_eq_v=False,
                    hidden_size_per_layer_input=16, vocab_size_per_layer_input=97, num_kv_shared_layers=3,
                    use_double_wide_mlp=True, sliding_window=6, final_logit_softcapping=30.0,
                    layer_types=LAYER_TYPES, max_position_embeddings=256)
    config = transformers.Gemma4TextConfig(**{**settings, **extra})
    config._attn_implementation = "eager"
    return config


#: E2B's layout (sliding heads padded to the full layers' at load); every head one size (nothing padded; packed
#: conversions of E2B's layout: test_gemma4_packed.py).
VARIANTS = {"e2b": {}, "one_size": dict(global_head_dim=16)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_references(tmp_path_factory, VARIANTS, e_config,
                            lambda config: with_layer_scalars(randomized_reference(config), 0.1))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert model.config.arch.kv_layers == KV_LAYERS
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_generates_greedily_as_transformers(checkpoints, backend):
    folder, hf = checkpoints["e2b"]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS[:10])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_and_chunked_prefills_give_transformers_tokens(checkpoints, backend):
    """Staggered requests, prompts cut into chunks of a few tokens and batched with others' decodes: each gets the
    greedy tokens of transformers' forward pass over it alone. (Not generate's: on the sixth prompt, transformers'
    cached generation with shared KV layers and a sliding window takes a third token its own uncached forward pass
    does not.)"""
    folder, hf = checkpoints["e2b"]
    rng = np.random.RandomState(5)
    prompts = [[int(t) for t in rng.randint(0, 97, size=n)] for n in (23, 3, 17, 9, 30, 12)]
    workload = [(p, i, SamplingParams(max_tokens=6, ignore_eos=True)) for i, p in enumerate(prompts)]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    engine = Engine(LlmExecutor(model), None, EngineConfig(max_num_batched_tokens=8, max_num_seqs=4))
    got = run_staggered(engine, workload)
    assert [list(got[i]) for i in range(len(prompts))] == [_greedy_uncached(hf, p, 6) for p in prompts]


def _greedy_uncached(hf, prompt: list[int], count: int) -> list[int]:
    """``count`` greedy tokens after ``prompt``, each from transformers' forward pass over the whole sequence."""
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(reference_logits(hf, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def test_shared_layers_have_no_pool_layers_of_their_own(checkpoints):
    """Five of the eight layers compute keys and values: the pool holds five layers, and KV memory is 5/8 of one
    layer per layer; the per-layer table counts as a lookup table."""
    folder, _ = checkpoints["e2b"]
    model = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", num_kv_blocks=8, block_size=4, dtype="float32")
    config = model.config
    assert len(model.pool.k) == len(model.pool.v) == 5
    assert model.kv_bytes() == 8 * 4 * 2 * 5 * config.num_kv_heads * config.head_dim * 4
    assert [spec.intermediate_size for spec in config.arch.layers] == [None] * 5 + [160] * 3
    assert model.lookup_weight_bytes == 97 * 8 * 16 * 4  # tied embeddings: the main table is the LM head


def test_layers_past_the_last_kv_write_compute_only_logit_rows(checkpoints, monkeypatch):
    """A prefill's layers from the last one that writes K/V on (layer 4 here) attend the last position's query
    alone, as transformers' Gemma 4 slices its shared layers' inputs; its logits stay transformers'."""
    folder, hf = checkpoints["e2b"]
    model = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", block_size=4, dtype="float32")
    queries = []
    attend = model.ops.paged_attention
    monkeypatch.setattr(model.ops, "paged_attention", lambda q, *rest: queries.append(q.shape[0]) or attend(q, *rest))
    got = model.prefill("p", TOKENS[:12])
    assert queries == [12] * 4 + [1] * 4
    assert scaled_error(got, reference_logits(hf, TOKENS[:12])[-1]) <= 1e-4


def test_layouts_and_tensors(checkpoints):
    """weight_shapes lists what transformers saves: no k/v projections or k norm on the shared layers, their MLPs
    twice as wide, the per-layer tensors."""
    folder, _ = checkpoints["e2b"]
    assert_names_the_tensors_transformers_saves(folder)


def test_random_checkpoint_is_what_transformers_reads(tmp_path):
    """ferrum.random_checkpoint writes every tensor transformers reads and no other, and Ferrum runs it as
    transformers does. Its norms' weights are drawn around 0 (Gemma 4's are plain ``w``), which makes this model's
    float32 logits uncertain by ~7e-4 of the largest in transformers too: compared with transformers in float64."""
    import transformers

    from ferrum.random_checkpoint import write_random_checkpoint

    raw = {k: v for k, v in e_config().to_dict().items() if k != "per_layer_config"}
    raw.update(architectures=["Gemma4ForCausalLM"], global_head_dim=32)
    folder = write_random_checkpoint(tmp_path, raw, dtype="float32", std=0.2)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        want = hf.double().eval()(torch.tensor([TOKENS])).logits[0].numpy()
    got = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32").forward_verify("x", TOKENS)
    assert scaled_error(got, want) <= 2e-3


def test_release_key_value_tensors_of_shared_layers_are_left_quietly(checkpoints, tmp_path):
    """Releases store k_proj, v_proj, k_norm for the shared layers, which transformers ignores
    (_keys_to_ignore_on_load_unexpected): Ferrum leaves them unread without a warning, and runs as before."""
    from safetensors.numpy import load_file, save_file

    folder, hf = checkpoints["e2b"]
    shutil.copytree(folder, tmp_path / "release")
    tensors = load_file(folder / "model.safetensors")
    rng = np.random.default_rng(0)
    for i in (5, 6, 7):
        for name, shape in (("k_proj.weight", (64, 64)), ("v_proj.weight", (64, 64)), ("k_norm.weight", (32,))):
            tensors[f"model.layers.{i}.self_attn.{name}"] = rng.standard_normal(shape).astype(np.float32)
    save_file(tensors, tmp_path / "release" / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = DecoderOnlyLLM.from_pretrained(tmp_path / "release", backend="cpu", dtype="float32")
    assert scaled_error(model.forward_verify("r", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("shared,error", [
    (8, "no layer of the 8"),  # every layer shared: none computes keys and values
    (7, "no earlier full_attention layer"),  # the one layer before them is sliding
])
def test_refuses_shared_layers_without_a_source(shared, error):
    raw = {**e_config().to_dict(), "model_type": "gemma4_text", "num_kv_shared_layers": shared}
    with pytest.raises(ConfigError, match=error):
        ModelConfig.from_dict(raw)


def test_refuses_a_per_layer_table_shorter_than_the_vocabulary():
    """Every token id looks up a row of the per-layer table: one of fewer rows would be read past its end."""
    raw = {**e_config().to_dict(), "model_type": "gemma4_text"}
    raw["vocab_size_per_layer_input"] = raw["vocab_size"] - 1
    with pytest.raises(ConfigError, match="vocab_size_per_layer_input.*at least vocab_size"):
        ModelConfig.from_dict(raw)


# ------------------------------------------------------------------ mlx-lm

needs_mlx = pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")


def _as_mlx_lm_reads_it(folder, destination, global_head_dim):
    """The checkpoint with the config keys releases write, which mlx-lm reads (transformers 5.24 saves
    per_layer_config in place of global_head_dim), and a tokenizer for its conversion."""
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    config.pop("per_layer_config")
    config["global_head_dim"] = global_head_dim
    (destination / "config.json").write_text(json.dumps(config))
    write_tokenizer(destination)
    return destination


@needs_mlx
def test_mlx_backend_matches_mlx_lm(checkpoints, tmp_path):
    folder = _as_mlx_lm_reads_it(checkpoints["e2b"][0], tmp_path / "hf", 32)
    want = mlx_lm_logits(folder, TOKENS)
    assert scaled_error(want, reference_logits(checkpoints["e2b"][1], TOKENS)) <= 1e-4  # the two references agree
    got = DecoderOnlyLLM.from_pretrained(folder, backend="mlx", dtype="float32").forward_verify("m", TOKENS)
    assert scaled_error(got, want) <= 1e-4


@needs_mlx
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(checkpoints, bits, tmp_path):
    """mlx-lm's conversions, float or 4-bit (the per-layer table packed too), run on every backend as mlx-lm runs
    them."""
    from mlx_lm.convert import convert
    from safetensors import safe_open

    source = _as_mlx_lm_reads_it(checkpoints["one_size"][0], tmp_path / "hf", 16)
    converted = tmp_path / "mlx"
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    with safe_open(str(converted / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert ("model.embed_tokens_per_layer.scales" in names) == (bits is not None)
    want = mlx_lm_logits(converted, TOKENS)
    for backend in BACKENDS:
        got = DecoderOnlyLLM.from_pretrained(converted, backend=backend, dtype="float32").forward_verify("m", TOKENS)
        assert scaled_error(got, want) <= 1e-4, backend
