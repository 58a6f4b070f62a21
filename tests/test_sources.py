"""``ferrum.load`` takes what users name: a checkpoint folder, or a GGUF file imported once into the cache."""

from __future__ import annotations

import numpy as np
import pytest

import ferrum
from ferrum.errors import CheckpointError
from ferrum.sources import gguf_checkpoint, resolve_model

from test_gguf_import import write_tiny_gguf

gguf = pytest.importorskip("gguf")


def test_gguf_file_loads_directly_and_is_imported_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, types={"weight": gguf.GGMLQuantizationType.Q4_1})
    llm = ferrum.load(path, backend="cpu")
    folder = gguf_checkpoint(path)
    assert folder.parent == tmp_path / "cache" / "models" / "gguf" and llm.path == folder
    assert llm.model.config.quantization is not None
    stamp = (folder / "config.json").stat().st_mtime_ns
    again = ferrum.load(path, backend="cpu")
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # reused, not imported again
    tokens = [3, 1, 4, 1, 5]
    assert np.array_equal(llm.model.forward_verify("a", tokens), again.model.forward_verify("a", tokens))


def test_a_changed_gguf_file_is_imported_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, types={"weight": gguf.GGMLQuantizationType.Q8_0})
    first = gguf_checkpoint(path)
    write_tiny_gguf(path, types={"weight": gguf.GGMLQuantizationType.Q4_0})
    second = gguf_checkpoint(path)
    assert first != second and ferrum.config.ModelConfig.from_file(second).quantization.bits == 4


def test_what_is_neither_a_folder_nor_a_gguf_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        resolve_model(tmp_path / "missing")
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="is a file"):
        ferrum.load(stray)
