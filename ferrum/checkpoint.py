"""Reading safetensors checkpoints (single file or sharded) into host arrays, and streaming new ones out."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import ml_dtypes  # registers bfloat16 with numpy so safetensors can read it
import numpy as np
from safetensors import safe_open

from ferrum.errors import CheckpointError, FerrumError, MissingTensorError

INDEX_FILE = "model.safetensors.index.json"
#: Modules of a multimodal checkpoint that are not its text model, which is all Ferrum runs (Qwen2-VL's
#: ``visual.*`` beside its ``model.*``, Gemma 3's ``vision_tower``, projectors, audio towers, Gemma 3n's
#: ``embed_vision`` / ``embed_audio``).
NOT_TEXT = re.compile(
    r"(?:^|\.)(?:vision\w*|visual|audio\w*|\w*multi_modal_projector|mm_projector|image\w*|embed_(?:vision|audio))\.")

#: safetensors dtype codes and their element sizes.
SAFETENSORS_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "F8_E4M3": 1,
                        "F8_E5M2": 1}
#: safetensors dtype codes of FP8 tensors -> ml_dtypes' types, which safetensors' numpy reader does not know
#: (read by :func:`_read_raw`; decoded by :mod:`ferrum.quant.fp8`).
FP8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
#: What a model's tensors may be stored as: floats, uint32 words of packed quantized weights, and FP8 codes.
#: Other integer and bool tensors are refused by name rather than misread.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
READABLE_DTYPES = FLOAT_DTYPES | {"U32", "U8", "I32"} | set(FP8_DTYPES)  # MLX codes, float-mode scales, AWQ/GPTQ


def is_float(array: np.ndarray) -> bool:
    """Whether a tensor read from a checkpoint holds floats (ml_dtypes' bfloat16, which numpy calls kind "V", too)."""
    return array.dtype.kind == "f" or array.dtype.name == "bfloat16"


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


#: The names of a model's weights saved as PyTorch pickles (transformers', Mistral's): not its training_args.bin.
WEIGHT_PICKLES = ("pytorch_model*.bin", "consolidated*.pth", "model*.pt")



def require_regular_file(path: Path, error: type[FerrumError]) -> None:
    """Refuse with ``error`` a checkpoint file that is not a regular one: a FIFO or a device in the folder would block
    the read for ever, or stream without end."""
    if not path.is_file():
        raise error(f"{path} is not a regular file; a checkpoint's files must be")


class Checkpoint:
    """Lazy access to the tensors of a checkpoint folder.

    Tensors are read one at a time (memory-mapped by safetensors), so loading
    a model never holds two copies of every weight on the host.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        #: where each tensor is, and the index entries no shard holds (named when the model needs one)
        self._where, self._unheld = self._locate_tensors()
        self._headers: dict[str, tuple[str, tuple[int, ...]]] | None = None

    def _locate_tensors(self) -> tuple[dict[str, Path], dict[str, str]]:
        """Where each tensor is, by the files' own headers (as transformers reads them), in ``model.safetensors``
        where the folder has one (files beside it, an adapter, Mistral's consolidated or a stale sharding, are not
        the model), else in the shards the index names (an index entry no shard holds, a stale
        ``rotary_emb.inv_freq``, is not a tensor; a tensor it leaves out still is), else in every
        ``*.safetensors`` file."""
        index, whole = self.folder / INDEX_FILE, self.folder / "model.safetensors"
        if index.exists():
            self._require_regular(index)
        weight_map = self._weight_map(index) if index.exists() else {}
        if whole.exists():
            files = [whole]
            others = sorted(set(weight_map.values()) - {whole.name})
            if others:
                warnings.warn(f"{self.folder} holds model.safetensors and an index of other shards ({others[0]}...); "
                              "reading model.safetensors, as transformers does: remove whichever is stale",
                              stacklevel=3)
        elif weight_map:
            files = list(dict.fromkeys(self._shard(index, f) for f in weight_map.values()))
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for pattern in WEIGHT_PICKLES for p in self.folder.glob(pattern))
            hint = "" if not pickled else (
                f" ({pickled[0]} is a PyTorch pickle, which Ferrum does not unpickle: loading one can run code. "
                "Save the model as safetensors with transformers: AutoModelForCausalLM.from_pretrained(FOLDER)"
                ".save_pretrained(NEW_FOLDER))")
            raise CheckpointError(
                f"no *.safetensors files in {self.folder}; Ferrum loads Hugging Face safetensors checkpoints{hint}"
            )
        where: dict[str, Path] = {}
        for f in files:
            self._require_regular(f)
            with _open(f) as handle:
                for name in handle.keys():
                    if name in where and weight_map.get(name) not in (where[name].name, f.name):
                        arbiter = (f"{INDEX_FILE} does not name it" if weight_map
                                   else f"no {INDEX_FILE} says which to read")
                        raise CheckpointError(
                            f"tensor {name} is in both {where[name].name} and {f.name} in {self.folder}, and "
                            f"{arbiter}; remove the stale file (or name it in the index)")
                    if name not in where or weight_map.get(name) == f.name:
                        where[name] = f
        return where, {name: file for name, file in weight_map.items() if name not in where and whole not in files}

    @staticmethod
    def _weight_map(index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CheckpointError(
                f"{index} is malformed ({type(exc).__name__}: {exc}); it must be JSON with a 'weight_map' object"
            ) from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        return weight_map

    def _shard(self, index: Path, name: str) -> Path:
        """A shard the index names: a regular file inside the checkpoint folder, nothing else. Judged by its name,
        links not followed: the Hugging Face cache's snapshot files are links into its ``blobs`` folder."""
        normalized = os.path.normpath(name)
        if Path(name).is_absolute() or normalized == ".." or normalized.startswith(f"..{os.sep}"):
            raise CheckpointError(f"{index} names {name!r}, which is outside the checkpoint folder; refusing to read it")
        path = self.folder / normalized
        if not path.exists():
            raise CheckpointError(f"{index} lists shard {name!r}, which is not in the folder")
        self._require_regular(path)
        return path

    @staticmethod
    def _require_regular(path: Path) -> None:
        require_regular_file(path, CheckpointError)

    def names(self) -> set[str]:
        return set(self._where)

    def require(self, names: list[str]) -> None:
        """Fail naming every tensor that is absent, before any is uploaded."""
        missing = [n for n in names if n not in self._where]
        if missing:
            listed = [self._unheld[n] for n in missing if n in self._unheld]
            where = f"{self.folder} (its index lists it in {listed[0]}, which does not hold it)" if listed else \
                str(self.folder)
            raise MissingTensorError(missing, where)

    def headers(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every tensor's safetensors dtype code and shape, from the file headers (no data read; read once)."""
        if self._headers is None:
            found: dict[str, tuple[str, tuple[int, ...]]] = {}
            for name, handle in self._open_each(list(self._where)):
                tensor = handle.get_slice(name)
                found[name] = (tensor.get_dtype(), tuple(tensor.get_shape()))
            self._headers = found
        return self._headers

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers."""
        return {name: shape for name, (_, shape) in self.headers().items()}

    def read(self, name: str) -> np.ndarray:
        return next(self.read_many([name]))[1]

    def read_many(self, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yield tensors grouped by file, opening each shard once; dtype and finiteness checked."""
        for name, handle in self._open_each(names):
            path = self._where[name]
            dtype = handle.get_slice(name).get_dtype()
            if dtype not in READABLE_DTYPES:
                raise CheckpointError(
                    f"{path.name}: tensor {name} is stored as {dtype}; Ferrum reads float weights (F32, F16, BF16) "
                    "and quantized ones (MLX, AWQ, GPTQ, FP8). Convert the checkpoint (integer checkpoints are "
                    "not supported)"
                )
            try:
                array = _read_raw(path, name, dtype) if dtype in FP8_DTYPES else handle.get_tensor(name)
            except CheckpointError:
                raise
            except Exception as exc:  # safetensors raises its own error types for truncated data
                raise CheckpointError(f"{path}: cannot read tensor {name} ({exc}); the file is truncated or corrupt") from None
            if dtype in FLOAT_DTYPES and not np.isfinite(array).all():
                raise CheckpointError(
                    f"{path.name}: tensor {name} holds NaN or infinite values; the checkpoint is corrupt"
                )
            yield name, array

    def _open_each(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        """``(name, open handle of its shard)``, shard by shard."""
        self.require(names)
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[name], []).append(name)
        for path, file_names in by_file.items():
            with _open(path) as handle:
                for name in file_names:
                    yield name, handle


def _read_raw(path: Path, name: str, dtype: str) -> np.ndarray:
    """Tensor ``name`` of safetensors file ``path`` from its bytes, as the numpy type of ``dtype`` (an FP8 code,
    which safetensors' numpy reader cannot name): the header is a little-endian u64 length, then JSON giving the
    tensor's shape and byte range after it."""
    stat = path.stat()
    size, header = _header(str(path), stat.st_size, stat.st_mtime_ns)
    entry = header[name]
    start, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - start != tensor_nbytes(dtype, shape):
        raise CheckpointError(f"{path}: tensor {name} holds {end - start} bytes, not the "
                              f"{tensor_nbytes(dtype, shape)} of {dtype} {list(shape)}; the file is corrupt")
    with open(path, "rb") as f:
        f.seek(8 + size + start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise CheckpointError(f"{path}: cannot read tensor {name} (the file ends early); it is truncated")
    return np.frombuffer(data, dtype=FP8_DTYPES[dtype]).reshape(shape)


@functools.lru_cache(maxsize=4)
def _header(path: str, file_size: int, mtime_ns: int) -> tuple[int, dict[str, Any]]:
    """A safetensors file's header length and JSON (cached by path, size and time: a shard holds many tensors)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return size, json.loads(f.read(size))


@contextmanager
def _open(path: Path) -> Iterator[Any]:
    """``safe_open`` whose failures (empty, truncated or garbage files) name the file."""
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "it may be truncated (an interrupted download) or not a safetensors file at all"
        ) from None
    with handle:
        yield handle
