"""JSON schemas held strictly, as xgrammar's strict mode (vLLM's default) holds them: an object that does not say
whether it takes more keys than its ``properties`` takes none. A bare ``{"type": "object", "properties": {}}``
(OpenAI's form of a function of no arguments) would otherwise let a constrained reply invent keys without end."""

from __future__ import annotations

from typing import Any

#: Keywords whose value is one schema (``items`` also a list of them, before draft 2020-12).
_ONE = ("items", "additionalItems", "contains", "propertyNames", "not", "if", "then", "else", "unevaluatedItems",
        "additionalProperties", "unevaluatedProperties")
#: Keywords whose value maps names to schemas (``dependencies`` also to lists of names).
_BY_NAME = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
#: Keywords whose value lists alternative schemas, each a whole value.
_ALTERNATIVES = ("anyOf", "oneOf", "prefixItems")
#: An object schema with one of these says what more keys it takes, or may take its keys from elsewhere.
_OPEN_OR_SPREAD = frozenset(("additionalProperties", "unevaluatedProperties", "allOf", "$ref"))


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``"additionalProperties": false`` on each object schema that says nothing of more keys. An
    object whose keys may be spread over parts of it (``allOf``, a ``$ref`` beside its own keywords), and each
    ``allOf`` part, is left as it is: closing one part would refuse the others' keys."""
    return _closed(schema, True)


def _closed(schema: Any, close: bool) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), list):
            out[key] = [_closed(item, True) for item in out[key]]
        elif key in out:
            out[key] = _closed(out[key], True)
    for key in _BY_NAME:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(item, True) for name, item in out[key].items()}
    for key in _ALTERNATIVES:
        if isinstance(out.get(key), list):
            out[key] = [_closed(item, True) for item in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_closed(item, False) for item in out["allOf"]]
    if close and _is_object(out) and not _OPEN_OR_SPREAD & set(out):
        out["additionalProperties"] = False
    return out


def _is_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if kind is None:
        return "properties" in schema
    return kind == "object" or (isinstance(kind, list) and "object" in kind)
