"""GGUF import of Qwen2-VL's and Qwen2.5-VL's text model (``qwen2vl``): tiny random transformers Qwen2-VL / Qwen2.5-VL
models whose text model is written as llama.cpp's converter writes it (Qwen 2's keys and tensors, rows as stored,
the mrope sections as rope.dimension_sections padded to four; the vision tower left to the mmproj file), imported,
and run against transformers' own model on text (float32 files) or the same file imported in float32 (Q8_0); a
control shows the row order counts, and sections llama.cpp rotates otherwise than plain rope are refused by name."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import CheckpointError, UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_tensors, assert_logits_match, config_writer, finish, imported, sentencepiece_vocab,
)

Q = gguf.GGMLQuantizationType
#: Each text token's rope over 8 pairs of a 16-wide head, as (time, height, width) sections.
_SECTIONS = (2, 3, 3)


def _tiny_qwen2_vl(kind: str) -> tuple[Any, Any]:
    """A random float32 Qwen2-VL (``qwen2_vl``) or Qwen2.5-VL (``qwen2_5_vl``) with a one-block vision tower, and its
    text config; norms away from 1 and q/k large enough that the rope's angles (and a wrong row order) move the
    logits."""
    text = dict(vocab_size=len(sentencepiece_vocab()[0]), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(_SECTIONS)},
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "qwen2_vl":
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
            temporal_patch_size=2), tie_word_embeddings=False)
    else:
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[0]),
            tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForImageTextToText.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                param.normal_(0, 0.3)
    return hf, config.text_config


def _qwen2_vl_gguf(tmp_path, hf, config, qtype, sections: tuple[int, ...] | None = (*_SECTIONS, 0)) -> None:
    """``hf``'s text model as llama.cpp's Qwen2VLModel writes it: ``sections`` as rope.dimension_sections (the
    config's padded to four; None: left out), matrices as ``qtype``."""
    w = config_writer(tmp_path / "m.gguf", "qwen2vl", config)
    if sections is not None:
        w.add_rope_dimension_sections(list(sections))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2VL, config.num_hidden_layers)
    tensors: dict[str, np.ndarray] = {}
    for name, tensor in hf.state_dict().items():
        if name.startswith("model.visual."):
            continue
        name = name.replace("model.language_model.", "model.")
        tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))] = tensor.float().numpy()
    add_tensors(w, tensors, qtype)
    finish(w)


@pytest.mark.parametrize(("kind", "qtype"), [("qwen2_vl", Q.F32), ("qwen2_5_vl", Q.F32), ("qwen2_vl", Q.Q8_0)],
                         ids=["qwen2_vl-F32", "qwen2_5_vl-F32", "qwen2_vl-Q8_0"])
def test_qwen2_vl_gguf_matches_the_model_it_was_written_from(tmp_path, kind, qtype):
    """Float32 files give the logits transformers' Qwen2-VL / Qwen2.5-VL gives for text alone (its three positions
    one); Q8_0 ones what the same file imported in float32 gives."""
    hf, config = _tiny_qwen2_vl(kind)
    _qwen2_vl_gguf(tmp_path, hf, config, qtype)
    ours = imported(tmp_path, hf, qtype)
    rope = ours.arch.layers[0].rope
    assert ours.model_type == "qwen2" and (rope.theta, rope.rotary_dim, rope.interleaved) == (1e6, 16, False)
    assert ours.arch.qkv_bias and not ours.arch.o_bias


def test_qwen2_vl_gguf_read_with_llamas_rows_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with its q/k rows un-permuted as Llama's (which the converter leaves as stored for
    llama.cpp's rotate-half mrope) misses transformers' logits."""
    hf, config = _tiny_qwen2_vl("qwen2_vl")
    _qwen2_vl_gguf(tmp_path, hf, config, Q.F32)
    monkeypatch.setitem(architectures.ARCHITECTURES, "qwen2vl",
                        replace(architectures.ARCHITECTURES["qwen2vl"], permuted_qk=True))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


@pytest.mark.parametrize(("sections", "error", "words"), [
    ([2, 3, 2, 1], UnsupportedFeatureError, r"rope.dimension_sections \[2, 3, 2, 1\] is not supported"),
    ([0, 0, 0, 0], UnsupportedFeatureError, r"rope.dimension_sections \[0, 0, 0, 0\] is not supported"),
    ([2, 3, 3, 0, 0], CheckpointError, "must list at most four non-negative section sizes"),
    ([2, -3, 3, 0], CheckpointError, "must list at most four non-negative section sizes"),
    (None, CheckpointError, "lacks 'qwen2vl.rope.dimension_sections'"),
], ids=["fourth-section", "none", "five", "negative", "absent"])
def test_a_qwen2_vl_gguf_whose_sections_are_not_plain_rope_for_text_is_refused(tmp_path, sections, error, words):
    hf, config = _tiny_qwen2_vl("qwen2_vl")
    _qwen2_vl_gguf(tmp_path, hf, config, Q.F32, sections)
    with pytest.raises(error, match=words):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
