"""Dense families mlx-lm runs under their releases' model_types, which transformers has no code for: XVERSE
(``xverse``, mlx-lm's llama), MiMo-7B (``mimo``: Qwen 2's blocks, its MTP layers dropped), and the text models of
Pixtral's (``pixtral``) and LFM2-VL's (``lfm2-vl``) wrappers; each against mlx-lm's own model and transformers' on the
same weights, and mlx-lm's conversions."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import UnsupportedFeatureError
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    assert_stray_tensors_quiet_only_where_transformers_skips_them, build_transformers_model, float32_model,
    mlx_lm_converted, mlx_lm_logits, reference_logits, runnable_backends, scaled_error, small_pool_engine,
    staggered_greedy_workload, with_edited_tensors, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _release_config(folder, drop: tuple[str, ...] = (), **settings) -> None:
    """config.json as a remote-code release writes it (transformers 4's rope_theta; ``drop``'s keys left out)."""
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config.update(settings)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in drop}))


@pytest.fixture(scope="module")
def xverse(tmp_path_factory):
    """XVERSE-13B's layout: Llama's blocks, no num_key_value_heads, each layer's rotary inv_freq stored."""
    folder = tmp_path_factory.mktemp("xverse")
    hf = build_transformers_model(folder, transformers.LlamaConfig(**SIZES, num_key_value_heads=4))
    write_tokenizer(folder, VOCAB)
    _release_config(folder, drop=("num_key_value_heads", "head_dim", "attention_bias", "mlp_bias"),
                    model_type="xverse", architectures=["XverseForCausalLM"], max_tokenizer_truncation=6144,
                    auto_map={"AutoConfig": "configuration_xverse.XverseConfig"}, quantization_bit=0)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 16, 2, dtype=np.float32) / 16)
    with_edited_tensors(folder, folder / "release", lambda t: t.update(
        {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(2)}))
    return folder / "release", hf


@pytest.fixture(scope="module")
def mimo(tmp_path_factory):
    """MiMo-7B's layout: Qwen 2's blocks (q/k/v biased) and a multi-token prediction layer under model.mtp_layers."""
    folder = tmp_path_factory.mktemp("mimo")
    hf = build_transformers_model(folder, transformers.Qwen2Config(**SIZES, num_key_value_heads=2))
    write_tokenizer(folder, VOCAB)
    _release_config(folder, model_type="mimo", architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1)
    mtp = {f"model.mtp_layers.0.{name}.weight": np.ones(shape, np.float32) for name, shape in (
        ("token_layernorm", (64,)), ("hidden_layernorm", (64,)), ("input_proj", (64, 128)),
        ("self_attn.q_proj", (64, 64)), ("mlp.gate_proj", (96, 64)), ("final_layernorm", (64,)))}
    with_edited_tensors(folder, folder / "release", lambda t: t.update(mtp))
    return folder / "release", hf


FAMILIES = ["xverse", "mimo"]


@pytest.fixture(scope="module")
def releases(xverse, mimo):
    """model_type -> (release folder, transformers' model of its weights, mlx-lm's logits over TOKENS)."""
    return {name: (folder, hf, mlx_lm_logits(folder, TOKENS)) for name, (folder, hf) in zip(FAMILIES, (xverse, mimo))}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_runs_as_mlx_lm_and_transformers(releases, family, backend):
    folder, hf, want = releases[family]
    assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    model = float32_model(folder, backend, block_size=4)
    assert model.config.model_type == family and model.config.arch.qkv_bias == (family == "mimo")
    assert_forward_and_decode_match(model, TOKENS, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_keeps_greedy_tokens(releases, family):
    folder, hf, _ = releases[family]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, "cpu", **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm's conversions need MLX")
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_lm_conversions_load(releases, tmp_path, family, bits):
    """mlx-lm's conversions (MiMo's MTP layers and XVERSE's inv_freq dropped), float and packed."""
    folder, _, want = releases[family]
    stored, got = mlx_lm_converted(folder, tmp_path / "mlx", TOKENS, bits, group=32)
    assert not any("mtp_layers" in name or "inv_freq" in name for name in stored)
    assert ("model.layers.0.mlp.up_proj.scales" in stored) == (bits is not None)
    if bits is None:
        assert scaled_error(got, want) <= 1e-4
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, got, packed=bits is not None)


def test_mimo_leaves_only_its_prediction_layers_out_quietly(mimo, tmp_path):
    """The control: a stray tensor elsewhere is still reported unread."""
    folder, hf = mimo
    assert_stray_tensors_quiet_only_where_transformers_skips_them(
        folder, tmp_path, ["model.mtp_layers.1.input_proj.weight"], hf, TOKENS)


def test_xverse_moe_is_refused_by_name(xverse):
    raw = json.loads((xverse[0] / "config.json").read_text())
    assert ModelConfig.from_dict({**raw, "num_experts": None}).num_kv_heads == 4  # absent: as many as the heads
    with pytest.raises(UnsupportedFeatureError, match=re.escape("'num_experts' is 64: XVERSE-MoE's experts")):
        ModelConfig.from_dict({**raw, "num_experts": 64, "moe_top_k": 6})


# ------------------------------------------------------------------ the wrappers' text models


def _wrap(folder, dest, wrapper: str, text_type: str, prefix: str = "language_model.") -> None:
    """Checkpoint ``folder``'s text model under ``prefix`` with a vision tower and projector beside it, its config as
    ``wrapper``'s text_config."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, dest)
    tensors = {prefix + name: value for name, value in load_file(dest / "model.safetensors").items()}
    tensors.update({name: np.ones((4, 4), np.float32) for name in (
        "vision_tower.transformer.layers.0.attention.q_proj.weight", "multi_modal_projector.linear_1.weight")})
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    text = {**json.loads((dest / "config.json").read_text()), "model_type": text_type}
    (dest / "config.json").write_text(json.dumps({"model_type": wrapper, "text_config": text, "vision_config": {},
                                                  "torch_dtype": text.get("torch_dtype", text.get("dtype"))}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixtral_runs_its_mistral_text_model_as_mlx_lm(tmp_path, backend):
    """mlx-lm's pixtral: a Mistral text model (full attention: sliding_window null) under language_model."""
    text = tmp_path / "text"
    hf = build_transformers_model(text, transformers.MistralConfig(**SIZES, num_key_value_heads=2,
                                                                   sliding_window=None))
    write_tokenizer(text, VOCAB)
    _release_config(text)
    _wrap(text, tmp_path / "pixtral", "pixtral", "mistral")
    want = mlx_lm_logits(tmp_path / "pixtral", TOKENS)
    assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    model = float32_model(tmp_path / "pixtral", backend, block_size=4)
    assert model.config.model_type == "mistral" and model.config.arch.prefix == "language_model.model."
    assert_forward_and_decode_match(model, TOKENS, want)


def test_lfm2_vl_runs_its_text_model_as_mlx_lm(tmp_path):
    """LFM2-VL's model_type as its releases write it (``lfm2-vl``): transformers' layout runs as transformers runs it;
    mlx-lm's lfm2-vl loads the text model as mlx-lm's conversions store it (taps [C, K, 1]) under language_model.,
    and every backend runs that as mlx-lm does."""
    from test_lfm2 import _as_released, lfm2_config

    config = transformers.Lfm2VlConfig(text_config=lfm2_config().to_dict(), projector_hidden_size=32,
                                       vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2))
    saved = tmp_path / "hf"
    hf = build_transformers_model(saved, config, model_class=transformers.Lfm2VlForConditionalGeneration)
    raw = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**raw, "model_type": "lfm2-vl"}))
    assert scaled_error(float32_model(saved).forward_verify("v", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4
    text = tmp_path / "text"
    build_transformers_model(text, lfm2_config())
    write_tokenizer(text, VOCAB)
    _, want = mlx_lm_converted(_as_released(text, tmp_path / "release"), tmp_path / "mlx", TOKENS)
    _wrap(tmp_path / "mlx", tmp_path / "vl", "lfm2-vl", "lfm2")
    got = mlx_lm_logits(tmp_path / "vl", TOKENS)
    assert scaled_error(got, want) <= 1e-4
    for backend in BACKENDS:
        assert scaled_error(float32_model(tmp_path / "vl", backend).forward_verify("m", TOKENS), got) <= 1e-4, backend


@pytest.mark.parametrize("wrapper, family", [("pixtral", "mistral"), ("lfm2-vl", "lfm2")])
def test_a_text_config_without_model_type_is_the_wrappers_decoder(wrapper, family):
    text = {**SIZES, "num_key_value_heads": 2} if family == "mistral" else {
        **SIZES, "num_key_value_heads": 2, "layer_types": ["conv", "full_attention"]}
    config = ModelConfig.from_dict({"model_type": wrapper, "text_config": text, "vision_config": {}})
    assert config.model_type == family
