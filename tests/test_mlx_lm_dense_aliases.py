"""Dense families mlx-lm runs under their releases' model_types, which transformers has no code for: XVERSE
(``xverse``, mlx-lm's llama), MiMo-7B (``mimo``: Qwen 2's blocks, its MTP layers dropped); each against mlx-lm's own
model and transformers' on the same weights, and mlx-lm's conversions."""

from __future__ import annotations

import json
import re

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

