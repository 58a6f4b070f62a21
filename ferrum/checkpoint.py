"""Reading safetensors checkpoints (single file or sharded) into host arrays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy so safetensors can read it
import numpy as np
from safetensors import safe_open

from ferrum.errors import CheckpointError, MissingTensorError

INDEX_FILE = "model.safetensors.index.json"


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

    def read(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise MissingTensorError([name], str(self.folder))
        with safe_open(str(self._where[name]), framework="numpy") as handle:
            return self._get(handle, name)

    def _get(self, handle, name: str) -> np.ndarray:
        """One tensor; a shard that lacks what the index promises is named, not a raw reader error."""
        if name not in handle.keys():
            raise MissingTensorError([name], f"{self.folder} (its index lists it in {self._where[name].name})")
        return handle.get_tensor(name)

    def read_many(self, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yield tensors grouped by file, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[name], []).append(name)
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="numpy") as handle:
                for name in file_names:
                    yield name, self._get(handle, name)
