"""GGUF import of Nemotron NAS (``deci``): mlx-lm's nemotron-nas given random weights (tests/test_nemotron_nas.py;
the family has no transformers class), each layer's attention grouped over its own key/value heads, linear, skipped
or (Ultra 253B's) skipped with its FFN, written as llama.cpp's DeciModel converts the release (per-layer head counts
and widths as arrays, 0 for what a layer lacks; q/k rows permuted per head; the linear map as attn_output; the llama3
rope as rope_freqs), imported, and run against mlx-lm (float32) or the same file imported in float32 (Q8_0).
Controls: q/k left permuted, or rope_freqs unread, miss mlx-lm; what llama.cpp runs otherwise is refused by name."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("mlx_lm")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    LONG_TOKENS, TINY_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, assert_runs_as_its_float_import,
    ferrum_logits, finish, sentencepiece_vocab,
)
from mlx_lm_release import model_logits, parameters  # noqa: E402
from support import scaled_error  # noqa: E402
from test_nemotron_nas import CONFIG, LINEAR, SKIPPED, _attention, _ffn, _mlx_lm_model, _release_name  # noqa: E402

Q = gguf.GGMLQuantizationType
#: Attention over 3, 2 and 6 of the 6 heads' keys and values, skipped before an FFN, linear, and skipped with the FFN
#: (Ultra 253B's identity layer); MLPs 256 and 512 wide.
#: (n_heads_in_group and ffn_mult null where skipped or linear, as the releases have them: the converter reads both.)
SKIPPED_ATTENTION, LINEAR_ATTENTION = ({**entry, "n_heads_in_group": None} for entry in (SKIPPED, LINEAR))
BLOCKS = [
    {"attention": _attention(2), "ffn": _ffn(1.0)},
    {"attention": SKIPPED_ATTENTION, "ffn": _ffn(5.0)},
    {"attention": LINEAR_ATTENTION, "ffn": _ffn(1.0)},
    {"attention": SKIPPED_ATTENTION, "ffn": {**SKIPPED, "ffn_mult": None}},
    {"attention": _attention(3), "ffn": _ffn(5.0)},
    {"attention": _attention(1), "ffn": _ffn(1.0)},
]
#: The llama3 rope over the releases' pretraining context (the one llama.cpp's rope_freqs are read back for), whose
#: bands of these 16-dim heads at base 500000 are scaled, blended and kept: over 120 tokens, the scaled ones turn far
#: enough to count.
ROPE = {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
        "rope_type": "llama3"}


def _tiny() -> tuple[Any, dict, dict]:
    config = {**CONFIG, "block_configs": BLOCKS, "num_hidden_layers": len(BLOCKS), "rope_scaling": ROPE,
              "rope_theta": 500000.0, "vocab_size": len(sentencepiece_vocab()[0])}
    model = _mlx_lm_model(config)
    params = parameters(model)
    return model, params, config


def _permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """DeciModel.permute: each head's rotate-half rows as llama.cpp's adjacent pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _rope_freqs(config: dict) -> np.ndarray:
    """DeciModel.generate_extra_tensors: the llama3 rope's divisor per rotary pair."""
    rope, dim = config["rope_scaling"], config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        smooth = (old / wavelen - low) / (high - low)
        out.append(1.0 if wavelen < old / high else rope["factor"] if wavelen > old / low else
                   1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(out, np.float32)


def _counts(config: dict) -> tuple[list[int], list[int], list[int]]:
    """DeciModel's per-layer query heads, key/value heads and MLP widths (0 where a layer has none)."""
    heads, kv_heads, widths, top, hidden = [], [], [], config["num_attention_heads"], config["hidden_size"]
    for block in config["block_configs"]:
        attention, mult = block["attention"], block["ffn"]["ffn_mult"]
        group = attention["n_heads_in_group"]
        heads.append(top if group or attention["replace_with_linear"] else 0)
        kv_heads.append(top // group if group else 0)
        widths.append(0 if mult is None else -(-int(2 * mult * hidden / 3) // 256) * 256)
    return heads, kv_heads, widths


def _deci_gguf(path: Path, params: dict, config: dict, qtype, **meta: Any) -> None:
    """mlx-lm's ``params`` as llama.cpp's DeciModel converts the release (``meta`` overriding its metadata)."""
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    heads, kv_heads, widths = _counts(config)
    w = gguf.GGUFWriter(str(path), "deci")
    add_metadata(w, {**dict(
        block_count=layers, context_length=config["max_position_embeddings"], embedding_length=hidden,
        feed_forward_length=widths, head_count=heads, head_count_kv=kv_heads, rope_freq_base=config["rope_theta"],
        layer_norm_rms_eps=config["rms_norm_eps"], key_length=hidden // config["num_attention_heads"],
        value_length=hidden // config["num_attention_heads"], vocab_size=config["vocab_size"],
        rope_dimension_count=hidden // config["num_attention_heads"]), **meta})
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, layers)
    tensors = {"rope_freqs.weight": _rope_freqs(config)}
    for name, value in params.items():
        m = re.match(r"model\.layers\.(\d+)\.self_attn\.([qk])_proj\.weight$", name)
        if m:
            i = int(m.group(1))
            value = _permuted(value, heads[i] if m.group(2) == "q" else kv_heads[i])
        module, suffix = _release_name(name).rsplit(".", 1)
        tensors[f"{names.get_name(module)}.{suffix}"] = value
    for name, array in tensors.items():
        add_tensor(w, name, array, qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
def test_deci_gguf_matches_mlx_lm(tmp_path, qtype):
    """A float32 file gives mlx-lm's logits, each layer as its counts say; a Q8_0 one (kept packed) what its float
    import gives, and mlx-lm's within Q8_0's rounding."""
    from ferrum.config import ModelConfig

    model, params, config = _tiny()
    _deci_gguf(tmp_path / "m.gguf", params, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "nemotron-nas" and (ours.num_heads, ours.num_kv_heads) == (6, 6)
    assert [(s.mixer, s.mlp, s.heads.kv_heads) for s in ours.arch.layers] == [
        ("attention", "dense", 3), ("none", "dense", None), ("linear", "dense", None), ("none", "none", None),
        ("attention", "dense", 2), ("attention", "dense", None)]
    assert [s.intermediate_size or ours.intermediate_size for s in ours.arch.layers if s.mlp == "dense"] == [
        256, 512, 256, 512, 256]
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == ROPE
    if qtype == Q.F32:
        assert scaled_error(ferrum_logits(out, LONG_TOKENS), model_logits(model, LONG_TOKENS)) <= 1e-4
    else:  # over TINY_TOKENS
        got = assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
        assert scaled_error(got, model_logits(model, TINY_TOKENS)) <= 5e-2


@pytest.mark.parametrize("change", [dict(permuted_qk=False), dict(llama3_rope_freqs=False)],
                         ids=["qk-permuted", "rope-freqs-unread"])
def test_deci_gguf_read_otherwise_misses_mlx_lm(tmp_path, monkeypatch, change):
    """Controls: q/k rows left as llama.cpp permutes them, or the llama3 rope in rope_freqs left unread (which moves
    the logits 8x the parity test's tolerance: the scaled bands turn slowly)."""
    monkeypatch.setitem(architectures.ARCHITECTURES, "deci", replace(architectures.ARCHITECTURES["deci"], **change))
    model, params, config = _tiny()
    _deci_gguf(tmp_path / "m.gguf", params, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, LONG_TOKENS), model_logits(model, LONG_TOKENS)) > 5e-4


@pytest.mark.parametrize(("meta", "words"), [
    (dict(feed_forward_length=[256, 512, 256, 0, 512, 0]), "layer 5, with attention and no FFN"),
    (dict(attention_scale=0.5), "deci.attention.scale in a deci file"),
    (dict(feed_forward_length=[256, 512, 256, 0, 500, 256]), "layer 4's MLP width 500"),
], ids=["attention-without-ffn", "attention-scale", "width"])
def test_a_deci_gguf_run_otherwise_is_refused(tmp_path, meta, words):
    """llama.cpp drops a layer whose FFN is skipped, attention and all; scales attention by the file's own scale;
    a width DeciLM's rounding cannot give has no block_configs entry."""
    _, params, config = _tiny()
    _deci_gguf(tmp_path / "m.gguf", params, config, Q.F32, **meta)
    with pytest.raises(UnsupportedFeatureError, match=re.escape(words)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
