"""GGUF import of OpenELM (``openelm``): mlx-lm's openelm given random weights (tests/test_openelm.py; the family has
no transformers class), each layer with its own heads and MLP width, written as llama.cpp's OpenELMModel converts the
release (per-layer head counts and widths as arrays, each proj_1 split into gate and up, q/k/v fused with per-head
q/k norms, no LM head), imported, and run against mlx-lm (float32) or the same file imported in float32 (Q8_0).
Controls: the gate and up joined the other way round miss mlx-lm; an LM head (which llama.cpp ignores) and rope
scaling are refused by name."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("mlx_lm")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import (
    assert_imports_as,  # noqa: E402
    TINY_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, ferrum_logits,
    finish, sentencepiece_vocab,
)
from mlx_lm_release import model_logits, parameters  # noqa: E402
from support import scaled_error  # noqa: E402
from test_openelm import CONFIG, _mlx_lm_model  # noqa: E402

Q = gguf.GGMLQuantizationType


def _tiny() -> tuple[Any, dict, dict]:
    config = {**CONFIG, "vocab_size": len(sentencepiece_vocab()[0])}
    model = _mlx_lm_model(config)
    params = parameters(model)
    return model, params, config


def _openelm_gguf(path: Path, params: dict, config: dict, qtype, more: Callable[[Any], None] = lambda w: None,
                  extra: dict[str, np.ndarray] | None = None) -> None:
    """mlx-lm's ``params`` (the release's names) as llama.cpp's OpenELMModel converts the release."""
    layers, hidden = config["num_transformer_layers"], config["model_dim"]
    widths = [params[f"transformer.layers.{i}.ffn.proj_2.weight"].shape[1] for i in range(layers)]  # mlx-lm's
    w = gguf.GGUFWriter(str(path), "openelm")
    add_metadata(w, dict(
        block_count=layers, context_length=config["max_context_length"], embedding_length=hidden,
        feed_forward_length=widths, head_count=config["num_query_heads"], head_count_kv=config["num_kv_heads"],
        rope_freq_base=config["rope_freq_constant"], layer_norm_rms_eps=1e-6,
        rope_dimension_count=config["head_dim"], key_length=config["head_dim"], value_length=config["head_dim"]))
    more(w)
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.OPENELM, layers)
    tensors = dict(extra or {})
    for name, value in params.items():
        m = re.match(r"transformer\.layers\.(\d+)\.ffn\.proj_1\.weight$", name)
        if m:
            i = int(m.group(1))
            tensors[f"blk.{i}.ffn_gate.weight"], tensors[f"blk.{i}.ffn_up.weight"] = np.split(value, [widths[i]])
            continue
        module, suffix = name.rsplit(".", 1)
        tensors[f"{names.get_name(module)}.{suffix}"] = value
    for name, array in tensors.items():
        add_tensor(w, name, array, qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
def test_openelm_gguf_matches_mlx_lm(tmp_path, qtype):
    """A float32 file gives mlx-lm's logits, each layer its own heads and width; a Q8_0 one (kept packed) what its
    float import gives, and mlx-lm's within Q8_0's rounding."""
    from ferrum.config import ModelConfig

    model, params, config = _tiny()
    _openelm_gguf(tmp_path / "m.gguf", params, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "openelm" and (ours.num_heads, ours.num_kv_heads) == (12, 3)
    assert [layer.intermediate_size or ours.intermediate_size for layer in ours.arch.layers] == [32, 64, 128, 256]
    want = model_logits(model, TINY_TOKENS)
    assert_imports_as(tmp_path, out, qtype != Q.F32, want)


def test_openelm_gguf_with_gate_and_up_joined_the_other_way_misses_mlx_lm(tmp_path, monkeypatch):
    swapped = ((("ffn_up.weight", "ffn_gate.weight"), "mlp.gate_up_proj.weight"),)
    monkeypatch.setitem(architectures.ARCHITECTURES, "openelm",
                        replace(architectures.ARCHITECTURES["openelm"], joined=swapped))
    model, params, config = _tiny()
    _openelm_gguf(tmp_path / "m.gguf", params, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, TINY_TOKENS), model_logits(model, TINY_TOKENS)) > 1e-2


@pytest.mark.parametrize(("options", "words"), [
    (dict(extra={"output.weight": np.zeros((285, 64), np.float32)}), "an openelm file with output.weight"),
    (dict(more=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(2.0))),
     "linear rope scaling in an openelm file"),
], ids=["lm-head", "rope-scaling"])
def test_an_openelm_gguf_run_otherwise_is_refused(tmp_path, options, words):
    _, params, config = _tiny()
    _openelm_gguf(tmp_path / "m.gguf", params, config, Q.F32, **options)
    with pytest.raises(UnsupportedFeatureError, match=re.escape(words)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
