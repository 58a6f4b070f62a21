"""GGUF import of PLaMo 2 (``plamo2``): mlx-lm's plamo2 given random weights (tests/test_plamo2.py; the family has no
transformers class), written as llama.cpp's Plamo2Model converts the release (the Mamba layers as 0 heads in
per-layer arrays, ``A_log`` as ``-exp(A_log)``, ``dt_bias`` as ``ssm_dt.bias``, the taps squeezed, each sandwich norm
plus its offset, its renames), imported, and run against mlx-lm (float32) or the same file imported in float32
(Q8_0). Controls: the norms' own offsets left on, or another mamba_step, miss mlx-lm; what llama.cpp runs otherwise is
refused by name."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
plamo2 = pytest.importorskip("mlx_lm.models.plamo2")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import (
    assert_imports_as,  # noqa: E402
    TINY_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, ferrum_logits,
    finish, sentencepiece_vocab,
)
from mlx_lm_release import model_logits, random_mlx_lm_model  # noqa: E402
from support import scaled_error  # noqa: E402
from test_plamo2 import CONFIG, _draw  # noqa: E402

Q = gguf.GGMLQuantizationType
#: What Plamo2Model adds to each norm weight (the inner ones and the q/k weights: nothing).
OFFSETS = {"pre_mixer_norm.weight": 1.0, "post_mixer_norm.weight": 1.0 / 5, "pre_mlp_norm.weight": 1.0,
           "post_mlp_norm.weight": 1.0 / 5 ** 1.5, "model.norm.weight": 1.0}
#: Plamo2Model's renames before gguf's map.
RENAMES = {".dt_bias": ".dt_proj.bias", ".dt_norm_weight": ".dt_norm.weight", ".B_norm_weight": ".B_norm.weight",
           ".C_norm_weight": ".C_norm.weight", ".k_weight": ".k.weight", ".q_weight": ".q.weight"}


def _tiny(**change: Any) -> tuple[Any, dict, dict]:
    """mlx-lm's model of tests/test_plamo2.py's config (three Mamba layers, two attention ones), at the epsilon
    llama.cpp and mlx-lm's q/k norms share."""
    config = {**CONFIG, "vocab_size": len(sentencepiece_vocab()[0]), "rms_norm_eps": 1e-6, **change}
    model = random_mlx_lm_model(config, 0, _draw)
    from mlx.utils import tree_flatten

    return model, {name: np.array(p) for name, p in tree_flatten(model.parameters())}, config


def _converted(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Plamo2Model.modify_tensors: the release's tensor (mlx-lm's taps [C, K, 1]) as it hands it to gguf's map."""
    if name.endswith(".A_log"):
        return name, -np.exp(value)
    if name.endswith(".conv1d.weight"):
        return name, value.reshape(value.shape[0], -1)
    for old, new in RENAMES.items():
        if name.endswith(old):
            return name[:-len(old)] + new, value
    offset = next((o for suffix, o in OFFSETS.items() if name.endswith(suffix)), 0.0)
    return name, value + np.float32(offset)


def _plamo2_gguf(path: Path, params: dict, config: dict, qtype, **meta: Any) -> None:
    """mlx-lm's ``params`` as llama.cpp's Plamo2Model converts the release (``meta`` overriding its metadata)."""
    layers, per_head = config["num_hidden_layers"], config["hidden_size_per_head"]
    mamba = [plamo2.is_mamba(plamo2.ModelArgs.from_dict(config), i) for i in range(layers)]
    w = gguf.GGUFWriter(str(path), "plamo2")
    add_metadata(w, {**dict(
        vocab_size=config["vocab_size"], head_count_kv=[0 if m else config["num_key_value_heads"] for m in mamba],
        head_count=[0 if m else config["num_attention_heads"] for m in mamba],
        context_length=config["max_position_embeddings"], embedding_length=config["hidden_size"],
        key_length=per_head, value_length=per_head, block_count=layers, layer_norm_rms_eps=config["rms_norm_eps"],
        rope_freq_base=10000.0, ssm_state_size=config["mamba_d_state"], ssm_conv_kernel=config["mamba_d_conv"],
        ssm_time_step_rank=config["mamba_num_heads"], ssm_inner_size=config["mamba_num_heads"] * per_head,
        ssm_group_count=0, feed_forward_length=config["intermediate_size"]), **meta})
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PLAMO2, layers)
    for name, value in params.items():
        name, value = _converted(name, value)
        add_tensor(w, names.get_name(name, try_suffixes=(".weight", ".bias")), value, qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
def test_plamo2_gguf_matches_mlx_lm(tmp_path, qtype):
    """A float32 file gives mlx-lm's logits, Mamba layers where the heads are 0; a Q8_0 one (kept packed) what its
    float import gives, and mlx-lm's within Q8_0's rounding."""
    from ferrum.config import ModelConfig

    model, params, config = _tiny()
    _plamo2_gguf(tmp_path / "m.gguf", params, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert [s.mixer for s in ours.arch.layers] == ["mamba2", "attention", "mamba2", "attention", "mamba2"]
    want = model_logits(model, TINY_TOKENS)
    # Q8_0's rounding through decays of 1-8 per step: 0.12 for these weights
    assert_imports_as(tmp_path, out, qtype != Q.F32, want, packed=0.15)


def test_plamo2_gguf_of_another_mamba_step_matches_mlx_lm(tmp_path):
    """Attention on every third layer (mamba_step 3), found again from the heads."""
    model, params, config = _tiny(mamba_step=3, num_hidden_layers=6)
    _plamo2_gguf(tmp_path / "m.gguf", params, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, TINY_TOKENS), model_logits(model, TINY_TOKENS)) <= 1e-4


def test_plamo2_gguf_read_with_the_norms_own_offsets_left_on_misses_mlx_lm(tmp_path, monkeypatch):
    monkeypatch.setitem(architectures.ARCHITECTURES, "plamo2",
                        replace(architectures.ARCHITECTURES["plamo2"], norm_offsets=()))
    model, params, config = _tiny()
    _plamo2_gguf(tmp_path / "m.gguf", params, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, TINY_TOKENS), model_logits(model, TINY_TOKENS)) > 1e-2


@pytest.mark.parametrize(("meta", "words"), [
    (dict(rope_freq_base=500000.0), "plamo2.rope.freq_base 500000.0 in a plamo2 file"),
    (dict(layer_norm_rms_eps=1e-5), "plamo2.attention.layer_norm_rms_epsilon"),
    (dict(head_count_kv=[0, 2, 2, 0, 0], head_count=[0, 4, 4, 0, 0]), "Mamba layers (0 heads) come as a mamba_step"),
], ids=["rope-base", "epsilon", "pattern"])
def test_a_plamo2_gguf_run_otherwise_is_refused(tmp_path, meta, words):
    """llama.cpp rotates at the file's base and norms q/k with the file's epsilon, where mlx-lm's PLaMo 2 fixes
    both; Mamba layers out of any mamba_step pattern have no config."""
    _, params, config = _tiny()
    _plamo2_gguf(tmp_path / "m.gguf", params, config, Q.F32, **meta)
    with pytest.raises(UnsupportedFeatureError, match=re.escape(words)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
