"""LG's K-EXAONE (``exaone_moe``): EXAONE 4's attention (per-head q/k norms, sliding layers rotated, full layers
NoPE) in Llama's pre-norm blocks, over DeepSeek-V3's MoE: a float32 router ``gate`` with grouped sigmoid routing and
a float32 correction bias stored beside it (``mlp.e_score_correction_bias``), ungated shared experts, dense first
layers; against transformers' ExaoneMoeForCausalLM on every runnable backend, and mlx-lm's exaone_moe and its
conversions (which move the bias under the router).
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
WINDOW = 4  # shorter than TOKENS


def exaone_config(**extra) -> transformers.ExaoneMoeConfig:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8,
                    num_experts_per_tok=2, num_shared_experts=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                    sliding_window=WINDOW, sliding_window_pattern=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    return transformers.ExaoneMoeConfig(**{**settings, **extra})


#: Two groups (one kept), layers 0 and 2 sliding and rotated, layer 1 full and NoPE; and K-EXAONE's own layout:
#: one group, one shared expert, three layers of four sliding (here the last full), tied. (transformers 5.24's
#: ExaoneMoeConfig refuses a sliding_window of None.)
VARIANTS = {"grouped": {}, "release": dict(n_group=1, topk_group=1, num_shared_experts=1, sliding_window_pattern=3,
                                           num_experts_per_tok=3, tie_word_embeddings=True)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, exaone_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    arch = model.config.arch
    assert [spec.mlp for spec in arch.layers] == ["dense", "moe", "moe"]
    assert [spec.window for spec in arch.layers] == (
        [WINDOW, None, WINDOW] if variant == "grouped" else [WINDOW, WINDOW, None])
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_parity_checks_the_window(checkpoints):
    """Making every layer full moves transformers' logits: the window matters in the comparison above (the
    correction biases' control is tests/test_moe_families.py's)."""
    folder, hf = checkpoints["grouped"]
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(
        folder, layer_types=["full_attention"] * 3).float().eval()
    assert scaled_error(reference_logits(unwindowed, TOKENS), reference_logits(hf, TOKENS)) > 1e-2


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**exaone_config().to_dict(), **changes}


def test_dense_layers_follow_transformers_rule():
    """mlp_layer_types, else the layers from first_k_dense_replace on; LG's is_moe_layer accepted where it agrees."""
    def kinds(**changes):
        return [layer.mlp for layer in ModelConfig.from_dict(_raw(**changes)).arch.layers]

    assert kinds(mlp_layer_types=None, first_k_dense_replace=2) == ["dense", "dense", "moe"]
    assert kinds(mlp_layer_types=["sparse", "dense", "sparse"]) == ["moe", "dense", "moe"]
    assert kinds(is_moe_layer=[False, True, True]) == ["dense", "moe", "moe"]


@pytest.mark.parametrize("changes, error, words", [
    ({"is_moe_layer": [False, False, True]}, ConfigError,
     "'is_moe_layer' is [False, False, True], but transformers makes layers [1, 2] sparse"),
    ({"mlp_layer_types": ["dense", "sparse"]}, ConfigError, "'mlp_layer_types' lists 2 layers, but the model has 3"),
    ({"topk_group": 3}, ConfigError, "'topk_group' (3) exceeds the 2 expert groups"),
    ({"num_experts_per_tok": 5}, ConfigError, "'num_experts_per_tok' (5) exceeds the 4 experts of the 1 group"),
    ({"scoring_func": "softmax"}, UnsupportedFeatureError, "'scoring_func'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


def test_transformers_defaults_are_read():
    """Keys a config leaves out take ExaoneMoeConfig's defaults: 64 experts routed top-8 in one group, normalized
    and scaled by 2.5, one shared expert of 1024, the first layer dense."""
    left_out = ("num_experts", "num_experts_per_tok", "n_group", "topk_group", "norm_topk_prob",
                "routed_scaling_factor", "num_shared_experts", "moe_intermediate_size", "mlp_layer_types",
                "first_k_dense_replace")
    arch = ModelConfig.from_dict({k: v for k, v in _raw().items() if k not in left_out}).arch
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.n_group, moe.normalize, moe.routed_scale) == (64, 8, 1, True, 2.5)
    assert (moe.expert_size, moe.shared_expert_size, moe.routing) == (1024, 1024, "sigmoid_grouped")
    assert [layer.mlp for layer in arch.layers] == ["dense", "moe", "moe"]


# ------------------------------------------------------------------ mlx-lm

needs_mlx = pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")


def _as_mlx_lm_reads_it(folder, destination):
    """A checkpoint with the keys mlx-lm's exaone_moe requires (is_moe_layer, the transformers-4 rope_theta) and
    a tokenizer for its conversion."""
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["is_moe_layer"] = [kind == "sparse" for kind in config["mlp_layer_types"]]
    (destination / "config.json").write_text(json.dumps(config))
    write_tokenizer(destination)
    return destination


@needs_mlx
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mlx_backend_matches_mlx_lm(checkpoints, variant, tmp_path):
    folder = _as_mlx_lm_reads_it(checkpoints[variant][0], tmp_path / "hf")
    got = DecoderOnlyLLM.from_pretrained(folder, backend="mlx", dtype="float32").forward_verify("m", TOKENS)
    assert scaled_error(got, mlx_lm_logits(folder, TOKENS)) <= 1e-4


@needs_mlx
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(checkpoints, bits, tmp_path):
    """mlx-lm's conversions stack the experts under ``mlp.switch_mlp`` and move the correction bias under the
    router (``mlp.gate.e_score_correction_bias``): they run on every backend as mlx-lm runs them."""
    from mlx_lm.convert import convert
    from safetensors import safe_open

    source = _as_mlx_lm_reads_it(checkpoints["grouped"][0], tmp_path / "hf")
    converted = tmp_path / "mlx"
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    with safe_open(str(converted / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.1.mlp.e_score_correction_bias" not in names
    want = mlx_lm_logits(converted, TOKENS)
    for backend in BACKENDS:
        got = DecoderOnlyLLM.from_pretrained(converted, backend=backend, dtype="float32").forward_verify("m", TOKENS)
        assert scaled_error(got, want) <= 1e-4, backend


@needs_mlx
def test_ferrum_quantize_writes_what_mlx_lm_runs(checkpoints, tmp_path):
    """mlx-lm's EXAONE MoE holds its router as a plain parameter (``MoEGate``), so its conversions keep it in float
    and its loader refuses it packed: `ferrum quantize` keeps it in float too, and mlx-lm runs the folder as Ferrum
    does."""
    from ferrum.quant.convert import quantize_checkpoint

    source = _as_mlx_lm_reads_it(checkpoints["grouped"][0], tmp_path / "hf")
    out = quantize_checkpoint(source, tmp_path / "q", bits=4, group_size=32)
    assert json.loads((out / "config.json").read_text())["quantization"]["model.layers.1.mlp.gate"] is False
    got = DecoderOnlyLLM.from_pretrained(out, backend="mlx", dtype="float32").forward_verify("m", TOKENS)
    assert scaled_error(got, mlx_lm_logits(out, TOKENS)) <= 1e-4


def test_the_releases_prediction_heads_are_left_out_quietly(checkpoints, tmp_path):
    """K-EXAONE's releases store a multi-token prediction layer (mtp.*), which transformers does not load: not run,
    not reported unread."""
    from support import assert_stray_tensors_quiet_only_where_transformers_skips_them

    folder, hf = checkpoints["release"]
    skipped = ["mtp.layers.0.mlp.up_proj.weight", "mtp.norm.weight"]
    assert_stray_tensors_quiet_only_where_transformers_skips_them(folder, tmp_path, skipped, hf, TOKENS)
