"""Gemma 4's calls (``gemma4``): ``<|tool_call>call:NAME{key:value,...}<tool_call|>``, the arguments in the
template's own object syntax (bare keys, strings between ``<|"|>`` quote tokens, numbers, booleans, nested objects
and lists as written), as vLLM's ``gemma4`` parser reads them; and FunctionGemma's (``functiongemma``), the same
syntax under Gemma 3's tokens, ``<start_function_call>call:NAME{key:<escape>text<escape>,...}<end_function_call>``
(Gemma 4's tokens are those renamed). Their parser and forced-call grammar, one per set of tokens."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from ferrum.serve.tools.bare import tool_call_blocks
from ferrum.serve.tools.grammars import separated
from ferrum.serve.tools.reading import ParsedReply, make_call, parameters_of

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


def _value(text: str, at: int, quote: str) -> tuple[Any, int]:
    """The value starting at ``at`` (after whitespace) and where it ends, strings between ``quote`` tokens."""
    at = _skip(text, at)
    if text.startswith(quote, at):
        end = text.find(quote, at + len(quote))
        if end < 0:
            raise _Malformed("unterminated string")
        return text[at + len(quote):end], end + len(quote)
    if text.startswith("{", at):
        return _items(text, at + 1, "}", quote, keyed=True)
    if text.startswith("[", at):
        return _items(text, at + 1, "]", quote, keyed=False)
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


def _key(text: str, at: int, quote: str) -> tuple[str, int]:
    at = _skip(text, at)
    if text.startswith(quote, at):  # a key between quote tokens, which vLLM's parser also takes
        key, at = _value(text, at, quote)
        at = _skip(text, at)
        if not text.startswith(":", at):
            raise _Malformed(f"no ':' after key {key!r}")
        return key, at + 1
    match = _KEY.match(text, at)
    if match is None:
        raise _Malformed(f"no key at {at}")
    return match.group(1), match.end()


def _items(text: str, at: int, close: str, quote: str, keyed: bool) -> tuple[Any, int]:
    """An object's pairs (``keyed``) or a list's values, from after its opening bracket to after ``close``."""
    found: Any = {} if keyed else []
    at = _skip(text, at)
    if text.startswith(close, at):
        return found, at + 1
    while True:
        if keyed:
            key, at = _key(text, at, quote)
            found[key], at = _value(text, at, quote)
        else:
            value, at = _value(text, at, quote)
            found.append(value)
        at = _skip(text, at)
        if text.startswith(close, at):
            return found, at + 1
        if not text.startswith(",", at):
            raise _Malformed(f"expected ',' or {close!r} at {at}")
        at += 1


def _call(body: str, quote: str) -> dict[str, Any] | None:
    """``call:NAME{...}`` and nothing else, as one call; None where it does not read so."""
    head = _HEAD.match(body.strip())
    if head is None:
        return None
    try:
        arguments, end = _items(body.strip(), head.end(), "}", quote, keyed=True)
        json.dumps(arguments, allow_nan=False)
    except (_Malformed, ValueError, RecursionError):
        return None
    return make_call(head.group(1), arguments) if not body.strip()[end:].strip() else None


class _Rules:
    """Lark rules of values as Gemma's templates write them, from JSON schemas: objects' keys in sorted order
    (its ``dictsort``), strings between quote tokens (``mark``), a local ``$ref`` a rule of its own."""

    def __init__(self, mark: Callable[[str], str], quote: str, root: dict[str, Any], prefix: str) -> None:
        self.mark, self.quote, self.root, self.prefix, self.rules, self.named = mark, quote, root, prefix, [], {}

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
        quote = self.mark(self.quote)
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
            return f"{self.mark(self.quote)} {json.dumps(value)} {self.mark(self.quote)}"
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


def _any_value(mark: Callable[[str], str], quote_token: str) -> list[str]:
    """Rules of any value in the template's syntax, for what a schema leaves open, and of its numbers."""
    quote = mark(quote_token)
    return [f'any_value: {quote} /[^<]*/ {quote} | NUMBER | "true" | "false" | "null" | any_object | any_list',
            'any_object: "{" (any_pair ("," any_pair)*)? "}"', 'any_pair: /[A-Za-z_][A-Za-z0-9_]*/ ":" any_value',
            'any_list: "[" (any_value ("," any_value)*)? "]"', "INT: /-?(0|[1-9][0-9]*)/",
            r"NUMBER: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/"]


@dataclass(frozen=True)
class GemmaCalls:
    """Calls in Gemma's object syntax under one set of tokens: each ``opening + "call:NAME{...}" + closing``,
    strings between ``quote`` tokens; ``ending`` (where the template writes one after the calls, for the tool's
    answer that follows) ends the reply."""

    opening: str
    closing: str
    quote: str
    ending: str = ""

    def read(self, text: str, schemas: Any = None, cut: bool = False) -> ParsedReply:
        """The calls, a block each (one right after another); the text around them kept. A block that does not
        read as one call (no ``call:``, a bracket or string left open, anything after its arguments), or is not
        closed, leaves the reply text; read as ``cut`` (a forced reply stopped inside a block), the whole blocks
        before it are the calls. After the calls, ``ending`` and what follows it are the tool's turn, not the
        reply's. (``schemas``: the values are typed as written.)"""
        block = re.compile(re.escape(self.opening) + r"(.*?)(?:" + re.escape(self.closing) + r"|$)", re.DOTALL)

        def calls(match: re.Match[str]) -> list[Any] | None:
            if not match.group(0).endswith(self.closing):
                return None
            call = _call(match.group(1), self.quote)
            return None if call is None else [call]

        start = text.find(self.opening)
        end = text.find(self.ending, start) if self.ending and start >= 0 else -1
        if end >= 0:
            reply = tool_call_blocks(text[:end], block, calls, cut, self.opening, self.closing)
            if reply.calls:
                return reply
        return tool_call_blocks(text, block, calls, cut, self.opening, self.closing)

    def grammar(self, tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
        """Calls as the template writes them: a ``call:NAME{...}`` block each, one right after another, the
        arguments under each tool's schema in the template's syntax."""
        rules = []
        for i, function in enumerate(tool["function"] for tool in tools):
            parameters = parameters_of(function)
            values = _Rules(mark, self.quote, parameters, f"tool{i}")
            rules += [f'call{i}: {json.dumps("call:" + function["name"])} {values.value(parameters)}', *values.rules]
        names = " | ".join(f"call{i}" for i in range(len(tools)))
        block = f"block: {mark(self.opening)} ({names}) {mark(self.closing)}"
        return "\n".join([f"start: {'block+' if many else 'block'}", block, *rules, *_any_value(mark, self.quote)])


GEMMA4 = GemmaCalls("<|tool_call>", "<tool_call|>", '<|"|>')
#: FunctionGemma's template writes ``<start_function_response>`` after a turn's calls, where the tool's answer
#: goes: the model ends its calls with it (Google's guide names it a stop sequence).
FUNCTIONGEMMA = GemmaCalls("<start_function_call>", "<end_function_call>", "<escape>", "<start_function_response>")
