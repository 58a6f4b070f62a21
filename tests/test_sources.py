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


def test_two_files_of_one_name_size_and_time_are_two_imports_anyone_may_read(tmp_path, monkeypatch):
    """Copies keep a file's time (cp -p, rsync -t, tar): two different models at two places, alike in name, size
    and time, were one import, the second running the first's weights. Imports are made as the umask says (they
    were the importing user's alone, so a cache warmed in an image build failed for every other user)."""
    import os

    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    write_tiny_gguf(first, types={"weight": gguf.GGMLQuantizationType.Q8_0})
    write_tiny_gguf(second, types={"weight": gguf.GGMLQuantizationType.Q8_0}, std=0.5)
    assert first.stat().st_size == second.stat().st_size and first.read_bytes() != second.read_bytes()
    os.utime(second, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns))
    old = os.umask(0o022)
    try:
        imported = [gguf_checkpoint(first), gguf_checkpoint(second)]
    finally:
        os.umask(old)
    assert imported[0] != imported[1]
    tokens = [3, 1, 4, 1, 5]
    logits = [ferrum.load(path, backend="cpu").model.forward_verify("a", tokens) for path in (first, second)]
    assert not np.allclose(logits[0], logits[1])
    assert all(folder.stat().st_mode & 0o777 == 0o755 for folder in imported)


def test_a_cache_that_cannot_take_the_import_is_named_with_the_way_out(tmp_path, monkeypatch):
    """A full disk (or a read-only cache whose folders exist) was a bare OSError; nothing is left half written."""
    import errno

    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    def full(gguf_path, staging, progress=None):
        (staging / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ferrum.gguf_import.convert_gguf", full)
    with pytest.raises(CheckpointError, match=r"into .*cache/models/gguf failed \(No space left on device\); free "
                                              r"space there or set FERRUM_CACHE_DIR"):
        gguf_checkpoint(path)
    assert not [p for p in (tmp_path / "cache" / "models" / "gguf").iterdir()]


def test_a_long_name_imports_and_a_file_cut_short_is_named_so(tmp_path, monkeypatch):
    """A 230-character name (the import's lock and staging names overran 255: "File name too long"); a file cut
    inside its tensor data, as an interrupted download leaves it, says what to suspect."""
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "cache"))
    long = tmp_path / ("m" * 225 + ".gguf")
    write_tiny_gguf(long)
    assert (gguf_checkpoint(long) / "config.json").exists()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(long.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match="cut short|truncated"):
        gguf_checkpoint(cut)


def test_what_is_neither_a_folder_nor_a_gguf_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        resolve_model(tmp_path / "missing")
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="is a file"):
        ferrum.load(stray)


IMPORT_ONCE = """
import sys
import time
import ferrum.sources as sources

real = sources._import

def counted(*args):  # slowed down so the three processes overlap
    with open(sys.argv[2], "a") as log:
        log.write("import\\n")
    time.sleep(1.5)
    real(*args)

sources._import = counted
print(sources.gguf_checkpoint(sys.argv[1]))
"""


def test_concurrent_first_runs_import_once(tmp_path):
    import os
    import subprocess
    import sys

    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    log = tmp_path / "imports.log"
    env = {**os.environ, "FERRUM_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "-c", IMPORT_ONCE, str(gguf), str(log)], env=env,
                             stdout=subprocess.PIPE, text=True) for _ in range(3)]
    folders = {run.communicate(timeout=300)[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs)
    assert len(folders) == 1 and log.read_text().count("import") == 1


def test_an_unwritable_cache_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(blocker / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    with pytest.raises(CheckpointError, match="FERRUM_CACHE_DIR"):
        gguf_checkpoint(path)
