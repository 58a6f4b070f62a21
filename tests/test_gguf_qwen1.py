"""GGUF import of Qwen (1) (``qwen``): mlx-lm's qwen given random weights (the family has no transformers class;
tests/mlx_lm_release.py) and written as llama.cpp's QwenModel converts the release (TextModel's keys: the release's
max_position_embeddings, intermediate_size, rotary_emb_base and layer_norm_epsilon, or as older converters wrote them,
the epsilon under the RMS key beside the rope's dimension count; c_attn as attn_qkv, rows as stored), imported, and
run against mlx-lm (float32) or the same file imported in float32 (Q8_0). Control: the rope base left unread misses
mlx-lm's logits; rope scaling is refused by name."""

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
from gguf_writer import (  # noqa: E402
    TINY_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, assert_runs_as_its_float_import, ferrum_logits,
    finish, sentencepiece_vocab,
)
from mlx_lm_release import model_logits, random_mlx_lm_model  # noqa: E402
from support import scaled_error  # noqa: E402
from test_qwen1 import CONFIG  # noqa: E402

Q = gguf.GGMLQuantizationType
BASE = 1000000.0  # Qwen-72B's rope base


def _tiny() -> tuple[Any, dict]:
    """mlx-lm's qwen over the GGUF tests' vocabulary, its rope at :data:`BASE` (mlx-lm's qwen leaves rotary_emb_base
    unread, so its rope is set as Ferrum's test_qwen1 sets it)."""
    import mlx.nn as nn

    config = {**CONFIG, "vocab_size": len(sentencepiece_vocab()[0]), "rotary_emb_base": BASE}
    model = random_mlx_lm_model(config)
    for layer in model.transformer.h:
        layer.attn.rotary_emb = nn.RoPE(config["kv_channels"], traditional=False, base=BASE)
    return model, config


def _qwen_gguf(path: Path, model: Any, config: dict, qtype, older: bool = False,
               more: Callable[[Any], None] = lambda w: None) -> None:
    """mlx-lm's ``model`` as llama.cpp's QwenModel converts the release (``older``: as converters before TextModel's
    keys did, the epsilon under the RMS key and the rope's dimension count written)."""
    from mlx.utils import tree_flatten

    heads = config["num_attention_heads"]
    w = gguf.GGUFWriter(str(path), "qwen")
    add_metadata(w, dict(
        block_count=config["num_hidden_layers"], context_length=config["max_position_embeddings"],
        embedding_length=config["hidden_size"], feed_forward_length=config["intermediate_size"], head_count=heads,
        rope_freq_base=config["rotary_emb_base"],
        layer_norm_rms_eps=config["layer_norm_epsilon"] if older else None,
        layer_norm_eps=None if older else config["layer_norm_epsilon"],
        rope_dimension_count=config["hidden_size"] // heads if older else None))
    more(w)
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN, config["num_hidden_layers"])
    for name, value in tree_flatten(model.parameters()):
        module, suffix = name.rsplit(".", 1)
        add_tensor(w, f"{names.get_name(module)}.{suffix}", np.array(value), qtype)
    finish(w)


@pytest.mark.parametrize(("older", "qtype"), [(False, Q.F32), (True, Q.F32), (False, Q.Q8_0)],
                         ids=["F32", "F32-older-converter", "Q8_0"])
def test_qwen_gguf_matches_mlx_lm(tmp_path, older, qtype):
    """Float32 files give mlx-lm's logits, the whole context usable (llama.cpp runs no dynamic NTK nor logn attention
    past seq_length); a Q8_0 one (kept packed) what its float import gives, and mlx-lm's within Q8_0's rounding."""
    from ferrum.config import ModelConfig

    model, config = _tiny()
    _qwen_gguf(tmp_path / "m.gguf", model, config, qtype, older)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "qwen" and ours.arch.fused_qkv and ours.max_seq_len == config["max_position_embeddings"]
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.intermediate_size) == (4, 4, 16, 80)
    if qtype == Q.F32:
        assert scaled_error(ferrum_logits(out, TINY_TOKENS), model_logits(model, TINY_TOKENS)) <= 1e-4
    else:
        got = assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
        assert scaled_error(got, model_logits(model, TINY_TOKENS)) <= 5e-2


def test_qwen_gguf_read_without_its_rope_base_misses_mlx_lm(tmp_path, monkeypatch):
    """Control: the import leaving rotary_emb_base out (the family's default base, 10000) misses mlx-lm's logits."""
    configure = architectures.ARCHITECTURES["qwen"].configure

    def without_base(meta, p, cfg):
        config = configure(meta, p, cfg)
        del config["rotary_emb_base"]
        return config

    monkeypatch.setitem(architectures.ARCHITECTURES, "qwen",
                        replace(architectures.ARCHITECTURES["qwen"], configure=without_base))
    model, config = _tiny()
    _qwen_gguf(tmp_path / "m.gguf", model, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, TINY_TOKENS), model_logits(model, TINY_TOKENS)) > 1e-2


def test_a_qwen_gguf_with_rope_scaling_is_refused(tmp_path):
    model, config = _tiny()
    _qwen_gguf(tmp_path / "m.gguf", model, config, Q.F32, more=lambda w: (
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(2.0)))
    with pytest.raises(UnsupportedFeatureError, match=re.escape("linear rope scaling in a qwen file")):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
