"""Gemma 4's calls (``gemma4``): ``<|tool_call>call:NAME{key:value,...}<tool_call|>``, the arguments in the
template's own object syntax (bare keys, strings between ``<|"|>`` quote tokens, numbers, booleans, nested objects
and lists as written), as vLLM's ``gemma4`` parser reads them; their parser and forced-call grammar."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from ferrum.serve.tools.bare import tool_call_blocks
from ferrum.serve.tools.grammars import separated
from ferrum.serve.tools.reading import ParsedReply, make_call, parameters_of

GEMMA4_CALL, _CALL_END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_BLOCK = re.compile(re.escape(GEMMA4_CALL) + r"(.*?)(?:" + re.escape(_CALL_END) + r"|$)", re.DOTALL)
_HEAD = re.compile(r"call:([\w.\-]+)\{")
_KEY = re.compile(r"\s*([^\s:,{}\[\]<]+)\s*:")
#: A value written bare: a number, a boolean or null; other bare words are strings, as vLLM's parser keeps them.
_BARE = re.compile(r"\s*([^,{}\[\]<]+)")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?")
#: Jinja writes a None as ``None``, where JSON's ``null`` may also come.
_WORDS = {"true": True, "false": False, "null": None, "None": None}


class _Malformed(ValueError):
    """Arguments that do not read as Gemma 4's object syntax."""


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _value(text: str, at: int) -> tuple[Any, int]:
    """The value starting at ``at`` (after whitespace) and where it ends."""
    at = _skip(text, at)
    if text.startswith(QUOTE, at):
        end = text.find(QUOTE, at + len(QUOTE))
        if end < 0:
            raise _Malformed("unterminated string")
        return text[at + len(QUOTE):end], end + len(QUOTE)
    if text.startswith("{", at):
        return _items(text, at + 1, "}", keyed=True)
    if text.startswith("[", at):
        return _items(text, at + 1, "]", keyed=False)
    bare = _BARE.match(text, at)
    if bare is None:
        raise _Malformed(f"no value at {at}")
    word = bare.group(1).strip()
    if word in _WORDS:
        return _WORDS[word], bare.end()
    number = _NUMBER.fullmatch(word)
    if number:
        return (float(word) if number.group(1) or number.group(2) else int(word)), bare.end()
    return word, bare.end()


def _key(text: str, at: int) -> tuple[str, int]:
    at = _skip(text, at)
    if text.startswith(QUOTE, at):  # a key between quote tokens, which vLLM's parser also takes
        key, at = _value(text, at)
        at = _skip(text, at)
        if not text.startswith(":", at):
            raise _Malformed(f"no ':' after key {key!r}")
        return key, at + 1
    match = _KEY.match(text, at)
    if match is None:
        raise _Malformed(f"no key at {at}")
    return match.group(1), match.end()


def _items(text: str, at: int, close: str, keyed: bool) -> tuple[Any, int]:
    """An object's pairs (``keyed``) or a list's values, from after its opening bracket to after ``close``."""
    found: Any = {} if keyed else []
    at = _skip(text, at)
    if text.startswith(close, at):
        return found, at + 1
    while True:
        if keyed:
            key, at = _key(text, at)
            found[key], at = _value(text, at)
        else:
            value, at = _value(text, at)
            found.append(value)
        at = _skip(text, at)
        if text.startswith(close, at):
            return found, at + 1
        if not text.startswith(",", at):
            raise _Malformed(f"expected ',' or {close!r} at {at}")
        at += 1


def _call(body: str) -> dict[str, Any] | None:
    """``call:NAME{...}`` and nothing else, as one call; None where it does not read so."""
    head = _HEAD.match(body.strip())
    if head is None:
        return None
    try:
        arguments, end = _items(body.strip(), head.end(), "}", keyed=True)
        json.dumps(arguments, allow_nan=False)
    except (_Malformed, ValueError, RecursionError):
        return None
    return make_call(head.group(1), arguments) if not body.strip()[end:].strip() else None


def read_gemma4(text: str, schemas: Any = None, cut: bool = False) -> ParsedReply:
    """Gemma 4's calls, a ``<|tool_call>...<tool_call|>`` block each (one right after another); the text around
    them kept. A block that does not read as one call (no ``call:``, a bracket or string left open, anything after
    its arguments), or is not closed, leaves the reply text; read as ``cut`` (a forced reply stopped inside a
    block), the whole blocks before it are the calls. (``schemas``: the values are typed as written.)"""
    def calls(match: re.Match[str]) -> list[Any] | None:
        if not match.group(0).endswith(_CALL_END):
            return None
        call = _call(match.group(1))
        return None if call is None else [call]

    return tool_call_blocks(text, _BLOCK, calls, cut, GEMMA4_CALL, _CALL_END)


class _Rules:
    """Lark rules of values as Gemma 4's template writes them, from JSON schemas: objects' keys in sorted order
    (its ``dictsort``), strings between quote tokens (``mark``), a local ``$ref`` a rule of its own."""

    def __init__(self, mark: Callable[[str], str], root: dict[str, Any], prefix: str) -> None:
        self.mark, self.root, self.prefix, self.rules, self.named = mark, root, prefix, [], {}

    def value(self, schema: Any) -> str:
        if not isinstance(schema, dict) or schema is True:
            return "any_value"
        ref = schema.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            return self._ref(ref)
        values = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if isinstance(values, list) and values:
            return "(" + " | ".join(self.literal(value) for value in values) + ")"
        branches = schema.get("anyOf", schema.get("oneOf"))
        if isinstance(branches, list) and branches:
            return "(" + " | ".join(self.value(branch) for branch in branches) + ")"
        kind = schema.get("type")
        if isinstance(kind, list):
            return "(" + " | ".join(self.value({**schema, "type": k}) for k in kind) + ")"
        return self._typed(kind, schema)

    def _typed(self, kind: Any, schema: dict[str, Any]) -> str:
        quote = self.mark(QUOTE)
        if kind == "string":
            most = schema.get("maxLength")
            return f"{quote} /[^<]{{0,{most}}}/ {quote}" if isinstance(most, int) else f"{quote} /[^<]*/ {quote}"
        simple = {"integer": "INT", "number": "NUMBER", "boolean": '("true" | "false")', "null": '"null"'}
        if kind in simple:
            return simple[kind]
        if kind == "array":
            item = self.value(schema["items"]) if "items" in schema else "any_value"
            return f'"[" ({item} ("," {item})*)? "]"'
        if kind == "object" and (schema.get("properties") or schema.get("additionalProperties") is False):
            required = set(schema.get("required") or ())
            items = [(f"{json.dumps(key + ':')} {self.value(sub)}", key in required)
                     for key, sub in sorted((schema.get("properties") or {}).items())]
            return f'"{{" {separated(items, json.dumps(","))} "}}"' if items else '"{" "}"'
        return "any_object" if kind == "object" else "any_value"

    def literal(self, value: Any) -> str:
        """A constant as the template writes it."""
        if isinstance(value, str):
            return f"{self.mark(QUOTE)} {json.dumps(value)} {self.mark(QUOTE)}"
        if isinstance(value, dict):
            pairs = [f"{json.dumps(key + ':')} {self.literal(v)}" for key, v in sorted(value.items())]
            return '"{" ' + ' "," '.join(pairs) + ' "}"' if pairs else '"{" "}"'
        if isinstance(value, list):
            return '"[" ' + ' "," '.join(self.literal(v) for v in value) + ' "]"' if value else '"[" "]"'
        return json.dumps(json.dumps(value))

    def _ref(self, ref: str) -> str:
        if ref not in self.named:
            name = self.named[ref] = f"{self.prefix}_ref{len(self.named)}"
            target: Any = self.root
            for part in ref[2:].split("/") if ref != "#" else ():
                target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(
                    target, dict) else {}
            self.rules.append(f"{name}: {self.value(target)}")
        return self.named[ref]


def _any_value(mark: Callable[[str], str]) -> list[str]:
    """Rules of any value in the template's syntax, for what a schema leaves open, and of its numbers."""
    quote = mark(QUOTE)
    return [f'any_value: {quote} /[^<]*/ {quote} | NUMBER | "true" | "false" | "null" | any_object | any_list',
            'any_object: "{" (any_pair ("," any_pair)*)? "}"', 'any_pair: /[A-Za-z_][A-Za-z0-9_]*/ ":" any_value',
            'any_list: "[" (any_value ("," any_value)*)? "]"', "INT: /-?(0|[1-9][0-9]*)/",
            r"NUMBER: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/"]


def gemma4_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Calls as Gemma 4's template writes them: a ``<|tool_call>call:NAME{...}<tool_call|>`` block each, one right
    after another, the arguments under each tool's schema in the template's syntax."""
    rules = []
    for i, function in enumerate(tool["function"] for tool in tools):
        parameters = parameters_of(function)
        values = _Rules(mark, parameters, f"tool{i}")
        rules += [f'call{i}: {json.dumps("call:" + function["name"])} {values.value(parameters)}', *values.rules]
    names = " | ".join(f"call{i}" for i in range(len(tools)))
    block = f"block: {mark(GEMMA4_CALL)} ({names}) {mark(_CALL_END)}"
    return "\n".join([f"start: {'block+' if many else 'block'}", block, *rules, *_any_value(mark)])
