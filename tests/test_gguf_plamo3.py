"""GGUF import of PLaMo 3 (``plamo3``): mlx-lm's plamo3 given random weights (tests/test_plamo3.py; the family has no
transformers class), written as llama.cpp's Plamo3Model converts the release (the window and its period, both rope
bases, each norm plus its offset), imported, and run against mlx-lm (float32) or the same file imported in float32
(Q8_0). Controls: the norms' own offsets left on, or the sliding layers' rope base unread, miss mlx-lm; a per-layer
pattern and rope scaling are refused by name."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
plamo3 = pytest.importorskip("mlx_lm.models.plamo3")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf, plamo3 as plamo3_import  # noqa: E402
from gguf_writer import (
    assert_imports_as,  # noqa: E402
    TINY_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, ferrum_logits,
    finish, sentencepiece_vocab,
)
from mlx_lm_release import model_logits, random_mlx_lm_model  # noqa: E402
from support import scaled_error  # noqa: E402
from test_plamo3 import CONFIG, _draw  # noqa: E402

Q = gguf.GGMLQuantizationType
#: What Plamo3Model adds to each norm weight.
OFFSETS = {"pre_mixer_norm.weight": 1.0, "post_mixer_norm.weight": 1.0 / 5, "pre_mlp_norm.weight": 1.0,
           "post_mlp_norm.weight": 1.0 / 5 ** 1.5, "mixer.q_norm.weight": 1.0, "mixer.k_norm.weight": 1.0,
           "model.norm.weight": 1.0}


def _tiny() -> tuple[Any, dict, dict]:
    """mlx-lm's model of tests/test_plamo3.py's config: every other layer sliding over a window of 4 (5 keys)."""
    from mlx.utils import tree_flatten

    config = {**CONFIG, "vocab_size": len(sentencepiece_vocab()[0])}
    model = random_mlx_lm_model(config, 0, _draw)
    return model, {name: np.array(p) for name, p in tree_flatten(model.parameters())}, config


def _plamo3_gguf(path: Path, params: dict, config: dict, qtype, **meta: Any) -> None:
    """mlx-lm's ``params`` (the release's names) as llama.cpp's Plamo3Model converts the release."""
    layers = config["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), "plamo3")
    add_metadata(w, {**dict(
        block_count=layers, context_length=config["max_position_embeddings"], embedding_length=config["hidden_size"],
        feed_forward_length=config["intermediate_size"], head_count=config["num_attention_heads"],
        head_count_kv=config["num_key_value_heads"], key_length=config["head_dim"], value_length=config["head_dim"],
        rope_freq_base=config["rope_theta"], rope_freq_base_swa=config["rope_local_theta"],
        layer_norm_rms_eps=config["rms_norm_eps"], vocab_size=config["vocab_size"],
        sliding_window=config["window_size"], sliding_window_pattern=config["sliding_window_pattern"]), **meta})
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PLAMO3, layers)
    for name, value in params.items():
        offset = next((o for suffix, o in OFFSETS.items() if name.endswith(suffix)), 0.0)
        add_tensor(w, names.get_name(name, try_suffixes=(".weight", ".bias")), value + np.float32(offset), qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
def test_plamo3_gguf_matches_mlx_lm(tmp_path, qtype):
    """A float32 file gives mlx-lm's logits, its sliding layers where mlx-lm has them; a Q8_0 one (kept packed) what
    its float import gives, and mlx-lm's within Q8_0's rounding."""
    from ferrum.config import ModelConfig

    model, params, config = _tiny()
    _plamo3_gguf(tmp_path / "m.gguf", params, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    layers = ModelConfig.from_file(out).arch.layers
    assert [(s.window, s.rope.theta) for s in layers] == [(5, 100.0), (None, 1e6), (5, 100.0), (None, 1e6)]
    want = model_logits(model, TINY_TOKENS)
    assert_imports_as(tmp_path, out, qtype != Q.F32, want)


@pytest.mark.parametrize("change", [dict(norm_offsets=()), dict(configure=lambda meta, p, cfg: {
    **plamo3_import.plamo3_config(meta, p, cfg), "rope_local_theta": cfg["rope_theta"]})],
    ids=["offsets-left-on", "local-base-unread"])
def test_plamo3_gguf_read_otherwise_misses_mlx_lm(tmp_path, monkeypatch, change):
    monkeypatch.setitem(architectures.ARCHITECTURES, "plamo3",
                        replace(architectures.ARCHITECTURES["plamo3"], **change))
    model, params, config = _tiny()
    _plamo3_gguf(tmp_path / "m.gguf", params, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, TINY_TOKENS), model_logits(model, TINY_TOKENS)) > 1e-2


@pytest.mark.parametrize(("meta", "words"), [
    (dict(sliding_window_pattern=[True, False, True, False]), "plamo3.attention.sliding_window_pattern [True, False"),
    (dict(rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=2.0), "linear rope scaling in a plamo3"),
], ids=["pattern-list", "rope-scaling"])
def test_a_plamo3_gguf_run_otherwise_is_refused(tmp_path, meta, words):
    _, params, config = _tiny()
    _plamo3_gguf(tmp_path / "m.gguf", params, config, Q.F32, **meta)
    with pytest.raises(UnsupportedFeatureError, match=re.escape(words)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
