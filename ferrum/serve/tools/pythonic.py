"""Calls written as Python calls: a list of them (``pythonic``: Llama 3.2's and Llama 4's pythonic templates,
``[get_weather(city="Paris"), ...]``), or one a line inside ``<function_calls>`` (``olmo3``): their parsers and
forced-call grammars."""

from __future__ import annotations

import ast
import json
from typing import Any, Callable

from ferrum.serve.tools.bare import PYTHON_LITERAL
from ferrum.serve.tools.grammars import bare_arguments, repeated
from ferrum.serve.tools.reading import ParsedReply, make_call

#: Llama 4's tokenizer may wrap the list in these (vLLM's ``llama4_pythonic`` parser takes them off).
_PYTHON_START, _PYTHON_END = "<|python_start|>", "<|python_end|>"
#: JSON's spellings, which a model (or the forced grammar, which writes values as JSON) may use for Python's.
_JSON_NAMES = {"true": True, "false": False, "null": None}


class _JsonNames(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:  # noqa: N802 (ast's visitor naming)
        return ast.Constant(_JSON_NAMES[node.id]) if node.id in _JSON_NAMES else node


def _call(node: ast.expr) -> dict[str, Any] | None:
    """One call of the list: a function named by a plain name, keyword arguments of literals only."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    if any(keyword.arg is None for keyword in node.keywords):  # **kwargs
        return None
    try:
        arguments = {keyword.arg: ast.literal_eval(_JsonNames().visit(keyword.value)) for keyword in node.keywords}
        json.dumps(arguments, allow_nan=False)
    except (*PYTHON_LITERAL, OverflowError):
        return None
    return make_call(node.func.id, arguments)


def _list_of_calls(body: str) -> list[dict[str, Any]] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except PYTHON_LITERAL:
        return None
    calls = [_call(node) for node in tree.elts] if isinstance(tree, ast.List) else []
    return None if not calls or None in calls else calls


def read_pythonic(text: str, schemas: Any = None, cut: bool = False) -> ParsedReply:
    """The whole reply is one Python list of calls (``[f(a=1), g(b="x")]``), maybe between Llama 4's
    ``<|python_start|>`` and ``<|python_end|>``; values are Python literals (or JSON's ``true``, ``false``,
    ``null``). Anything else, or a list that is not all such calls, is text (as vLLM's ``pythonic`` parser reads
    it). Read as ``cut`` (a forced reply stopped inside the list), the whole calls before the cut are the calls.
    (``schemas``: the values are typed as written.)"""
    body = text.strip().removeprefix(_PYTHON_START).removesuffix(_PYTHON_END).strip()
    if not body.startswith("["):
        return ParsedReply(text, [])
    calls = _list_of_calls(body) if body.endswith("]") else None
    end = len(body)
    while cut and calls is None and (end := body.rfind(")", 0, end)) > 0:  # the last call whole, the list closed
        calls = _list_of_calls(body[:end + 1] + "]")
    return ParsedReply(text, []) if calls is None else ParsedReply("", calls)


def _lines_of_calls(lines: list[str]) -> list[dict[str, Any]] | None:
    return _list_of_calls("[" + ", ".join(lines) + "]") if lines else None


OLMO3_CALLS, _OLMO3_END = "<function_calls>", "</function_calls>"


def read_olmo3(text: str, schemas: Any = None, cut: bool = False) -> ParsedReply:
    """OLMo 3's calls: inside ``<function_calls>...</function_calls>``, one Python call a line (``f(a='x')``; JSON's
    ``true`` / ``null`` too), as vLLM's ``olmo3`` parser reads them; the text around the block kept. A block that is
    not all such calls (or not closed, but at the end) leaves the reply text. Read as ``cut`` (a forced reply
    stopped inside the block), the whole lines before the cut are the calls. (``schemas``: values typed as
    written.)"""
    start = text.find(OLMO3_CALLS)
    if start < 0:
        return ParsedReply(text, [])
    inside = text[start + len(OLMO3_CALLS):]
    end = inside.find(_OLMO3_END)
    after = "" if end < 0 else inside[end + len(_OLMO3_END):]
    lines = [line.strip() for line in (inside if end < 0 else inside[:end]).splitlines() if line.strip()]
    calls = _lines_of_calls(lines)
    while cut and calls is None and lines:  # the last line cut short
        lines.pop()
        calls = _lines_of_calls(lines)
    return ParsedReply(text, []) if calls is None else ParsedReply(text[:start], calls, after)


def _call_rules(tools: list[dict[str, Any]]) -> list[str]:
    """Lark rules ``call: call0 | call1 ...`` and per tool ``name(key=value, ...)``, each value as JSON (which the
    readers take, ``true`` and ``null`` too), optional arguments separated as written."""
    bodies = bare_arguments(tools, lambda key, value: f"{json.dumps(f'{key}=')} {value}", quoted=True,
                            separator='", "')
    rules = [f'call{i}: {json.dumps(tool["function"]["name"] + "(")} {body} ")"'
             for i, (tool, body) in enumerate(zip(tools, bodies))]
    return [f"call: {' | '.join(f'call{i}' for i in range(len(tools)))}", *rules]


def pythonic_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """A list of calls as the pythonic templates show them, ``[name(key=value, ...), ...]``."""
    return "\n".join([f'start: "[" {repeated("call", json.dumps(", "), many)} "]"', *_call_rules(tools)])


def olmo3_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Calls a line each between ``<function_calls>`` and ``</function_calls>``, laid out as OLMo 3's template
    writes them."""
    calls = repeated("call", r'"\n"', many)
    return "\n".join([f'start: {mark(OLMO3_CALLS)} "\\n" {calls} "\\n" {mark(_OLMO3_END)}', *_call_rules(tools)])
