"""MiniMax-M2's calls (``minimax_m2``): ``<invoke>`` blocks of ``<parameter>`` values written bare, typed by the
tool's schema; their parser and forced-call grammar."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from ferrum.serve.tools.bare import bare_call, tool_call_blocks
from ferrum.serve.tools.grammars import bare_arguments
from ferrum.serve.tools.reading import NOT_JSON, ParsedReply, Schemas, admits_null, declared_string

MINIMAX_CALLS, _MINIMAX_CALLS_END = "<minimax:tool_call>", "</minimax:tool_call>"
_BLOCK = re.compile(re.escape(MINIMAX_CALLS) + r"(.*?)(?:" + re.escape(_MINIMAX_CALLS_END) + r"|$)", re.DOTALL)
#: A name as the template writes it, in double quotes (vLLM also takes single ones, or none): group 1.
_NAME = r"""\s*["']?([^"'>]*)["']?\s*"""
_INVOKE = re.compile(r"\s*<invoke name=" + _NAME + r">(.*?)</invoke>\s*", re.DOTALL)
_PARAMETER = re.compile(r"\s*<parameter name=" + _NAME + r">(.*?)</parameter>\s*", re.DOTALL)
_ENUM_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
               type(None): "null"}


def _types(schema: dict[str, Any]) -> set[str]:
    """The JSON types a parameter admits, from its type (or list of them), its enum's values and the branches of
    its anyOf / oneOf / allOf, as vLLM's ``minimax_m2`` parser gathers them."""
    kind, found = schema.get("type"), set()
    for name in kind if isinstance(kind, list) else [kind]:
        if isinstance(name, str):
            found.add(name)
    enum = schema.get("enum")
    found |= {_ENUM_TYPES.get(type(value), "string") for value in (enum if isinstance(enum, list) else ())}
    for key in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(key)
        for branch in branches if isinstance(branches, list) else ():
            found |= _types(branch) if isinstance(branch, dict) else set()
    return found


def _value(text: str, schema: Any) -> Any:
    """An argument's text read by the types its parameter admits, in vLLM's order (integer, number, boolean, then
    an object or array as JSON, then a string as it is), the first that converts; a parameter the tool does not
    declare stays text, as vLLM reads it. Where the schema names no type (a ``$ref``), the value is JSON where it
    parses (as the forced grammar writes it), else text; ``null`` is None unless only strings are admitted."""
    if declared_string(schema):
        return None if text == "null" and admits_null(schema) else text
    if not isinstance(schema, dict):
        return text
    if text.lower() == "null":
        return None
    types = _types(schema)
    for kind, convert in (("integer", int), ("number", _number), ("boolean", _boolean), ("object", json.loads),
                          ("array", json.loads)):
        if kind in types:
            try:
                return convert(text)
            except (ValueError, *NOT_JSON):
                pass
    if "string" in types:
        return text
    try:
        return json.loads(text)
    except NOT_JSON:
        return text


def _number(text: str) -> int | float:
    number = float(text)
    return int(number) if number.is_integer() else number


def _boolean(text: str) -> bool:
    word = text.strip().lower()
    if word in ("true", "1", "yes", "on"):
        return True
    if word in ("false", "0", "no", "off"):
        return False
    raise ValueError(text)


def read_minimax_m2(text: str, schemas: Schemas | None = None, cut: bool = False) -> ParsedReply:
    """MiniMax-M2's calls: each ``<minimax:tool_call>`` block holds one or more ``<invoke name="NAME">`` of
    ``<parameter name="K">V</parameter>`` (a value's surrounding whitespace the layout's); a block with anything
    else, or not closed, is text. Read as ``cut`` (a forced reply stopped inside its block), the block's whole
    invokes before the cut are the calls (see :func:`~ferrum.serve.tools.bare.tool_call_blocks`)."""
    def calls(block: re.Match[str]) -> list[Any] | None:
        closed = block.group(0).endswith(_MINIMAX_CALLS_END)
        if not (closed or cut):
            return None
        body, found, at = block.group(1), [], 0
        while invoke := _INVOKE.match(body, at):
            call = bare_call(invoke.group(1).strip(), invoke.group(2), _PARAMETER,
                             lambda parameter, schema: _value(parameter.group(2).strip(), schema), schemas)
            if call is None:
                return None
            found.append(call)
            at = invoke.end()
        return found if found and (not closed or not body[at:].strip()) else None

    return tool_call_blocks(text, _BLOCK, calls, cut, MINIMAX_CALLS, _MINIMAX_CALLS_END)


def minimax_m2_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Calls as MiniMax-M2's template writes them: one ``<minimax:tool_call>`` block, an ``<invoke>`` per call
    (one or more where several may follow), each parameter on a line of its own."""
    def arg(key: str, value: str) -> str:
        head = json.dumps(f'<parameter name="{key}">')
        return f"{head} {value}"

    bodies = bare_arguments(tools, arg, end="</parameter>\n")
    heads = [json.dumps(f'<invoke name="{tool["function"]["name"]}">\n') for tool in tools]
    rules = [f'call{i}: {head} {body} "</invoke>\\n"' for i, (head, body) in enumerate(zip(heads, bodies))]
    names = " | ".join(f"call{i}" for i in range(len(tools)))
    calls = "invoke+" if many else "invoke"
    return "\n".join([f'start: {mark(MINIMAX_CALLS)} "\\n" {calls} {mark(_MINIMAX_CALLS_END)}',
                      f"invoke: {names}", *rules])
