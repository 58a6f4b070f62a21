"""GGUF imports of more dense families llama.cpp converts with its plain text-model writer (``jais2``): tiny random
transformers models written as the converter writes them, imported, and run against transformers (float32 files) or
the same file imported in float32 (Q8_0); a control shows the row order counts."""

from __future__ import annotations

from dataclasses import replace

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from test_gguf_dense_families2 import _COMMON, _check, _mapped, _spread, _write  # noqa: E402
from test_gguf_import import _assert_logits_match, _tiny_model  # noqa: E402

Q = gguf.GGMLQuantizationType


def _jais2(tmp_path, qtype):
    """Jais 2 (biased LayerNorms and projections, squared ReLU, rotate-half rope) as its converter writes it: names
    mapped, nothing else changed, the rope over the whole head."""
    hf, config = _tiny_model(transformers.Jais2Config, **_COMMON)
    _spread(hf)
    _write(tmp_path / "m.gguf", "jais2", config, _mapped(hf, config, "jais2"), qtype,
           lambda w: w.add_rope_dimension_count(config.head_dim))
    return hf


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_jais2_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    hf = _jais2(tmp_path, qtype)
    ours = _check(tmp_path, hf, qtype)
    assert ours.model_type == "jais2" and ours.arch.layers[0].rope is not None


def test_jais2_gguf_read_with_llamas_rows_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with its q/k rows un-permuted as Llama's (which llama.cpp's converter permutes, Jais
    2's it leaves) misses transformers' logits."""
    hf = _jais2(tmp_path, Q.F32)
    monkeypatch.setitem(architectures.ARCHITECTURES, "jais2",
                        replace(architectures.ARCHITECTURES["jais2"], permuted_qk=True))
    with pytest.raises(AssertionError):
        _assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))
