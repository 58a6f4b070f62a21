"""Reading ``config.json`` through a family's table of keys.

A family declares every key its transformers implementation reads that
changes the math, with transformers' default and a check. Builders read
values only through :class:`KeyReader`, which refuses a key the table does
not declare, so the table cannot drift from what is honoured. A check
returns None when the value is fine, or says what is wrong and what to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Collection

from ferrum.errors import ConfigError, UnsupportedFeatureError

Check = Callable[[Any], "str | None"]

_ABSENT = object()


@dataclass(frozen=True)
class Key:
    """One math-changing config key: transformers' default and what Ferrum accepts."""

    name: str
    default: Any = None
    check: Check | None = None  # None: any value of the right kind is honoured
    #: True: a failed check means "valid but unsupported" (UnsupportedFeatureError), else ConfigError.
    unsupported: bool = False


# ------------------------------------------------------------------ checks


def positive_int(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return f"must be a positive integer, got {value!r}"
    return None


def size(limit: int) -> Check:
    """A positive integer no larger than ``limit``: far above any real model, low enough that an absurd
    config fails at once instead of building per-layer tables or allocating gigabytes."""

    def check(value: Any) -> str | None:
        problem = positive_int(value)
        if problem is None and value > limit:
            return f"is {value}, beyond any real model (limit {limit}); the config is corrupt"
        return problem

    return check


def optional_size(limit: int) -> Check:
    check = size(limit)
    return lambda value: None if value is None else check(value)


def optional_count(limit: int) -> Check:
    """None, 0 or a :func:`size` up to ``limit``: a count that may be none (LongCat-Flash's zero experts)."""
    check = size(limit)

    def count(value: Any) -> str | None:
        if value is None or type(value) is int and value >= 0:  # not a bool
            return check(value) if value else None
        return f"must be a non-negative integer, got {value!r}"

    return count


def optional_positive_int(value: Any) -> str | None:
    return None if value is None else positive_int(value)


def optional_non_negative_int(value: Any) -> str | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return None
    return f"must be a non-negative integer, got {value!r}"


def positive_number(value: Any) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        return f"must be a positive number, got {value!r}"
    return None


def optional_positive_number(value: Any) -> str | None:
    return None if value is None else positive_number(value)


def boolean(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else f"must be true or false, got {value!r}"


def one_of(*allowed: Any) -> Check:
    def check(value: Any) -> str | None:
        if value in allowed:
            return None
        return f"is {value!r}; Ferrum supports {', '.join(repr(a) for a in allowed)}"

    return check


def lists_of(value: Any, count: int, allowed: Collection[Any]) -> bool:
    """Whether ``value`` is a list of ``count`` entries, each one of ``allowed`` (a layer's kind): an entry that is a
    list or an object fails this instead of raising (``allowed`` may be a table, which cannot hash one), a bool is
    never one of them (``True in {1: ...}`` would hold)."""
    return isinstance(value, list) and len(value) == count and all(
        isinstance(entry, (str, int)) and not isinstance(entry, bool) and entry in allowed for entry in value)


def required(check: Check) -> Check:
    """``check``, a value being required (a family whose runtimes have no default for the key: mlx-lm's ModelArgs
    without one)."""
    return lambda value: "must be set: the model's runtimes have no default for it" if value is None else check(value)


def falsy(what_to_do: str) -> Check:
    def check(value: Any) -> str | None:
        return None if not value else f"is {value!r}, which Ferrum does not support; {what_to_do}"

    return check


class KeyReader:
    """Values of one config, each read through its family's table."""

    def __init__(self, raw: dict[str, Any], keys: dict[str, Key], family: str, where: str):
        self.raw, self.keys, self.family, self.where = raw, keys, family, where

    def __call__(self, name: str) -> Any:
        key = self.keys.get(name)
        if key is None:  # a builder bug, not a user error
            raise KeyError(f"family {self.family!r} reads {name!r}, which its key table does not declare")
        value = self.raw.get(name, _ABSENT)
        if value is _ABSENT:  # an explicit null is kept: it switches off e.g. Gemma 2's soft-capping
            value = key.default
        if key.check is not None:
            problem = key.check(value)
            if problem is not None:
                self.fail(name, problem, key.unsupported)
        return value

    def get(self, name: str) -> Any:
        """The value of a key the family may not declare (shared builders); None when undeclared."""
        return self(name) if name in self.keys else None

    def fail(self, name: str, problem: str, unsupported: bool = False) -> None:
        error = UnsupportedFeatureError if unsupported else ConfigError
        raise error(f"{self.where}: {self.family} config key {name!r} {problem}")

    def validate_all(self) -> None:
        """Check every declared key, read by the builder or not."""
        for name in self.keys:
            self(name)
