"""Reading a GGUF file (or every part of a split one) safely: header and tensor layout checked before anything
is allocated, and typed access to its metadata."""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferrum.errors import CheckpointError, UnsupportedFeatureError


# ---------------------------------------------------------------- file layout

#: Fewest bytes a metadata entry (key length, 1-byte key, type, 1-byte value) and a tensor info (name length,
#: 1-byte name, dimension count, one dimension, type, offset) take: a header claiming more entries than the
#: file can hold is refused before the reader loops over them.
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 1, 8 + 1 + 4 + 8 + 4 + 8
_MAX_DIMS = 4  # GGML_MAX_DIMS


def _check_header(path: Path, where: str) -> None:
    """Magic, version and entry counts against the file size, in microseconds and without allocating."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise CheckpointError(f"{where} is not a readable GGUF file: no GGUF header (magic and counts)")
    version, tensors, kvs = struct.unpack("<IQQ", head[4:])
    if version not in (2, 3):
        raise CheckpointError(f"{where} is not a readable GGUF file: format version {version} (Ferrum reads 2 and 3)")
    room = size - 24
    if kvs * _MIN_KV_BYTES > room or tensors * _MIN_TENSOR_INFO_BYTES > room:
        raise CheckpointError(
            f"{where}: the GGUF header claims {kvs} metadata entries and {tensors} tensors, more than its "
            f"{size} bytes can hold; the file is truncated or corrupt"
        )


def _check_tensor_layout(reader: Any, size: int, where: str) -> None:
    """Every tensor's dimensions, byte size, alignment and extent within the file; no two overlap."""
    from gguf import GGML_QUANT_SIZES

    extents = []
    for t in reader.tensors:
        dims = [int(n) for n in t.shape]
        if not 1 <= len(dims) <= _MAX_DIMS or any(n <= 0 for n in dims):
            raise CheckpointError(f"{where}: tensor {t.name} has dimensions {dims}; each must be positive, "
                                  f"at most {_MAX_DIMS} of them")
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        if dims[0] % block:
            raise CheckpointError(f"{where}: tensor {t.name} rows of {dims[0]} values do not fill whole "
                                  f"{t.tensor_type.name} blocks of {block}")
        n_bytes = math.prod(dims) // block * type_size
        start = int(t.data_offset)
        if (start - reader.data_offset) % reader.alignment:
            raise CheckpointError(f"{where}: tensor {t.name} starts at byte {start}, not aligned to "
                                  f"{reader.alignment} bytes")
        if start + n_bytes > size or t.data.nbytes != n_bytes:
            raise CheckpointError(f"{where}: tensor {t.name} ({n_bytes} bytes at {start}) runs past the end of "
                                  f"the file ({size} bytes); the file is truncated or corrupt")
        extents.append((start, start + n_bytes, t.name))
    extents.sort()
    for (_, end, first), (start, _, second) in zip(extents, extents[1:]):
        if start < end:
            raise CheckpointError(f"{where}: tensors {first} and {second} overlap in the file")


#: How llama.cpp names the parts of a split model (``gguf-split``, ``convert_hf_to_gguf.py --split-max-size``).
_PART_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_READ_ERRORS = (ValueError, OSError, struct.error, IndexError, KeyError, OverflowError, MemoryError)


def part_names(name: str) -> list[str]:
    """Every part's file name, for the first part of a split model (by its name alone); else ``[name]``."""
    named = _PART_NAME.match(name)
    if named is None or int(named["no"]) != 1:
        return [name]
    count = int(named["count"])
    return [f"{named['prefix']}-{number:05d}-of-{count:05d}.gguf" for number in range(1, count + 1)]


def is_whole_or_first_part(name: str) -> bool:
    """False for the second and later parts of a split model (by name)."""
    named = _PART_NAME.match(name)
    return named is None or int(named["no"]) == 1


@dataclass(frozen=True)
class GGUFModel:
    """What the import reads of a model: the first file's metadata and every part's tensors."""

    fields: dict[str, Any]
    tensors: list[Any]  # gguf ReaderTensor
    files: tuple[Path, ...]


def read_model(gguf: Any, path: Path, where: str) -> GGUFModel:
    """``path`` checked and read; for the first part of a split model (``name-00001-of-00003.gguf``), every part,
    each checked the same way and named as llama.cpp names them beside it."""
    first = _read_file(gguf, path, where)
    meta = Metadata(first, where)
    count = int(meta.get("split.count", 1))
    if count <= 1:
        return GGUFModel(first.fields, list(first.tensors), (path,))
    this_part, named = int(meta.get("split.no", 0)), _PART_NAME.match(path.name)
    if this_part != 0 or named is None or int(named["count"]) != count:
        raise CheckpointError(
            f"{where} is part {this_part + 1} of a model split into {count} GGUF files; name the first part "
            f"(its name ends in -00001-of-{count:05d}.gguf), with the other parts beside it"
        )
    files, tensors = [path], list(first.tensors)
    for number, name in enumerate(part_names(path.name)[1:], start=2):
        part = path.with_name(name)
        if not part.is_file():
            raise CheckpointError(f"{where} is the first of {count} parts, but part {number} ({part.name}) is "
                                  f"not beside it; put every part in {path.parent}")
        reader = _read_file(gguf, part, str(part))
        its = Metadata(reader, str(part))
        if (its.get("split.no"), its.get("split.count")) != (number - 1, count):
            raise CheckpointError(f"{part} does not say it is part {number} of {count} (split.no, split.count); "
                                  "the parts come from different splits")
        files.append(part)
        tensors += reader.tensors
    declared = meta.get("split.tensors.count")
    names = {t.name for t in tensors}
    if len(names) != len(tensors) or (declared is not None and int(declared) != len(tensors)):
        raise CheckpointError(f"{where}: its {count} parts hold {len(tensors)} tensors ({len(names)} names), "
                              f"the first part says {declared}; the parts come from different splits")
    return GGUFModel(first.fields, tensors, tuple(files))


def _read_file(gguf: Any, path: Path, where: str) -> Any:
    _check_header(path, where)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except _READ_ERRORS as exc:
        raise CheckpointError(f"{where} is not a readable GGUF file: {str(exc)[:200]} (a file cut short, as an "
                              "interrupted download leaves one, reads so: compare its size with the source's)") from exc
    _check_tensor_layout(reader, path.stat().st_size, where)
    return reader


# ---------------------------------------------------------------- metadata


class Metadata:
    """Typed access to a GGUF file's key/value fields."""

    def __init__(self, reader: Any, where: str):
        self._fields = reader.fields
        self.where = where
        #: The model's tensor names, which tell what its blocks hold where no key says (biases, a second norm).
        self.tensors = frozenset(t.name for t in reader.tensors)
        self._by_name = {t.name: t for t in reader.tensors}

    def tensor(self, name: str) -> Any | None:
        """The file's tensor ``name`` (the gguf reader's), for the few a config is read from; None if absent."""
        return self._by_name.get(name)

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def keys(self, prefix: str) -> list[str]:
        """The file's keys that start with ``prefix``."""
        return [key for key in self._fields if key.startswith(prefix)]

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        value = _field_value(field, key, self.where)
        kind = _kind_of(key)
        if kind is not None and not _is_kind(value, kind):
            raise CheckpointError(
                f"{self.where}: GGUF metadata {key!r} must be {kind}, got {type(value).__name__} {value!r:.80}; "
                "the file is corrupt or was written by a broken converter"
            )
        return value

    def need(self, key: str) -> Any:
        if key not in self._fields:
            raise CheckpointError(f"{self.where}: GGUF metadata lacks {key!r}")
        return self.get(key)


def prediction_blocks(meta: Metadata, p: str, blocks: int) -> int:
    """How many of the file's ``blocks`` are the trailing next-token-prediction ones (``nextn_predict_layers``),
    which are not decoder layers; a file that leaves no decoder layer is refused."""
    mtp = meta.get(p + "nextn_predict_layers", 0)
    if mtp >= blocks:
        raise CheckpointError(f"{meta.where}: {p}nextn_predict_layers {mtp} leaves none of its {blocks} blocks a "
                              "decoder layer; the file is corrupt or was written by a broken converter")
    return mtp


#: The type every metadata field Ferrum reads must have, by the end of its key.
_FIELD_KINDS = {
    **dict.fromkeys((
        "embedding_length", "attention.key_length",
        "attention.value_length", "rope.dimension_count", "expert_count", "vocab_size",
        "block_count", "context_length", "_token_id", "original_context_length", "attention.sliding_window",
        "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length", "split.count",
        "split.no", "split.tensors.count", "nextn_predict_layers", "altup.num_inputs", "altup.active_idx",
        "attention.shared_kv_layers", "attention.indexer.head_count", "attention.indexer.key_length",
        "attention.indexer.top_k", "ssm.conv_kernel", "kda.head_dim", "attention.kv_lora_rank",
        "attention.q_lora_rank", "attention.key_length_mla", "attention.value_length_mla", "expert_shared_count",
        "expert_group_count", "expert_group_used_count", "leading_dense_block_count", "attention.temperature_length",
    ), "a non-negative integer"),
    **dict.fromkeys(("attention.head_count", "attention.head_count_kv", "feed_forward_length"),
                    "a non-negative integer, or a list of one per layer"),
    **dict.fromkeys((
        "rope.freq_base", "rope.scaling.factor", "attention.layer_norm_rms_epsilon", "rope.scaling.attn_factor",
        "attn_logit_softcapping", "final_logit_softcapping", "attention.scale", "embedding_scale", "yarn_attn_factor",
        "yarn_beta_fast", "yarn_beta_slow", "yarn_ext_factor", "yarn_log_multiplier",
        "residual_scale", "logit_scale", "attention.clamp_kqv", "rope.scale_linear", "rope.freq_base_swa",
        "attention.value_scale", "expert_weights_scale", "attention.temperature_scale",
    ), "a finite number"),
    # llama.cpp reads either a period (every n-th layer full, 0: none) or a flag per layer
    "attention.sliding_window_pattern": "a non-negative integer, or a list of one flag per layer",
    **dict.fromkeys((
        "general.architecture", "rope.scaling.type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.chat_template", "general.name",
    ), "a string"),
    **dict.fromkeys(("tokenizer.ggml.tokens", "tokenizer.ggml.merges"), "a list of strings"),
    **dict.fromkeys(("tokenizer.ggml.token_type", "rope.dimension_sections"), "a list of integers"),
    "tokenizer.ggml.scores": "a list of finite numbers",
    "activation_sparsity_scale": "a list of numbers",
    **dict.fromkeys(("swiglu_clamp_exp", "swiglu_clamp_shexp"), "a finite number, or a list of one per layer"),
    **dict.fromkeys(("add_bos_token", "add_eos_token", "add_space_prefix", "expert_weights_norm"), "a boolean"),
}


def _kind_of(key: str) -> str | None:
    return next((kind for end, kind in _FIELD_KINDS.items() if key.endswith(end)), None)


def _is_kind(value: Any, kind: str) -> bool:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == "a non-negative integer":
        return integer(value) and value >= 0
    if kind == "a non-negative integer, or a list of one per layer":
        return all(integer(v) and v >= 0 for v in (value if isinstance(value, list) else [value])) and value != []
    if kind == "a non-negative integer, or a list of one flag per layer":
        flags = value if isinstance(value, list) else None
        return integer(value) and value >= 0 or bool(flags) and all(v in (0, 1) for v in flags)
    if kind == "a finite number":
        return (integer(value) or isinstance(value, float)) and math.isfinite(value)
    if kind == "a finite number, or a list of one per layer":
        return value != [] and all((integer(v) or isinstance(v, float)) and math.isfinite(v)
                                   for v in (value if isinstance(value, list) else [value]))
    if kind == "a string":
        return isinstance(value, str)
    if kind == "a list of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "a list of integers":
        return isinstance(value, list) and all(integer(v) for v in value)
    if kind == "a list of numbers":
        return isinstance(value, list) and all(integer(v) or isinstance(v, float) for v in value)
    if kind == "a list of finite numbers":
        return isinstance(value, list) and all((integer(v) or isinstance(v, float)) and math.isfinite(v) for v in value)
    return isinstance(value, bool)


def _field_value(field: Any, key: str, where: str) -> Any:
    """Decode a ReaderField from its raw parts (works across gguf package versions)."""
    from gguf import GGUFValueType

    types = list(field.types)
    if not types:
        return None

    def scalar(part: np.ndarray) -> Any:
        value = part.tolist()
        return value[0] if isinstance(value, list) else value

    def string(part: np.ndarray) -> str:
        try:
            return bytes(part).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{where}: GGUF field {key!r} holds invalid UTF-8: {exc}") from exc

    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 2:
            raise UnsupportedFeatureError(f"{where}: nested GGUF arrays ({key!r}) are not supported")
        sub = types[-1] if len(types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [string(field.parts[i]) for i in field.data]
        return [scalar(field.parts[i]) for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return string(field.parts[field.data[0]])
    value = scalar(field.parts[field.data[0]])
    if types[0] == GGUFValueType.BOOL:
        return bool(value)
    return value


def float32_value(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def routed_groups(meta: Metadata, p: str) -> dict[str, int]:
    """config.json's expert groups and the groups each token keeps, as the file gives them (one where absent: no
    groups, as llama.cpp reads a file without them)."""
    return {"n_group": int(meta.get(p + "expert_group_count", 1)),
            "topk_group": int(meta.get(p + "expert_group_used_count", 1))}


def routed_scale(meta: Metadata, p: str) -> float:
    """A file's expert_weights_scale for a family that scales its routed experts: 1 where absent or 0 (llama.cpp's
    unset: it then leaves the weights unscaled); a negative or non-finite one is refused by name."""
    scale = meta.get(p + "expert_weights_scale")
    if scale is None or scale == 0:
        return 1.0
    if not 0 < float(scale) < float("inf"):
        raise CheckpointError(f"{meta.where}: {p}expert_weights_scale is {scale}; it must be positive (the factor on "
                              "the routed experts' weights): re-convert the model with llama.cpp's converter")
    return float32_value(scale)


def per_layer(meta: Metadata, key: str, count: int, default: Any = None) -> list[Any]:
    """A value the file gives once or per block, one per block: the file's (required where ``default`` is None)."""
    value = meta.need(key) if default is None else meta.get(key, default)
    value = value if isinstance(value, list) else [value] * count
    if len(value) != count:
        raise CheckpointError(f"{meta.where}: {key} lists {len(value)} values for the file's {count} blocks")
    return value


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Recover Llama 3.x rope scaling from llama.cpp's per-pair ``rope_freqs`` divisors.

    llama.cpp stores ``1``, ``factor`` or a blend per frequency; Hugging Face
    stores the four numbers that generate them. Try the values every Llama 3.x
    release uses (low 1, high 4, original context 8192), then Llama 4 Scout's (low
    and high 1), with the largest divisor as ``factor``; ``None`` if neither
    reproduces the file.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.size != head_dim // 2 or not np.all(factors > 0):
        return None
    if np.allclose(factors, 1.0):
        return {}
    factor = float32_value(factors.max())
    old_ctx = 8192
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    for low, high in ((1.0, 4.0), (1.0, 1.0)):  # Llama 3.x's; Llama 4 Scout's, which blends none
        with np.errstate(divide="ignore", invalid="ignore"):
            smooth = (old_ctx / wavelen - low) / (high - low)
            blended = 1.0 / ((1 - smooth) / factor + smooth)
        want = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, blended))
        if np.allclose(factors, want, rtol=1e-4, atol=1e-6):
            break
    else:
        return None
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old_ctx,
    }
