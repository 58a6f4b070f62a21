"""GGUF import of PLaMo-13B (``plamo``): mlx-lm's plamo given random weights (tests/test_plamo.py; the family has no
transformers class), written as llama.cpp's PlamoModel converts the release (the query heads, and o_proj's inputs
with them, reordered from PLaMo's tiling into ggml's grouping; the converter's shuffle, which asserts PLaMo-13B's
5120 x 5120, taken at the tiny model's heads), imported, and run against mlx-lm (float32) or the same file imported in
float32 (Q8_0). Control: the heads left in ggml's order miss mlx-lm; rope scaling is refused by name."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
plamo = pytest.importorskip("mlx_lm.models.plamo")

from ferrum.errors import CheckpointError, UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import (
    assert_imports_as,  # noqa: E402
    TINY_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, ferrum_logits,
    finish, sentencepiece_vocab,
)
from mlx_lm_release import model_logits, random_mlx_lm_model  # noqa: E402
from support import scaled_error  # noqa: E402
from test_plamo import CONFIG, _draw  # noqa: E402

Q = gguf.GGMLQuantizationType


def _tiny() -> tuple[Any, dict, dict]:
    """mlx-lm's model of tests/test_plamo.py's config: four query heads tiled over two key/value heads of 32 dims."""
    from mlx.utils import tree_flatten

    config = {**CONFIG, "vocab_size": len(sentencepiece_vocab()[0])}
    model = random_mlx_lm_model(config, 0, _draw)
    return model, {name: np.array(p) for name, p in tree_flatten(model.parameters())}, config


def _shuffled(name: str, value: np.ndarray, config: dict) -> np.ndarray:
    """PlamoModel.shuffle_attn_q_weight / shuffle_attn_output_weight at ``config``'s heads (its 8, 5, 128 are
    PLaMo-13B's n_shared_head, key/value heads and head width)."""
    shared, hidden = config["n_shared_head"], config["hidden_size"]
    kv, width = config["num_attention_heads"] // shared, hidden // config["num_attention_heads"]
    if name.endswith("q_proj.weight"):
        return value.reshape(shared, kv, width, hidden).transpose(1, 0, 2, 3).reshape(value.shape)
    if name.endswith("o_proj.weight"):
        return value.reshape(hidden, shared, kv, width).transpose(0, 2, 1, 3).reshape(value.shape)
    return value


def _plamo_gguf(path: Path, params: dict, config: dict, qtype, **meta: Any) -> None:
    """mlx-lm's ``params`` (the release's names) as llama.cpp's PlamoModel converts the release."""
    layers = config["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), "plamo")
    add_metadata(w, {**dict(
        context_length=4096, embedding_length=config["hidden_size"], feed_forward_length=config["intermediate_size"],
        block_count=layers, head_count=config["num_attention_heads"],
        head_count_kv=config["num_attention_heads"] // config["n_shared_head"],
        layer_norm_rms_eps=config["rms_norm_eps"]), **meta})
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PLAMO, layers)
    for name, value in params.items():
        add_tensor(w, names.get_name(name, try_suffixes=(".weight", ".bias")), _shuffled(name, value, config), qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
def test_plamo_gguf_matches_mlx_lm(tmp_path, qtype):
    """A float32 file gives mlx-lm's logits; a Q8_0 one (kept packed, whole heads moved) what its float import
    gives, and mlx-lm's within Q8_0's rounding."""
    from ferrum.config import ModelConfig

    model, params, config = _tiny()
    _plamo_gguf(tmp_path / "m.gguf", params, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "plamo" and (ours.num_heads, ours.num_kv_heads) == (4, 2)
    want = model_logits(model, TINY_TOKENS)
    assert_imports_as(tmp_path, out, qtype != Q.F32, want)


def test_plamo_gguf_with_its_heads_left_in_ggml_s_order_misses_mlx_lm(tmp_path, monkeypatch):
    monkeypatch.setitem(architectures.ARCHITECTURES, "plamo",
                        replace(architectures.ARCHITECTURES["plamo"], own_tensors=None))
    model, params, config = _tiny()
    _plamo_gguf(tmp_path / "m.gguf", params, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, TINY_TOKENS), model_logits(model, TINY_TOKENS)) > 1e-2


def test_a_plamo_gguf_with_rope_scaling_is_refused(tmp_path):
    _, params, config = _tiny()
    _plamo_gguf(tmp_path / "m.gguf", params, config, Q.F32, rope_scaling_type=gguf.RopeScalingType.LINEAR,
                rope_scaling_factor=2.0)
    with pytest.raises(UnsupportedFeatureError, match=re.escape("linear rope scaling in a plamo file")):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_plamo_gguf_of_no_key_value_heads_is_refused(tmp_path):
    _, params, config = _tiny()
    _plamo_gguf(tmp_path / "m.gguf", params, config, Q.F32, head_count_kv=0)
    with pytest.raises(CheckpointError, match=re.escape("plamo.attention.head_count_kv is 0")):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
