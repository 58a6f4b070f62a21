"""Reading safetensors checkpoints (single file or sharded) into host arrays, and streaming new ones out."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy so safetensors can read it
import numpy as np
from safetensors import safe_open

from ferrum.errors import CheckpointError, MissingTensorError

INDEX_FILE = "model.safetensors.index.json"

#: safetensors dtype codes and their element sizes.
SAFETENSORS_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1}


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of safetensors dtype code ``dtype`` and ``shape``."""
    return math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]


def write_safetensors_header(
    out: BinaryIO, tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> None:
    """Start a safetensors file whose tensors (name, dtype code, shape) are then written in order.

    Lets a converter stream tensors one at a time: the header only needs their
    sizes. It is a little-endian u64 length, then JSON padded with spaces so the
    data starts 8-byte aligned, as the safetensors library writes it.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in tensors:
        size = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    out.write(len(text).to_bytes(8, "little"))
    out.write(text)


class Checkpoint:
    """Lazy access to the tensors of a checkpoint folder.

    Tensors are read one at a time (memory-mapped by safetensors), so loading
    a model never holds two copies of every weight on the host.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._where: dict[str, Path] = self._locate_tensors()

    def _locate_tensors(self) -> dict[str, Path]:
        index = self.folder / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is malformed: {exc!r}") from exc
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).exists()})
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that are not in the folder: {', '.join(missing)}")
            return {name: self.folder / f for name, f in weight_map.items()}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"no *.safetensors files in {self.folder}; Ferrum loads Hugging Face safetensors checkpoints"
            )
        where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="numpy") as handle:
                for name in handle.keys():
                    where[name] = f
        return where

    def names(self) -> set[str]:
        return set(self._where)

    def require(self, names: list[str]) -> None:
        """Fail naming every tensor that is absent, before any is uploaded."""
        missing = [n for n in names if n not in self._where]
        if missing:
            raise MissingTensorError(missing, str(self.folder))

    def headers(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every tensor's safetensors dtype code and shape, from the file headers (no data read)."""
        found: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, handle in self._open_each(list(self._where)):
            tensor = handle.get_slice(name)
            found[name] = (tensor.get_dtype(), tuple(tensor.get_shape()))
        return found

    def read(self, name: str) -> np.ndarray:
        return next(self.read_many([name]))[1]

    def read_many(self, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yield tensors grouped by file, opening each shard once."""
        for name, handle in self._open_each(names):
            yield name, handle.get_tensor(name)

    def _open_each(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        """``(name, open handle of its shard)``, shard by shard; a shard that lacks a tensor its
        index promises is named, not left to a raw reader error."""
        self.require(names)
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[name], []).append(name)
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="numpy") as handle:
                present = set(handle.keys())
                for name in file_names:
                    if name not in present:
                        raise MissingTensorError([name], f"{self.folder} (its index lists it in {path.name})")
                    yield name, handle
