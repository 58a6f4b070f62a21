"""DBRX (``dbrx``): LayerNorms without bias, q/k/v in one matrix clipped by attn_config's clip_qkv, plain rope from
attn_config's rope_theta, and experts on every layer (``ffn``: a softmax router ``router.layer``, top-k weights
divided by their sum where moe_normalize_expert_weights is 1), stored as transformers saves them
(``experts.mlp.{w1,v1,w2}``, 2-D) or as mlx-lm converts them (one Linear per expert); against transformers'
DbrxForCausalLM on every runnable backend, and mlx-lm's DBRX and its conversions.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, mlx_lm_logits, reference_logits, runnable_backends, saved_references, scaled_error,
    write_tokenizer,
)

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]


def dbrx_config(attn=None, ffn=None, **extra) -> transformers.DbrxConfig:
    """A small DBRX; the rope base written both where transformers reads it (rope_parameters) and where mlx-lm and
    the release read it (attn_config), alike, so that transformers is a reference."""
    attn = {"kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 500_000.0, **(attn or {})}
    ffn = {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 3, **(ffn or {})}
    theta = attn.get("rope_theta") or 10000.0
    settings = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=97, max_seq_len=256, bos_token_id=1,
                    eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": theta})
    return transformers.DbrxConfig(**{**settings, **extra}, attn_config=attn, ffn_config=ffn)


#: The release's layout (q/k/v clipped, grouped queries, top-k weights renormalized); and multi-query attention
#: clipped where it never bites at transformers' default rope base, its top-2 weights left as the softmax gives them
#: (neither transformers 5.24 nor mlx-lm runs clip_qkv null, which DbrxConfig defaults to: Ferrum runs it unclipped).
VARIANTS = {"release": {}, "unnormalized": dict(attn={"kv_n_heads": 1, "clip_qkv": 1e4, "rope_theta": None},
                                                ffn={"moe_top_k": 2, "moe_normalize_expert_weights": None})}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, dbrx_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch, moe = model.config.arch, model.config.arch.moe
    assert [spec.mlp for spec in arch.layers] == ["moe", "moe"] and arch.norm == "layer" and not arch.norm_bias
    assert (arch.clip_qkv, arch.layers[0].rope.theta, model.config.num_kv_heads) == (
        (0.5, 500_000.0, 2) if variant == "release" else (1e4, 10000.0, 1))
    assert (moe.routing, moe.top_k, moe.normalize, moe.router_float32) == (
        "softmax", 3 if variant == "release" else 2, variant == "release", False)
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_checks_the_clipping(checkpoints, tmp_path):
    """Unclipped, transformers' logits move: the comparison above runs with q, k and v clipped."""
    folder, hf = checkpoints["release"]
    config = json.loads((folder / "config.json").read_text())
    config["attn_config"]["clip_qkv"] = 1e4
    shutil.copytree(folder, tmp_path / "unclipped")
    (tmp_path / "unclipped" / "config.json").write_text(json.dumps(config))
    unclipped = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "unclipped").float().eval()
    assert scaled_error(reference_logits(unclipped, TOKENS), reference_logits(hf, TOKENS)) > 1e-2


def test_random_checkpoints_default_to_mlx_lm_s_experts(tmp_path):
    """Written as mlx-lm stores them by default (one Linear per expert), which Ferrum reads alike."""
    from safetensors import safe_open

    from ferrum.random_checkpoint import write_random_checkpoint

    raw = {**dbrx_config().to_dict(), "architectures": ["DbrxForCausalLM"]}
    mlx_lm = write_random_checkpoint(tmp_path / "mlx_lm", raw, dtype="float32", std=0.2)
    ours = write_random_checkpoint(tmp_path / "hf", raw, dtype="float32", std=0.2, expert_layout="transformers")
    with safe_open(str(mlx_lm / "model.safetensors"), framework="numpy") as f:
        assert tuple(f.get_slice("transformer.blocks.1.ffn.experts.7.w2.weight").get_shape()) == (64, 32)
        assert not any(".experts.mlp." in name for name in f.keys())
    got, want = (DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32").forward_verify("x", TOKENS)
                 for folder in (mlx_lm, ours))
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ config


def _raw(attn=None, ffn=None, **changes) -> dict:
    raw = dbrx_config().to_dict()
    return {**raw, "attn_config": {**raw["attn_config"], **(attn or {})},
            "ffn_config": {**raw["ffn_config"], **(ffn or {})}, **changes}


def test_config_is_read_as_its_runtimes_read_it():
    """The sizes under DBRX's names and its nested sections; the defaults DbrxConfig's; the rope base attn_config's
    (the release's config sets no other), else rope_parameters' or rope_theta's (transformers')."""
    config = ModelConfig.from_dict(_raw())
    assert (config.hidden_size, config.num_heads, config.num_kv_heads, config.num_layers, config.intermediate_size,
            config.max_seq_len, config.rms_norm_eps) == (64, 4, 2, 2, 32, 256, 1e-5)
    release = {"model_type": "dbrx", "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 97,
               "attn_config": {"clip_qkv": 8, "kv_n_heads": 2, "rope_theta": 500000, "model_type": ""},
               "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 16, "moe_top_k": 4, "moe_jitter_eps": 0.01}}
    config = ModelConfig.from_dict(release)
    assert (config.rope_theta, config.arch.clip_qkv, config.arch.moe.num_experts, config.arch.moe.top_k) == (
        500000.0, 8, 16, 4)
    defaults = ModelConfig.from_dict({"model_type": "dbrx"})
    want = transformers.DbrxConfig()
    assert (defaults.hidden_size, defaults.num_heads, defaults.num_kv_heads, defaults.num_layers,
            defaults.intermediate_size, defaults.vocab_size, defaults.max_seq_len) == (
        want.d_model, want.n_heads, want.attn_config.kv_n_heads, want.n_layers, want.ffn_config.ffn_hidden_size,
        want.vocab_size, want.max_seq_len)
    assert (defaults.arch.moe.num_experts, defaults.arch.moe.top_k, defaults.arch.moe.normalize) == (4, 1, True)
    assert (defaults.rope_theta, defaults.arch.clip_qkv) == (want.rope_parameters["rope_theta"], None)
    for extra in ({"rope_theta": 1234.0}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}):
        raw = {"model_type": "dbrx", **extra}
        assert ModelConfig.from_dict(raw).rope_theta == transformers.DbrxConfig(**extra).rope_parameters[
            "rope_theta"] == 1234.0


@pytest.mark.parametrize("changes, error, words", [
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), ConfigError,
     "'attn_config.rope_theta' is 500000.0, but rope_parameters says 10000.0"),
    (dict(rope_parameters=None, rope_theta=10000.0), ConfigError,
     "'attn_config.rope_theta' is 500000.0, but rope_theta says 10000.0"),
    (dict(ffn={"moe_top_k": 9}), ConfigError, "'ffn_config.moe_top_k' (9) exceeds the 8 experts"),
    (dict(ffn={"moe_normalize_expert_weights": 2.0}), UnsupportedFeatureError,
     "'ffn_config.moe_normalize_expert_weights' is 2.0"),
    (dict(ffn={"ffn_act_fn": {"name": "gelu"}}), UnsupportedFeatureError, "'ffn_config.ffn_act_fn'"),
    (dict(attn={"kv_n_heads": 3}), ConfigError, "is 3, but n_heads (4) must be a multiple of it"),
    (dict(attn={"clip_qkv": -1}), ConfigError, "'attn_config.clip_qkv' must be a positive number"),
    (dict(attn_config="eight heads"), ConfigError, "'attn_config' must be an object"),
    (dict(tie_word_embeddings=True), ConfigError, "'tie_word_embeddings' is True"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}), UnsupportedFeatureError,
     "rope type 'linear'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


def test_a_transformers_checkpoint_of_the_release_config_is_refused(tmp_path):
    """transformers 5 saves rope_parameters at its own default beside the release's attn_config.rope_theta: the two
    disagree, and which base the weights were trained at is not Ferrum's guess."""
    raw = _raw()
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="make them agree"):
        ModelConfig.from_dict(raw)


# ------------------------------------------------------------------ mlx-lm

needs_mlx = pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")


def _with_tokenizer(folder, destination):
    shutil.copytree(folder, destination)
    write_tokenizer(destination)
    return destination


@needs_mlx
def test_mlx_backend_matches_mlx_lm(checkpoints, tmp_path):
    """mlx-lm reads transformers' experts through its sanitize; its softmax routing runs in float32, its weights
    always divided by their sum, as the release's config asks."""
    folder = _with_tokenizer(checkpoints["release"][0], tmp_path / "hf")
    got = DecoderOnlyLLM.from_pretrained(folder, backend="mlx", dtype="float32").forward_verify("m", TOKENS)
    assert scaled_error(got, mlx_lm_logits(folder, TOKENS)) <= 1e-4


@needs_mlx
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(checkpoints, bits, tmp_path):
    """mlx-lm splits the experts into one Linear each (``ffn.experts.{e}.w2`` ``[hidden, ffn]``), packed where
    quantized: its conversions run on every backend as mlx-lm runs them."""
    from mlx_lm.convert import convert
    from safetensors import safe_open

    source = _with_tokenizer(checkpoints["release"][0], tmp_path / "hf")
    converted = tmp_path / "mlx"
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    with safe_open(str(converted / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "transformer.blocks.1.ffn.experts.7.w2.weight" in names and not any(".experts.mlp." in n for n in names)
    assert ("transformer.blocks.1.ffn.experts.7.w2.scales" in names) == (bits is not None)
    want = mlx_lm_logits(converted, TOKENS)
    for backend in BACKENDS:
        got = DecoderOnlyLLM.from_pretrained(converted, backend=backend, dtype="float32").forward_verify("m", TOKENS)
        assert scaled_error(got, want) <= 1e-4, backend


@needs_mlx
def test_ferrum_quantize_output_loads(checkpoints, tmp_path):
    """``ferrum quantize`` packs the experts stacked under the model's own names (``ffn.switch_mlp.*``), which
    Ferrum reads as it reads mlx-lm's 4-bit conversion (the same codes, expert for expert)."""
    from mlx_lm.convert import convert

    from ferrum.quant.convert import quantize_checkpoint

    source = _with_tokenizer(checkpoints["release"][0], tmp_path / "hf")
    ours = quantize_checkpoint(source, tmp_path / "ferrum", bits=4, group_size=32)
    convert(str(source), str(tmp_path / "mlx"), quantize=True, q_bits=4, q_group_size=32)
    want = mlx_lm_logits(tmp_path / "mlx", TOKENS)
    got = DecoderOnlyLLM.from_pretrained(ours, backend="cpu", dtype="float32").forward_verify("m", TOKENS)
    assert scaled_error(got, want) <= 1e-4


def test_malformed_experts_are_named(checkpoints, tmp_path):
    """transformers' experts of another width than config.json's are refused, naming the tensor and the shape."""
    from safetensors.numpy import load_file, save_file

    from ferrum.errors import CheckpointError

    folder = shutil.copytree(checkpoints["release"][0], tmp_path / "bad")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["transformer.blocks.1.ffn.experts.mlp.w2"] = tensors["transformer.blocks.1.ffn.experts.mlp.w2"][:-8]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape("transformer.blocks.1.ffn.experts.mlp.w2 must be float "
                                                        "[256, 64]")):
        DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32")
