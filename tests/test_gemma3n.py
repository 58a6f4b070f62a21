"""Gemma 3n (gemma3n_text, and the gemma3n wrapper's text model): AltUp's stream of copies, Laurel's residual,
per-layer inputs (ids past the per-layer table read its row 0), shared KV layers, a width per layer and the first
layers' gates cut to their gaussian top-k. Checked against transformers and mlx-lm (its conversions, 4-bit too) on
every runnable backend; each distinctive piece is shown to matter by the logits it changes."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import transformers

from ferrum.arch import altup
from ferrum.config import ModelConfig
from ferrum.engine import Engine, EngineConfig
from ferrum.errors import ConfigError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_names_the_tensors_transformers_saves, assert_random_checkpoint_is_what_transformers_reads, reference_logits,
    runnable_backends, saved_references, scaled_error, staggered_greedy_workload, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 97
#: Longer than the window of 6; ids 93 and 95 lie past the per-layer table's 90 rows.
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 90, size=24)]
TOKENS[3], TOKENS[11] = 95, 93
#: The last three layers (full, sliding, full) read layers 2, 4 and 2's keys and values.
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention",
                                                                                  "full_attention"]
KV_LAYERS = (0, 1, 2, 3, 4, 2, 4, 2)
SHARED = (5, 6, 7)


def text_config(**extra) -> transformers.Gemma3nTextConfig:
    settings = dict(vocab_size=VOCAB, vocab_size_per_layer_input=90, hidden_size=64, num_hidden_layers=8,
                    intermediate_size=[80] * 4 + [96] * 4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    hidden_size_per_layer_input=16, num_kv_shared_layers=3, sliding_window=6, layer_types=LAYER_TYPES,
                    laurel_rank=8, activation_sparsity_pattern=[0.95, 0.9, 0.0, 0.95, 0.0, 0.0, 0.0, 0.0],
                    max_position_embeddings=256)
    config = transformers.Gemma3nTextConfig(**{**settings, **extra})
    config._attn_implementation = "eager"
    return config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_references(tmp_path_factory, {"e2b": {}}, text_config)["e2b"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoint, backend):
    folder, hf = checkpoint
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert model.config.arch.kv_layers == KV_LAYERS
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_generates_greedily_as_transformers(checkpoint, backend):
    """Batched with a shorter prompt, and again from the prefix cache."""
    folder, hf = checkpoint
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS[:10])


def test_engine_keeps_greedy_tokens(checkpoint):
    """Staggered requests with chunked prefills, and under preemption, keep each request's greedy tokens."""
    folder, hf = checkpoint

    def make_engine(**config):
        model = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", num_kv_blocks=64, block_size=4, dtype="float32")
        return Engine(LlmExecutor(model), None, EngineConfig(**config))

    assert_engine_keeps_greedy_tokens(make_engine, hf, staggered_greedy_workload(VOCAB, count=6))


def test_shared_layers_have_no_pool_layers_and_compute_only_logit_rows(checkpoint, monkeypatch):
    """Five of the eight layers compute keys and values; a prefill's layers from the last of them on (once it has
    written its keys and values) attend the last position's query alone, and its logits stay transformers'."""
    folder, hf = checkpoint
    model = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", num_kv_blocks=8, block_size=4, dtype="float32")
    assert len(model.pool.k) == 5
    assert [spec.intermediate_size for spec in model.config.arch.layers] == [80] * 4 + [None] * 4
    queries = []
    attend = model.ops.paged_attention
    monkeypatch.setattr(model.ops, "paged_attention", lambda q, *rest: queries.append(q.shape[0]) or attend(q, *rest))
    got = model.prefill("p", TOKENS[:12])
    assert queries == [12] * 4 + [1] * 4
    assert scaled_error(got, reference_logits(hf, TOKENS[:12])[-1]) <= 1e-4


def test_names_the_tensors_transformers_saves(checkpoint):
    assert_names_the_tensors_transformers_saves(checkpoint[0])


def test_random_checkpoint_is_what_transformers_reads(tmp_path):
    raw = {**text_config().to_dict(), "architectures": ["Gemma3nForCausalLM"]}
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / "random", raw, TOKENS)


# ---------------------------------------------------------------- each piece matters

def _without_laurel(monkeypatch):
    monkeypatch.setattr(altup.AltUpLayer, "laurel", lambda self, x: x)


def _without_altup(monkeypatch):
    monkeypatch.setattr(altup.AltUpLayer, "predict", lambda self, stream: list(stream))


def _without_correction(monkeypatch):
    monkeypatch.setattr(altup.AltUpLayer, "correct", lambda self, predictions, activated: [
        activated if c == self.spec.active else p for c, p in enumerate(predictions)])


def _without_sparsity(monkeypatch):
    import ferrum.arch.mlp as mlp

    monkeypatch.setattr(mlp, "gaussian_top_k", lambda ops, act, *rest: act)


def _without_sharing(monkeypatch, folder, tmp_path):
    """The shared layers computing keys and values of their own from release-style k/v tensors."""
    import ferrum.arch.families.gemma as gemma

    monkeypatch.setattr(gemma, "_gemma4_kv_sources", lambda r, types: [None] * len(types))
    return _with_release_kv(folder, tmp_path / "release")


def _with_release_kv(folder, destination):
    """The checkpoint with the shared layers' k_proj, v_proj and k_norm, which releases (and mlx-lm) store and
    transformers ignores."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, destination)
    path = next(destination.glob("*.safetensors"))
    tensors = load_file(path)
    prefix = next(n for n in tensors if n.endswith("layers.0.self_attn.q_proj.weight")).removesuffix(
        "layers.0.self_attn.q_proj.weight")
    rng = np.random.default_rng(0)
    for i in SHARED:
        for name, shape in (("k_proj.weight", (32, 64)), ("v_proj.weight", (32, 64)), ("k_norm.weight", (16,))):
            tensors[f"{prefix}layers.{i}.self_attn.{name}"] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    return destination


@pytest.mark.parametrize("disable", [_without_laurel, _without_altup, _without_correction, _without_sparsity,
                                     _without_sharing])
def test_each_piece_changes_the_logits(checkpoint, disable, monkeypatch, tmp_path):
    """With one piece switched off in Ferrum, its logits leave transformers' by far more than the tolerance the
    matching tests hold them to (1e-4): each of those tests fails without it."""
    folder, hf = checkpoint
    args = (monkeypatch, folder, tmp_path) if disable is _without_sharing else (monkeypatch,)
    folder = disable(*args) or folder
    got = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32").forward_verify("x", TOKENS)
    assert scaled_error(got, reference_logits(hf, TOKENS)) > 1e-2


def test_release_key_value_tensors_of_shared_layers_are_left_quietly(checkpoint, tmp_path, recwarn):
    folder, hf = checkpoint
    release = _with_release_kv(folder, tmp_path / "release")
    got = DecoderOnlyLLM.from_pretrained(release, backend="cpu", dtype="float32").forward_verify("r", TOKENS)
    assert not [w for w in recwarn if "unread" in str(w.message).lower()]
    assert scaled_error(got, reference_logits(hf, TOKENS)) <= 1e-4


# ---------------------------------------------------------------- the gemma3n wrapper

#: How releases write the text config (transformers 4.53's rope keys, which mlx-lm reads).
RELEASE_ROPE = {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "rope_scaling": None}


def _as_wrapper(folder, destination):
    """The text checkpoint as a Gemma3nForConditionalGeneration stores it: the decoder under model.language_model,
    the release's config (text_config with its rope keys beside vision and audio configs), the shared layers' k/v
    tensors, towers and multimodal embedders that a text model leaves unread, and a tokenizer."""
    from safetensors.numpy import load_file, save_file

    _with_release_kv(folder, destination)
    path = destination / "model.safetensors"
    tensors = {name.replace("model.", "model.language_model.", 1): t for name, t in load_file(path).items()}
    for module in ("vision_tower.timm_model.stem.conv.weight", "audio_tower.conformer.0.norm.weight",
                   "embed_vision.embedding.weight", "embed_audio.embedding_projection.weight"):
        tensors[f"model.{module}"] = np.ones((4, 4), dtype=np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    text = json.loads((destination / "config.json").read_text())
    text.pop("rope_parameters")
    text.update(RELEASE_ROPE, model_type="gemma3n_text")
    config = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n", "text_config": text,
              "vision_config": {"model_type": "gemma3n_vision"}, "audio_config": {"model_type": "gemma3n_audio"},
              "eos_token_id": [1, 106], "torch_dtype": "float32"}
    (destination / "config.json").write_text(json.dumps(config))
    write_tokenizer(destination)
    return destination


@pytest.fixture(scope="module")
def wrapper(checkpoint, tmp_path_factory):
    return _as_wrapper(checkpoint[0], tmp_path_factory.mktemp("wrapper") / "hf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrapper_runs_its_text_model(checkpoint, wrapper, backend, recwarn):
    model = DecoderOnlyLLM.from_pretrained(wrapper, backend=backend, dtype="float32")
    assert model.config.model_type == "gemma3n_text" and model.config.arch.prefix == "model.language_model."
    assert not [w for w in recwarn if "unread" in str(w.message).lower()]
    assert scaled_error(model.forward_verify("w", TOKENS), reference_logits(checkpoint[1], TOKENS)) <= 1e-4


needs_mlx = pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")


def _mlx_lm_logits(folder) -> np.ndarray:
    """mlx-lm's logits over TOKENS, run with its cache: without one, its shared layers compute keys and values of
    their own from the tensors releases store for them (which no model reads)."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model = load_model(folder)[0]
    return np.array(model(mx.array([TOKENS]), cache=model.make_cache()).astype(mx.float32))[0]


@pytest.mark.slow
@needs_mlx
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_match_mlx_lm(checkpoint, wrapper, bits, tmp_path):
    """mlx-lm's conversions of the wrapper, float or 4-bit (the per-layer table and AltUp's router packed too), run
    on every backend as mlx-lm runs them; float, mlx-lm and transformers agree."""
    from mlx_lm.convert import convert

    converted = tmp_path / "mlx"
    convert(str(wrapper), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    want = _mlx_lm_logits(converted)
    if bits is None:
        assert scaled_error(want, reference_logits(checkpoint[1], TOKENS)) <= 1e-4
    for backend in BACKENDS:
        got = DecoderOnlyLLM.from_pretrained(converted, backend=backend, dtype="float32").forward_verify("m", TOKENS)
        assert scaled_error(got, want) <= 1e-4, backend


# ---------------------------------------------------------------- config

def _raw(**extra) -> dict:
    return {**text_config().to_dict(), "model_type": "gemma3n_text", **extra}


def test_release_defaults_and_per_layer_lists():
    """Left out, the sparsity is transformers' (the first 10 of more than 10 layers at 0.95), the layer kinds
    four sliding to one full; the widest layer is the model's width."""
    raw = _raw(num_hidden_layers=12, intermediate_size=[32] * 6 + [48] * 6, num_kv_shared_layers=0)
    for key in ("activation_sparsity_pattern", "layer_types"):
        raw.pop(key)
    config = ModelConfig.from_dict(raw)
    assert [spec.gate_sparsity for spec in config.arch.layers] == [0.95] * 10 + [0.0] * 2
    assert [spec.window for spec in config.arch.layers] == [6, 6, 6, 6, None] * 2 + [6, 6]
    assert config.intermediate_size == 48
    assert [spec.intermediate_size for spec in config.arch.layers] == [32] * 6 + [None] * 6


@pytest.mark.parametrize("extra,error", [
    (dict(intermediate_size=[80] * 7), "intermediate_size.*one per layer"),
    (dict(activation_sparsity_pattern=[0.95] * 7), "activation_sparsity_pattern.*8 sparsities"),
    (dict(activation_sparsity_pattern=0.95), "activation_sparsity_pattern"),
    (dict(altup_active_idx=4), "altup_active_idx.*only 4"),
    (dict(num_kv_shared_layers=8), "no layer of the 8"),
])
def test_refuses_configs_it_cannot_run(extra, error):
    with pytest.raises(ConfigError, match=error):
        ModelConfig.from_dict(_raw(**extra))


@pytest.mark.parametrize("change, words", [
    (lambda arch, layers: dict(layers=(dataclasses.replace(layers[0], mixer="mamba2"), *layers[1:])),
     "layer 0 runs mamba2, which Ferrum does not run with AltUp"),
    (lambda arch, layers: dict(layers=(dataclasses.replace(layers[0], beside="mamba2"), *layers[1:])),
     "layer 0 runs attention beside mamba2, which Ferrum does not run with AltUp"),
    (lambda arch, layers: dict(layers=(dataclasses.replace(layers[0], mlp="none"), *layers[1:])),
     "layer 0 lacks a mixer or an MLP, which Ferrum does not run with per-layer inputs and AltUp"),
    (lambda arch, layers: dict(parallel=True), "AltUp .* in parallel blocks is not supported")])
def test_altup_beside_anything_but_attention_then_the_mlp_is_refused_when_built(change, words):
    """AltUp's blocks run plain attention, then the MLP: an architecture that asks for more is refused by name when
    it is built, not run wrong."""
    from ferrum.errors import UnsupportedFeatureError

    arch = ModelConfig.from_dict(_raw()).arch
    with pytest.raises(UnsupportedFeatureError, match=words):
        dataclasses.replace(arch, **change(arch, arch.layers))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_on_attention_and_each_layers_mlp_width_matches_peft(checkpoint, backend, tmp_path):
    """A PEFT adapter of q/k/v/o and the MLPs of 80 and 96 wide layers: each layer's down_proj was checked against
    the model's widest (Ferrum refused the adapter as trained for another model)."""
    import copy

    import peft
    import torch

    from ferrum.model import ForwardItem

    folder, hf = checkpoint
    torch.manual_seed(1)
    adapted = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.3)
    adapted.save_pretrained(tmp_path / "lora")
    want = reference_logits(adapted, TOKENS)
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    model.adapters.load("a", tmp_path / "lora")
    got = model.ops.to_numpy(model.forward([ForwardItem("y", TOKENS, 0, adapter="a")], all_logits=True).logits)
    assert scaled_error(got, want) <= 1e-4
    assert scaled_error(reference_logits(hf, TOKENS), want) > 1e-2  # the adapter moves the logits
