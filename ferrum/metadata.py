"""Per-request metadata: the ``ferrum_*`` keys Ferrum acts on, checked in one table.

A request may carry any mapping of metadata (the seeds' executor inputs do).
Keys starting with ``ferrum_`` are Ferrum's own: each must be in
:data:`KNOWN_KEYS`, so a misspelt option is refused instead of silently
ignored. Every other key passes through untouched for the caller's own use.

To add a key, add one :class:`MetadataKey` to :data:`KNOWN_KEYS` with a
check of its value, and read it where it acts (``metadata.get(name)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ferrum.errors import InvalidRequestError

PREFIX = "ferrum_"


@dataclass(frozen=True)
class MetadataKey:
    """One key Ferrum acts on: what its value must be, and what it does."""

    name: str
    check: Callable[[Any], bool]
    expects: str  # what ``check`` accepts, for the error message
    doc: str


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


REQUIRE_FULL_LOGITS = "ferrum_require_full_logits"
LORA_ADAPTER = "ferrum_lora_adapter"
LORA_PATH = "ferrum_lora_path"

#: The one table of ``ferrum_*`` keys. Add new keys here.
KNOWN_KEYS: dict[str, MetadataKey] = {
    key.name: key
    for key in (
        MetadataKey(
            REQUIRE_FULL_LOGITS, _is_bool, "True or False",
            "logits for every position of this request (RequestOutput.full_logits), not just the last",
        ),
        MetadataKey(
            LORA_ADAPTER, _is_name, "a non-empty adapter name",
            "run this request with the LoRA adapter loaded under this name (ferrum.adapters)",
        ),
        MetadataKey(
            LORA_PATH, _is_name, "a non-empty folder path",
            "run this request with the LoRA adapter in this folder, loaded on first use "
            "(under ferrum_lora_adapter's name if given, else the resolved path)",
        ),
    )
}

EMPTY: Mapping[str, Any] = MappingProxyType({})


def check_metadata(metadata: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only copy of ``metadata`` once every ``ferrum_*`` key in it is known and valid."""
    if metadata is None:
        return EMPTY
    if not isinstance(metadata, Mapping):
        raise InvalidRequestError(f"metadata must be a mapping of string keys, got {type(metadata).__name__}")
    for name, value in metadata.items():
        if not isinstance(name, str):
            raise InvalidRequestError(f"metadata keys must be strings, got {name!r}")
        if not name.startswith(PREFIX):
            continue
        key = KNOWN_KEYS.get(name)
        if key is None:
            raise InvalidRequestError(
                f"unknown metadata key {name!r}: keys starting with {PREFIX!r} are Ferrum's own; "
                f"the known ones are {', '.join(sorted(KNOWN_KEYS))} (other keys pass through)"
            )
        if not key.check(value):
            raise InvalidRequestError(f"metadata {name!r} must be {key.expects}, got {value!r}")
    return MappingProxyType(dict(metadata))


def require_full_logits(metadata: Mapping[str, Any]) -> bool:
    return bool(metadata.get(REQUIRE_FULL_LOGITS, False))
