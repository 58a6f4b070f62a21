"""Dense families of remote-code origin: EXAONE 3 / 3.5 (``exaone``), InternLM3 (``internlm3``), InternLM2 / 2.5
(``internlm2``), IQuest-Coder (``iquestcoder``), CWM (``cwm``), Jais 2 (``jais2``), HyperCLOVA X SEED
(``hyperclovax``), Granite SWA (``granite_swa``), MiniCPM (``minicpm``), MiniCPM3 (``minicpm3``) and Youtu-LLM
(``youtu``). Tiny random checkpoints saved as the releases store them (config keys included), against transformers'
own model where it has one, else against mlx-lm's; on every runnable backend, through the engine, and mlx-lm's
conversions (float and 4-bit) against mlx-lm."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import ferrum
from ferrum.arch.families import FAMILIES as FAMILY_TABLE
from ferrum.config import ModelConfig
from ferrum.engine import Engine, EngineConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    build_transformers_model, mlx_lm_logits, reference_logits, runnable_backends, scaled_error,
    staggered_greedy_workload, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
MLA = dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=12)
#: longrope's short factors (the ones within original_max_position_embeddings), far from 1 so that they matter.
SHORT = [8.0, 16.0, 32.0, 64.0]

#: name -> (model_type, transformers config settings beyond COMMON, config.json keys renamed as the release spells
#: them). Each exercises what its family adds: EXAONE 3.5's llama3 rope under its own key names, tied; InternLM3's
#: qkv_bias / bias (its rope "dynamic", unscaled within max_position_embeddings); CWM's default layer kinds (every
#: fourth full from the first) and llama3 rope with a window shorter than the prompt; Jais 2's LayerNorms, biases and
#: squared ReLU; HyperCLOVA X's multipliers and post norms; Granite SWA's sinks, windows and per-layer rope bases
#: (0: none); MiniCPM3's latent attention with rotate-half longrope and muP (v_head_dim left to its
#: default, hidden_size / heads); Youtu's latent attention, interleaved.
TRANSFORMERS_CASES = {
    "exaone": ("exaone", dict(tie_word_embeddings=True, rms_norm_eps=1e-6, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
        {"num_hidden_layers": "num_layers", "rms_norm_eps": "layer_norm_epsilon", "hidden_act": "activation_function"}),
    "internlm3": ("internlm3", dict(head_dim=16, attention_bias=True, mlp_bias=True, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 50000.0, "factor": 6.0}),
        {"attention_bias": "qkv_bias", "mlp_bias": "bias"}),
    "iquestcoder": ("iquestcoder", dict(head_dim=24), {}),
    "cwm": ("cwm", dict(num_hidden_layers=5, head_dim=16, sliding_window=4), {}),
    "jais2": ("jais2", dict(num_key_value_heads=4), {}),
    "hyperclovax": ("hyperclovax", dict(embedding_multiplier=3.0, residual_multiplier=0.6, logits_scaling=0.25,
                                        attention_multiplier=0.2), {}),
    "granite_swa": ("granite_swa", dict(num_hidden_layers=5, sliding_window=4, layer_rope_theta=[1e4, 0, 500.0, 1e4, 0],
                                        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                        logits_scaling=3.0), {}),
    "minicpm3": ("minicpm3", dict(**{**MLA, "v_head_dim": None}, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": [4.0] * 4,
        "original_max_position_embeddings": 128}), {}),
    "youtu": ("youtu", dict(**MLA), {}),
}
MLX_LM_CASES = ("internlm2", "minicpm")
FAMILIES = (*TRANSFORMERS_CASES, *MLX_LM_CASES)


def _released(config: dict, renamed: dict[str, str]) -> dict:
    """A transformers-5 config.json as a release writes it: keys under the release's names, the rope as
    rope_theta and rope_scaling."""
    config = {renamed.get(k, k): v for k, v in config.items()}
    params = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = params.get("rope_theta", 10000.0)
    if params.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return config


def _internlm2(folder):
    """InternLM2 as its remote code stores it: q/k/v packed in ``wqkv`` by key/value head, the LM head ``output``."""
    h, heads, kv, d, ff = 64, 4, 2, 16, 80
    rng = np.random.default_rng(0)
    tensors = {"model.tok_embeddings.weight": (VOCAB, h), "model.norm.weight": (h,), "output.weight": (VOCAB, h)}
    for i in range(3):
        p = f"model.layers.{i}."
        tensors.update({p + "attention.wqkv.weight": ((heads + 2 * kv) * d, h), p + "attention.wqkv.bias": (
            (heads + 2 * kv) * d,), p + "attention.wo.weight": (h, heads * d), p + "attention.wo.bias": (h,),
            p + "feed_forward.w1.weight": (ff, h), p + "feed_forward.w3.weight": (ff, h),
            p + "feed_forward.w2.weight": (h, ff), p + "attention_norm.weight": (h,), p + "ffn_norm.weight": (h,)})
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", **COMMON, "bias": True,
              "rms_norm_eps": 1e-5, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
              "hidden_act": "silu", "tie_word_embeddings": False}
    return config, {n: rng.normal(0, 0.2, s).astype(np.float32) + (1 if n.endswith("norm.weight") else 0)
                    for n, s in tensors.items()}


def _minicpm(folder):
    """MiniCPM 2B's config keys (its muP scalings), untied (mlx-lm scales the LM head's input only then)."""
    h, heads, kv, d, ff = 64, 4, 2, 16, 80
    rng = np.random.default_rng(1)
    tensors = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    for i in range(3):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
                        p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
                        p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                        p + "mlp.down_proj.weight": (h, ff), p + "input_layernorm.weight": (h,),
                        p + "post_attention_layernorm.weight": (h,)})
    config = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", **COMMON, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu", "scale_emb": 12,
              "dim_model_base": 16, "scale_depth": 1.4, "tie_word_embeddings": False}
    return config, {n: rng.normal(0, 0.2, s).astype(np.float32) + (1 if n.endswith("norm.weight") else 0)
                    for n, s in tensors.items()}


def _write(folder, config: dict, tensors: dict):
    from safetensors.numpy import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder, transformers model or None): the release's layout and config keys."""
    out = {}
    for name, (model_type, settings, renamed) in TRANSFORMERS_CASES.items():
        folder = tmp_path_factory.mktemp(name)
        config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **settings})
        hf = build_transformers_model(folder, config)
        saved = json.loads((folder / "config.json").read_text())
        if renamed:
            (folder / "config.json").write_text(json.dumps(_released(saved, renamed)))
        out[name] = folder, hf
    for name, make in (("internlm2", _internlm2), ("minicpm", _minicpm)):
        folder = tmp_path_factory.mktemp(name)
        out[name] = _write(folder, *make(folder)), None
    return out


def _reference(checkpoints, family, tokens=TOKENS) -> np.ndarray:
    folder, hf = checkpoints[family]
    return mlx_lm_logits(folder, tokens) if hf is None else reference_logits(hf, tokens)


def load(folder, backend="cpu", **kw) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", **{"block_size": 4, **kw})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_the_reference(checkpoints, family, backend):
    """One forward pass, then a prefill and token-by-token decode, against transformers' logits (mlx-lm's for the
    families transformers lacks, whose float32 matmuls round differently: a looser bound)."""
    if checkpoints[family][1] is None and "mlx" not in BACKENDS:
        pytest.skip("mlx-lm, the reference, needs MLX")
    tolerance = 1e-4 if checkpoints[family][1] is not None else 1e-3
    assert_forward_and_decode_match(load(checkpoints[family][0], backend), TOKENS,
                                    _reference(checkpoints, family), tolerance)


def test_transformers_reads_the_release_keys_as_ferrum_does(checkpoints):
    """The configs rewritten with the releases' key names (EXAONE's num_layers..., InternLM3's qkv_bias / bias) are
    the same models to transformers, and Ferrum reads what they say."""
    for family in ("exaone", "internlm3"):
        folder, hf = checkpoints[family]
        again = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
        assert scaled_error(reference_logits(again, TOKENS), reference_logits(hf, TOKENS)) < 1e-6
    exaone = ModelConfig.from_file(checkpoints["exaone"][0])
    assert (exaone.num_layers, exaone.rms_norm_eps, exaone.tie_word_embeddings) == (3, 1e-6, True)
    assert exaone.arch.layers[0].rope.kind == "llama3"
    internlm3 = ModelConfig.from_file(checkpoints["internlm3"][0]).arch
    assert internlm3.qkv_bias and internlm3.o_bias and internlm3.mlp_bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(TRANSFORMERS_CASES))
def test_generates_greedily_as_transformers(checkpoints, family, backend):
    folder, hf = checkpoints[family]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS)


def _engine(folder, backend="cpu", **config) -> Engine:
    return Engine(LlmExecutor(load(folder, backend, num_kv_blocks=64)), None, EngineConfig(**config))


@pytest.mark.parametrize("family", ["hyperclovax", "granite_swa", "minicpm3", "cwm"])
def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(checkpoints, family):
    """The pieces new here through the engine: scales folded into post norms, sinks with per-layer rope bases over
    sliding layers, latent attention with longrope and muP, CWM's window."""
    folder, hf = checkpoints[family]
    assert_engine_keeps_greedy_tokens(lambda **config: _engine(folder, **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm, the reference, needs MLX")
@pytest.mark.parametrize("family", MLX_LM_CASES)
def test_mlx_lm_families_generate_greedily_as_mlx_lm(checkpoints, family):
    """Greedy tokens through the engine, batched and from the prefix cache, each mlx-lm's argmax in turn."""
    folder, _ = checkpoints[family]
    want, tokens = [], list(TOKENS)
    for _ in range(8):
        want.append(int(np.argmax(mlx_lm_logits(folder, tokens)[-1])))
        tokens.append(want[-1])
    for backend in BACKENDS:
        llm = ferrum.load(folder, backend=backend, dtype="float32")
        first, _, again = llm.run([TOKENS, TOKENS[:5], TOKENS], max_tokens=8, temperature=0.0, ignore_eos=True)
        assert list(first.token_ids) == want and list(again.token_ids) == want, backend


def test_the_new_settings_each_change_the_logits(checkpoints, monkeypatch):
    """Controls that the parity above can fail: HyperCLOVA X's post norms and residual multiplier, Granite SWA's
    per-layer rope bases and sinks, MiniCPM3's longrope factors, each changed, move transformers' logits; and
    InternLM2's wqkv read ungrouped moves Ferrum's off mlx-lm's."""
    from dataclasses import replace

    for family, change in (("hyperclovax", {"use_post_norm": False}), ("hyperclovax", {"residual_multiplier": 1.0}),
                           ("granite_swa", {"layer_rope_theta": [1e4] * 5}),
                           ("minicpm3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})):
        folder, hf = checkpoints[family]
        other = transformers.AutoModelForCausalLM.from_pretrained(folder, **change).float().eval()
        assert scaled_error(reference_logits(other, TOKENS), reference_logits(hf, TOKENS)) > 1e-3, (family, change)
    folder, hf = checkpoints["granite_swa"]
    sinkless = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        for layer in sinkless.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert scaled_error(reference_logits(sinkless, TOKENS), reference_logits(hf, TOKENS)) > 1e-3
    if "mlx" in BACKENDS:
        family = FAMILY_TABLE["internlm2"]
        monkeypatch.setitem(FAMILY_TABLE, "internlm2", replace(
            family, build=lambda r, sizes: replace(family.build(r, sizes), qkv_grouped=False)))
        ungrouped = load(checkpoints["internlm2"][0])
        assert scaled_error(ungrouped.forward_verify("u", TOKENS), _reference(checkpoints, "internlm2")) > 1e-2


def _untied(folder) -> None:
    """The checkpoint in ``folder`` with its LM head stored, a copy of the embedding."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


#: Each family's mlx-lm conversions (mlx-lm reads transformers 4's rope keys; its minicpm3 defaults rope_theta to
#: another base than transformers; Youtu-LLM's release, and so mlx-lm, names the family youtu_llm).
MLX_LM_CONVERTED = {"exaone": {}, "internlm3": {}, "iquestcoder": {}, "minicpm3": {"rope_theta": 10000.0},
                    "youtu": {"model_type": "youtu_llm"}, "internlm2": {}, "minicpm": {}}


@pytest.mark.slow  # mlx-lm converts and quantizes each: ~2 s apiece
@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("family", list(MLX_LM_CONVERTED))
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(checkpoints, family, bits, tmp_path):
    convert = pytest.importorskip("mlx_lm.convert")
    source = tmp_path / "hf"
    shutil.copytree(checkpoints[family][0], source)
    config = json.loads((source / "config.json").read_text())
    if "rope_parameters" in config:
        config = _released(config, {})
    if family == "minicpm3":  # mlx-lm scales the LM head's input only when untied, and rotates by the long factors
        _untied(source)
        config.update(tie_word_embeddings=False, rope_scaling={**config["rope_scaling"], "long_factor": SHORT})
    (source / "config.json").write_text(json.dumps({**config, **MLX_LM_CONVERTED[family]}))
    write_tokenizer(source)
    converted = tmp_path / "mlx"
    convert.convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    want = mlx_lm_logits(converted, TOKENS[:9])
    for backend in BACKENDS:
        got = load(converted, backend).forward_verify("m", TOKENS[:9])
        assert scaled_error(got, want) <= (1e-3 if bits is None else 1e-2), backend


@pytest.mark.parametrize("family, change, error, key", [
    ("internlm3", {"qkv_bias": True, "bias": False}, UnsupportedFeatureError, "qkv_bias"),
    ("iquestcoder", {"clip_qkv": 8.0}, UnsupportedFeatureError, "clip_qkv"),
    ("iquestcoder", {"use_sliding_window": True}, UnsupportedFeatureError, "use_sliding_window"),
    ("minicpm", {"scale_emb": None}, ConfigError, "scale_emb"),
    ("minicpm", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
     UnsupportedFeatureError, "rope_scaling"),
    ("granite_swa", {"layer_rope_theta": [1e4, 0]}, ConfigError, "layer_rope_theta"),
    ("jais2", {"hidden_act": "silu"}, UnsupportedFeatureError, "hidden_act"),
])
def test_unsupported_variants_are_refused_by_name(checkpoints, family, change, error, key):
    raw = {**json.loads((checkpoints[family][0] / "config.json").read_text()), **change}
    with pytest.raises(error, match=key):
        ModelConfig.from_dict(raw)
