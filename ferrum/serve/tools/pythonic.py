"""Calls written as a Python list of calls (``pythonic``: Llama 3.2's and Llama 4's pythonic templates,
``[get_weather(city="Paris"), ...]``): their parser and forced-call grammar."""

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


def pythonic_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """A list of calls as the pythonic templates show them, ``[name(key=value, ...), ...]``, each value as JSON
    (which :func:`read_pythonic` reads, ``true`` and ``null`` too)."""
    bodies = bare_arguments(tools, lambda key, value: f"{json.dumps(f'{key}=')} {value}", quoted=True,
                            separator='", "')
    rules = [f'call{i}: {json.dumps(tool["function"]["name"] + "(")} {body} ")"'
             for i, (tool, body) in enumerate(zip(tools, bodies))]
    names = " | ".join(f"call{i}" for i in range(len(tools)))
    return "\n".join([f'start: "[" {repeated("call", json.dumps(", "), many)} "]"', f"call: {names}", *rules])
