"""What every format's reading shares: a reply split into text and calls, a call as OpenAI's entry, the
tools' schemas, and a forced reply cut short read as its calls so far."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ferrum.structured import closed_objects


#: What reading text that is not (or too deeply nested) JSON raises.
NOT_JSON = (json.JSONDecodeError, RecursionError)


@dataclass(frozen=True)
class ParsedReply:
    """A reply split into the text around the calls and the calls (OpenAI's ``tool_calls`` entries)."""

    before: str  # the text before the first call (all of it when there is none)
    calls: list[dict[str, Any]]
    after: str = ""  # text between and after the calls

    @property
    def around(self) -> tuple[str, str]:
        """The content's text before the first call and after it. The whitespace that separates the text from the
        calls is their layout, not content: dropped where it would end the content, or begin it after a call. The
        reply's own whitespace before text that precedes the calls stays, as it does without calls: a stream sends
        that text before any call shows, so the whole message must keep it too."""
        if not self.calls:
            return self.before, ""
        if not self.before.strip():
            return "", self.after.strip()
        if not self.after.strip():
            return self.before.rstrip(), ""
        return self.before, self.after.rstrip()

    @property
    def content(self) -> str | None:
        """The message's content: the text as it is without calls; with calls, the text around them
        (:attr:`around`), or null where there is none."""
        if not self.calls:
            return self.before
        return "".join(self.around) or None


def make_call(name: Any, arguments: Any) -> dict[str, Any] | None:
    """One OpenAI tool call, or None where the model's object is not a call (no name, odd arguments)."""
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except NOT_JSON:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return _entry(name, json.dumps(arguments, ensure_ascii=False))


def _entry(name: str, arguments: str) -> dict[str, Any]:
    """An OpenAI ``tool_calls`` entry with a fresh id; ``arguments`` as the JSON text clients read."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def read_object_call(text: str, keys: tuple[str, ...] = ("arguments",)) -> dict[str, Any] | None:
    """A call written as a JSON object naming its function, its arguments under the first of ``keys`` it has."""
    try:
        value = json.loads(text)
    except NOT_JSON:
        return None
    return object_call(value, keys)


def object_call(value: Any, keys: tuple[str, ...] = ("arguments",)) -> dict[str, Any] | None:
    """A call read from a JSON value: an object naming its function, its arguments under the first of ``keys``."""
    if not isinstance(value, dict):
        return None
    return make_call(value.get("name"), next((value[key] for key in keys if key in value), None))


#: The tools' parameter schemas, by function name: how the formats that write arguments bare read their values.
Schemas = dict[str, dict[str, Any]]


def tool_properties(schemas: Schemas, name: str) -> dict[str, Any]:
    properties = (schemas.get(name) or {}).get("properties")
    return properties if isinstance(properties, dict) else {}


def string_schema(schema: Any) -> dict[str, Any] | None:
    """The schema of the strings a parameter admits where it admits no other values but null (its type, an enum or
    const of strings, a type list or an anyOf / oneOf of a string and null: pydantic's ``Optional[str]``); else
    None. The formats that write arguments bare write such values as they are, anything else as JSON."""
    if not isinstance(schema, dict):
        return None
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(values, list) and values:
        return schema if all(isinstance(value, str) for value in values) else None
    kind = schema.get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind and set(kind) <= {"string", "null"}):
        return schema
    branches = schema.get("anyOf", schema.get("oneOf"))
    if not isinstance(branches, list):
        return None
    strings = [branch for branch in branches if string_schema(branch) is not None]
    others = [branch for branch in branches if branch not in strings and not _is_null(branch)]
    return string_schema(strings[0]) if len(strings) == 1 and not others else None


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


def declared_string(schema: Any) -> bool:
    """Whether a parameter's schema admits only strings, or strings and null (:func:`string_schema`)."""
    return string_schema(schema) is not None


def admits_null(schema: Any) -> bool:
    """Whether a parameter's schema admits null (a type list with it, or an anyOf / oneOf branch of it)."""
    if not isinstance(schema, dict):
        return False
    kind, branches = schema.get("type"), schema.get("anyOf", schema.get("oneOf"))
    return (isinstance(kind, list) and "null" in kind) or (
        isinstance(branches, list) and any(_is_null(branch) for branch in branches))


#: A bare ``{"type": "object"}`` would let a forced call invent any keys, nested without end.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def parameters_of(function: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters as its calls are held: objects that do not say otherwise closed (as xgrammar's strict
    mode, vLLM's default, holds them)."""
    return closed_objects(function.get("parameters") or _NO_PARAMETERS)


def calls_so_far(heads: tuple[re.Pattern[str], ...], text: str) -> ParsedReply:
    """A forced reply (one that opens with a call) cut short, by ``max_tokens`` or a stop: the calls it wrote, the
    last with its arguments' text as far as it got, which OpenAI and vLLM hand back as it is (not JSON). ``heads``
    match where a call names its function, up to its arguments (the first match is the call). A reply cut
    before the first call's name is text."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while matches := [m for m in (head.search(text, at) for head in heads) if m is not None]:
        match = min(matches, key=lambda m: m.start())
        name = match.group("name")
        name = json.loads(name) if name.startswith('"') else name  # JSON's spelling of it
        if match.groupdict().get("args", "") is None:  # cut between the name and its arguments
            arguments, at = "", len(text)
        else:
            try:
                value, at = decoder.raw_decode(text, match.end())
                arguments = json.dumps(value, ensure_ascii=False)
            except NOT_JSON:
                arguments, at = text[match.end():], len(text)
        entry = _entry(name, arguments)  # the id the model wrote, where the format has it write one (Kimi K2's)
        calls.append({**entry, "id": match.group("id")} if "id" in match.groupdict() else entry)
    return ParsedReply("", calls) if calls else ParsedReply(text, [])


#: A call as JSON names its function first (the forced grammar's order), then its arguments (group ``args``: the
#: key, where the reply got that far).
JSON_HEAD = re.compile(r'\{\s*"name"\s*:\s*(?P<name>"(?:[^"\\]|\\.)*")'
                       r'(?P<args>\s*,\s*"(?:arguments|parameters)"\s*:\s*)?')
