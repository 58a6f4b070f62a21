"""OLMo Hybrid (``olmo_hybrid``): OLMo 3's attention layers (norms after attention and MLP; rope, or none as released)
between Gated DeltaNet layers (Llama's norms, one projection each, beta doubled), against transformers on every
runnable backend; the engine's batching, chunking and preemption; the release's norm names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from ferrum.engine import Engine, EngineConfig
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, built_checkpoints, reference_logits,
    mlx_lm_logits, runnable_backends, scaled_error, staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=21)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
              linear_value_head_dim=12, max_position_embeddings=256, pad_token_id=None, eos_token_id=1,
              layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"])
MODELS = {
    "rope": lambda: transformers.OlmoHybridConfig(**COMMON),
    "nope": lambda: transformers.OlmoHybridConfig(**COMMON, linear_allow_neg_eigval=False,
                                                  rope_parameters={"rope_type": "default", "rope_theta": None}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, MODELS, VOCAB)


def load(folder, backend="cpu", **kwargs) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", **kwargs)


def test_reads_layer_kinds_norms_and_the_gated_delta_variant(checkpoints):
    arch = load(checkpoints["rope"][0]).config.arch
    assert [s.mixer for s in arch.layers] == ["gated_delta", "attention", "gated_delta", "gated_delta"]
    assert arch.layers[1].block_norms(arch) == {"post_attn": "post_attention_layernorm",
                                                "post_mlp": "post_feedforward_layernorm"}
    assert arch.layers[0].block_norms(arch)["pre_attn"] == "input_layernorm"
    assert arch.gated_delta.separate and arch.gated_delta.beta_scale == 2.0 and arch.layers[1].rope.rotary_dim == 16
    nope = load(checkpoints["nope"][0]).config.arch
    assert nope.layers[1].rope.rotary_dim == 0 and nope.gated_delta.beta_scale == 1.0


@pytest.mark.parametrize("spelling", [{"rope_theta": None},
                                      {"rope_theta": None, "rope_parameters": {"rope_type": "default"}}])
def test_a_null_top_level_rope_theta_means_no_rope(checkpoints, tmp_path, spelling):
    """transformers 4's spelling, ``"rope_theta": null`` beside no rope object (or one without a theta): transformers
    5 reads it as no rope, and so does Ferrum."""
    folder, hf = checkpoints["nope"]
    shutil.copytree(folder, tmp_path / "v4")
    raw = json.loads((tmp_path / "v4" / "config.json").read_text())
    raw.pop("rope_parameters")
    (tmp_path / "v4" / "config.json").write_text(json.dumps({**raw, **spelling}))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "v4").rope_parameters["rope_theta"] is None
    model = load(tmp_path / "v4")
    assert model.config.arch.layers[1].rope.rotary_dim == 0
    assert scaled_error(model.forward_verify("v4", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", MODELS)
def test_logits_and_decode_steps_match_transformers(checkpoints, variant, backend):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(load(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_the_doubled_beta_matters(checkpoints):
    """Run without its beta_scale, the rope variant misses transformers: the check above can fail."""
    folder, hf = checkpoints["rope"]
    model = load(folder)
    for layer in model.layers:
        if layer.recurrent is not None:
            layer.recurrent.extended = False
    assert scaled_error(model.forward_verify("b", TOKENS), reference_logits(hf, TOKENS)) > 1e-3


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoints, monkeypatch):
    folder, hf = checkpoints["nope"]
    assert_a_failed_pass_leaves_every_state_as_it_was(load(folder), hf, TOKENS, "causal_conv1d", monkeypatch)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoints):
    folder, hf = checkpoints["rope"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(load(folder), hf, VOCAB)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["rope"]

    def engine(**settings) -> Engine:
        return Engine(LlmExecutor(load(folder, backend, num_kv_blocks=64, block_size=4)), None,
                      EngineConfig(**settings))

    assert_engine_keeps_greedy_tokens(engine, hf, staggered_greedy_workload(VOCAB))


def test_transformers_names_of_the_norms_load_too(checkpoints, tmp_path):
    """transformers 5 saves OLMo-core's norm names (attention_layer_norm, feedforward_layer_norm) and the taps cut in
    three equal parts; a checkpoint under transformers' in-memory names (input_layernorm, post_attention_layernorm,
    one conv1d) runs the same."""
    folder, hf = checkpoints["rope"]
    copy = shutil.copytree(folder, tmp_path / "renamed")
    stored = load_file(copy / "model.safetensors")
    assert {"model.layers.0.attention_layer_norm.weight", "model.layers.0.linear_attn.q_conv1d.weight"} <= set(stored)
    renamed = {}
    for name, array in stored.items():
        name = name.replace("attention_layer_norm", "input_layernorm")
        renamed[name.replace("feedforward_layer_norm", "post_attention_layernorm")] = array
    for layer in (0, 2, 3):
        stem = f"model.layers.{layer}.linear_attn."
        renamed[f"{stem}conv1d.weight"] = np.concatenate([renamed.pop(f"{stem}{p}_conv1d.weight") for p in "qkv"])
    save_file(renamed, copy / "model.safetensors", metadata={"format": "pt"})
    assert scaled_error(load(copy).forward_verify("n", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


def _as_mlx_lm_reads_it(folder, destination, key_dim: int, value_dim: int):
    """The checkpoint under the names mlx-lm's olmo_hybrid loads: transformers' in-memory norm names, and q's, k's and
    v's taps cut at their widths (transformers saves three equal parts)."""
    shutil.copytree(folder, destination)
    stored = load_file(destination / "model.safetensors")
    renamed = {name.replace("attention_layer_norm", "input_layernorm")
               .replace("feedforward_layer_norm", "post_attention_layernorm"): array for name, array in stored.items()}
    bounds = {"q": (0, key_dim), "k": (key_dim, 2 * key_dim), "v": (2 * key_dim, 2 * key_dim + value_dim)}
    for stem in sorted({name.split("q_conv1d")[0] for name in renamed if "q_conv1d" in name}):
        taps = np.concatenate([renamed.pop(f"{stem}{p}_conv1d.weight") for p in "qkv"])
        renamed.update({f"{stem}{p}_conv1d.weight": taps[lo:hi] for p, (lo, hi) in bounds.items()})
    save_file(renamed, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


@pytest.mark.slow  # mlx-lm converts and quantizes each: ~2 s apiece
@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("variant", MODELS)
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(checkpoints, variant, bits, tmp_path):
    """mlx-lm's conversions keep transformers' in-memory norm names and q's, k's and v's taps apart, each stored
    ``[C, K, 1]`` (packed projections at 4 bits): they run on every backend as mlx-lm runs them, and, float, as
    transformers runs the original."""
    from mlx_lm.convert import convert
    from safetensors import safe_open

    folder, hf = checkpoints[variant]
    source = _as_mlx_lm_reads_it(folder, tmp_path / "hf", key_dim=2 * 8, value_dim=4 * 12)
    converted = tmp_path / "mlx"
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32,
            dtype="float32")
    with safe_open(str(converted / "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.layers.0.linear_attn.v_conv1d.weight").get_shape() == [48, 4, 1]
        assert ("model.layers.0.linear_attn.q_proj.scales" in set(f.keys())) == (bits is not None)
    want = mlx_lm_logits(converted, TOKENS)
    assert (scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4) == (bits is None)  # 4 bits move the logits
    for backend in BACKENDS:
        assert_forward_and_decode_match(load(converted, backend), TOKENS, want)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
def test_ferrum_quantize_copies_the_taps_as_stored(checkpoints, tmp_path):
    """`ferrum quantize` copies q's, k's and v's taps apart as they are stored: transformers' save (three equal parts)
    quantizes and runs as the layout mlx-lm reads (parts at their widths, in-memory norm names) does, whose output
    mlx-lm runs as Ferrum does."""
    from ferrum.quant.convert import quantize_checkpoint

    folder, _ = checkpoints["rope"]
    saved = quantize_checkpoint(folder, tmp_path / "saved", bits=4, group_size=32)
    source = _as_mlx_lm_reads_it(folder, tmp_path / "hf", key_dim=2 * 8, value_dim=4 * 12)
    readable = quantize_checkpoint(source, tmp_path / "readable", bits=4, group_size=32)
    taps = "model.layers.0.linear_attn.k_conv1d.weight"
    for src, out in ((folder, saved), (source, readable)):
        assert np.array_equal(load_file(out / "model.safetensors")[taps], load_file(src / "model.safetensors")[taps])
    want = mlx_lm_logits(readable, TOKENS)
    assert scaled_error(load(readable).forward_verify("r", TOKENS), want) <= 1e-4
    assert scaled_error(load(saved).forward_verify("s", TOKENS), want) <= 1e-4


def test_a_residual_scale_folds_into_each_layers_own_norms(checkpoints):
    """Where the layers' block norms differ, a residual scale goes where each layer's own say: into the norm after
    an attention layer's o_proj and MLP (that norm would undo it folded into them), into down_proj of a Llama-normed
    layer (OLMo Hybrid has no such scale: set here)."""
    import dataclasses

    from ferrum.arch.tensors import prepare
    from ferrum.config import ModelConfig

    config = ModelConfig.from_file(checkpoints["rope"][0])
    config = dataclasses.replace(config, arch=dataclasses.replace(config.arch, residual_scale=2.0))
    w = np.random.RandomState(0).rand(64, 64).astype(np.float32)

    def factor(name):
        return float(prepare(config, name, w)[0][1][0, 0] / w[0, 0])

    assert factor("model.layers.1.self_attn.o_proj.weight") == factor("model.layers.1.mlp.down_proj.weight") == 1.0
    assert factor("model.layers.1.post_attention_layernorm.weight") == 2.0
    assert factor("model.layers.1.post_feedforward_layernorm.weight") == 2.0
    assert factor("model.layers.0.mlp.down_proj.weight") == 2.0
    assert factor("model.layers.0.post_attention_layernorm.weight") == 1.0  # its norm before the MLP
