"""GGUF import of XVERSE (``xverse``): mlx-lm's model for the release's model_type (its llama) given random weights
and written as llama.cpp's XverseModel converts the release (TextModel's keys, the rope over each whole head, q/k rows
permuted for llama.cpp's adjacent-pair rope), imported, and run against mlx-lm (float32) or the same file imported in
float32 (Q8_0). Control: the q/k rows left permuted miss mlx-lm's logits; fewer key/value heads, which the converter
permutes across heads, are refused by name."""

from __future__ import annotations

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
from gguf_writer import (
    assert_imports_as,  # noqa: E402
    TINY_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, ferrum_logits,
    finish, permute, sentencepiece_vocab,
)
from mlx_lm_release import model_logits, random_mlx_lm_model  # noqa: E402
from support import scaled_error  # noqa: E402

Q = gguf.GGMLQuantizationType


def _tiny(kv_heads: int = 4) -> tuple[Any, dict]:
    """mlx-lm's xverse (its llama) over the GGUF tests' vocabulary, at a rope base of its own."""
    config = {"model_type": "xverse", "architectures": ["XverseForCausalLM"], "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
              "max_position_embeddings": 256, "vocab_size": len(sentencepiece_vocab()[0]),
              "tie_word_embeddings": False}
    return random_mlx_lm_model(config), config


def _xverse_gguf(path: Path, model: Any, config: dict, qtype) -> None:
    """mlx-lm's ``model`` as llama.cpp's XverseModel converts the release: q/k rows permuted (keys over
    head_count / head_count_kv groups where the two differ, as its _reverse_hf_permute does)."""
    from mlx.utils import tree_flatten

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "xverse")
    add_metadata(w, dict(
        block_count=config["num_hidden_layers"], context_length=config["max_position_embeddings"],
        embedding_length=config["hidden_size"], feed_forward_length=config["intermediate_size"], head_count=heads,
        head_count_kv=kv_heads, rope_freq_base=config["rope_theta"], layer_norm_rms_eps=config["rms_norm_eps"],
        tensor_data_layout="Meta AI original pth", rope_dimension_count=config["hidden_size"] // heads))
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.XVERSE, config["num_hidden_layers"])
    for name, value in tree_flatten(model.parameters()):
        array = np.array(value)
        if name.endswith("q_proj.weight"):
            array = permute(array, heads)
        elif name.endswith("k_proj.weight"):
            array = permute(array, heads // kv_heads if kv_heads != heads else heads)
        module, suffix = name.rsplit(".", 1)
        add_tensor(w, f"{names.get_name(module)}.{suffix}", array, qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
def test_xverse_gguf_matches_mlx_lm(tmp_path, qtype):
    """A float32 file gives mlx-lm's logits; a Q8_0 one (kept packed) what its float import gives, and mlx-lm's
    within Q8_0's rounding."""
    from ferrum.config import ModelConfig

    model, config = _tiny()
    _xverse_gguf(tmp_path / "m.gguf", model, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "xverse" and (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (4, 4, 16)
    want = model_logits(model, TINY_TOKENS)
    assert_imports_as(tmp_path, out, qtype != Q.F32, want)


def test_xverse_gguf_read_with_its_q_k_left_permuted_misses_mlx_lm(tmp_path, monkeypatch):
    monkeypatch.setitem(architectures.ARCHITECTURES, "xverse",
                        replace(architectures.ARCHITECTURES["xverse"], permuted_qk=False))
    model, config = _tiny()
    _xverse_gguf(tmp_path / "m.gguf", model, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, TINY_TOKENS), model_logits(model, TINY_TOKENS)) > 1e-2


def test_an_xverse_gguf_with_fewer_key_value_heads_is_refused(tmp_path):
    model, config = _tiny(kv_heads=2)
    _xverse_gguf(tmp_path / "m.gguf", model, config, Q.F32)
    with pytest.raises(UnsupportedFeatureError, match=re.escape("an xverse file with 2 key/value heads for 4")):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
