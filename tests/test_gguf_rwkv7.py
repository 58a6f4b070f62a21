"""GGUF import of RWKV-7 (``rwkv7``): mlx-lm's rwkv7 given random weights (tests/test_rwkv7.py; the family has no
transformers class) and written as llama.cpp's Rwkv7Model converts the release (its renames, the six token-shift
mixes stacked, k_k / k_a / r_k / g_norm flat, the first layer given copies of its ``a`` LoRA as the value-residual
one, the LoRA ranks and head size in the metadata, head_count 0; time_mix_w1 / w2 and the mixes kept float32),
imported, and run against mlx-lm (float32) or the same file imported in float32 (Q8_0). Controls: the mixes split in
another order, or the first layer's dummies read, miss mlx-lm or are refused; another token shift is refused by
name."""

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
from test_rwkv7 import CONFIG, _mlx_lm_model  # noqa: E402

Q = gguf.GGMLQuantizationType
#: What llama.cpp's converter keeps float32 whatever the file's type.
KEPT_FLOAT = ("time_mix_w1", "time_mix_w2", "time_mix_lerp_fused")
MIXES = "rwkvag"


def _tiny() -> tuple[Any, dict, dict]:
    config = {**CONFIG, "vocab_size": len(sentencepiece_vocab()[0])}
    model = _mlx_lm_model(config)
    params = parameters(model)
    return model, params, config


def _converter_name(name: str) -> str:
    """The release's tensor name as Rwkv7Model's filter_tensors and modify_tensors rename it before gguf's map."""
    name = name.replace("ffn", "feed_forward").replace("attn", "attention").replace("feed_forward_norm", "ln2")
    name = name.replace("g_norm", "ln_x")
    for lora, short in (("_lora.lora.0.weight", "1.weight"), ("_lora.lora.2.weight", "2.weight"),
                        ("_lora.lora.2.bias", "0.weight")):
        name = name.replace(lora, short)
    return name


def _rwkv7_gguf(path: Path, params: dict, config: dict, qtype, more: Callable[[Any], None] = lambda w: None,
                vocab: Callable[[Any], None] = add_sentencepiece_vocab) -> None:
    """mlx-lm's ``params`` (the release's names, k_k / k_a / g_norm per head) as llama.cpp's Rwkv7Model converts
    the release, its tokenizer written by ``vocab``."""
    layers = config["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), "rwkv7")
    add_metadata(w, dict(
        context_length=1048576, embedding_length=config["hidden_size"], block_count=layers,
        layer_norm_eps=config["norm_eps"], wkv_head_size=config["head_dim"],
        decay_lora_rank=config["decay_low_rank_dim"], iclr_lora_rank=config["a_low_rank_dim"],
        value_residual_mix_lora_rank=config["v_low_rank_dim"], gate_lora_rank=config["gate_low_rank_dim"],
        feed_forward_length=config["intermediate_size"], head_count=0))
    more(w)
    vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.RWKV7, layers)
    tensors = {}
    for name, value in params.items():
        m = re.match(r"model\.layers\.(\d+)\.attn\.x_([a-z])$", name)
        if m:
            continue  # stacked below
        converted = _converter_name(name)
        module, suffix = converted.rsplit(".", 1)
        target = names.get_name(module)
        target = f"{target}.{suffix}" if suffix in ("weight", "bias") else f"{names.get_name(converted)}.weight"
        tensors[target] = np.squeeze(value) if value.ndim > 1 and min(value.shape) == 1 else (
            value.reshape(-1) if target.endswith(("k_k.weight", "k_a.weight", "r_k.weight", "time_mix_ln.weight",
                                                  "time_mix_ln.bias")) else value)
    for i in range(layers):
        tensors[f"blk.{i}.time_mix_lerp_fused.weight"] = np.stack(
            [params[f"model.layers.{i}.attn.x_{x}"] for x in MIXES]).reshape(len(MIXES), 1, 1, -1)
    for n in "012":  # the first layer's dummy value-residual LoRA
        tensors[f"blk.0.time_mix_v{n}.weight"] = tensors[f"blk.0.time_mix_a{n}.weight"]
    for name, array in tensors.items():
        add_tensor(w, name, array, qtype, kept_float=KEPT_FLOAT)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
def test_rwkv7_gguf_matches_mlx_lm(tmp_path, qtype):
    """A float32 file gives mlx-lm's logits; a Q8_0 one (kept packed) what its float import gives, and mlx-lm's
    within Q8_0's rounding."""
    from ferrum.config import ModelConfig

    model, params, config = _tiny()
    _rwkv7_gguf(tmp_path / "m.gguf", params, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "rwkv7" and ours.arch.stored_layers == 3
    assert (ours.arch.rwkv7.heads, ours.arch.rwkv7.head_dim) == (2, 32)
    want = model_logits(model, TINY_TOKENS)
    assert_imports_as(tmp_path, out, qtype != Q.F32, want)


def test_rwkv7_gguf_with_its_mixes_split_in_another_order_misses_mlx_lm(tmp_path, monkeypatch):
    """Control: the stacked mixes read as r, k, w, v, a, g (w and k swapped) miss mlx-lm's logits."""
    swapped = (("time_mix_lerp_fused.weight", tuple(f"attn.x_{x}" for x in "rkwvag")),)
    monkeypatch.setitem(architectures.ARCHITECTURES, "rwkv7",
                        replace(architectures.ARCHITECTURES["rwkv7"], split=swapped))
    model, params, config = _tiny()
    _rwkv7_gguf(tmp_path / "m.gguf", params, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, TINY_TOKENS), model_logits(model, TINY_TOKENS)) > 1e-2


def test_rwkv7_gguf_first_layer_dummies_are_what_is_left_unread(tmp_path, monkeypatch):
    """Control: without the first layer's dummies left unread, the file has tensors the release has no place for."""
    monkeypatch.setitem(architectures.ARCHITECTURES, "rwkv7",
                        replace(architectures.ARCHITECTURES["rwkv7"], unread=None))
    _, params, config = _tiny()
    _rwkv7_gguf(tmp_path / "m.gguf", params, config, Q.F32)
    with pytest.raises(UnsupportedFeatureError, match=re.escape("blk.0.time_mix_v0.weight")):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


def test_an_rwkv7_gguf_shifting_otherwise_is_refused(tmp_path):
    _, params, config = _tiny()
    _rwkv7_gguf(tmp_path / "m.gguf", params, config, Q.F32, more=lambda w: w.add_token_shift_count(3))
    with pytest.raises(UnsupportedFeatureError, match=re.escape("token_shift_count 3 is not supported")):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
