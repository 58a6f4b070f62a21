"""The formats that write each argument bare, typed by the tool's schema (``glm45``, ``qwen3_coder``, ``seed_oss``):
their parsers and forced-call grammars, and the reading of tagged blocks the other XML-like formats share."""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Callable

from ferrum.serve.tools.grammars import bare_arguments, repeated
from ferrum.serve.tools.reading import (NOT_JSON, ParsedReply, Schemas, admits_null, declared_string, make_call,
                                        tool_properties)


_GLM_CALL = re.compile(r"<tool_call>([^\n<]*)(.*?)(?:</tool_call>|$)", re.DOTALL)
_GLM_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.DOTALL)


#: What ``ast.literal_eval`` raises on text that is no Python literal (or one too large or deep to read).
PYTHON_LITERAL = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)


def _glm_value(text: str, schema: Any) -> Any:
    """An argument's text: JSON where it parses (numbers, objects, ``true``), else a Python literal where the tool
    declares the parameter and it parses as one (``['x', 'y']``, as vLLM's glm45 parser falls back), else the text
    itself, which is also what a parameter the tool declares a string keeps ("42" stays "42"; ``null`` is None
    where it may be null, as a string-or-null parameter's is)."""
    if declared_string(schema):
        return None if text == "null" and admits_null(schema) else text
    try:
        return json.loads(text)
    except NOT_JSON:
        pass
    if not isinstance(schema, dict):
        return text
    try:
        return ast.literal_eval(text)
    except PYTHON_LITERAL:
        return text


def tool_call_blocks(text: str, block: re.Pattern[str], read: Callable[[re.Match[str]], Any],
                      cut: bool, opening: str = "<tool_call>", closing: str = "</tool_call>") -> ParsedReply:
    """The calls of a reply whose blocks (``block`` matches one, from ``opening`` to ``closing``, ``<tool_call>``'s
    by default) name their functions and write their arguments bare: ``read(match)`` gives a block's calls, or
    None where the block does not read as calls, which makes the whole reply text. Read as ``cut`` (a forced reply
    stopped inside a call, by max_tokens or a stop), an unclosed last block is left out and the calls before it
    stand, as a JSON format's calls so far do. Text before the first block is the content; text between and after
    blocks stays too."""
    start = text.find(opening)
    if start < 0:
        return ParsedReply(text, [])
    calls, rest, end = [], [], start
    for match in block.finditer(text, start):
        found = read(match)
        if found is None:
            unclosed = not match.group(0).endswith(closing)
            return ParsedReply(text[:start], calls, "".join(rest)) if cut and unclosed and calls else (
                ParsedReply(text, []))
        rest.append(text[end:match.start()])
        calls.extend(found)
        end = match.end()
    return ParsedReply(text[:start], calls, "".join(rest) + text[end:])


def bare_call(name: str, body: str, argument: re.Pattern[str], read: Callable[[re.Match[str], Any], Any],
               schemas: Schemas | None) -> Any:
    """The call to ``name`` whose ``body`` is nothing but ``argument`` blocks (group 1 the key), each value read
    by ``read(match, its parameter's schema)``; None where anything else is in the body. A value JSON cannot
    hold (NaN, Infinity: ``NaN`` or ``1e400`` written for a number) stays the text written, as a string's would:
    the arguments must be JSON text clients can parse."""
    properties, arguments, at = tool_properties(schemas or {}, name), {}, 0
    while pair := argument.match(body, at):
        key = pair.group(1).strip()
        value = read(pair, properties.get(key))
        arguments[key] = value if _json_holds(value) else read(pair, _STRING)
        at = pair.end()
    return make_call(name, arguments) if body[at:].strip() == "" else None


_STRING = {"type": "string"}


def _json_holds(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def read_glm(text: str, schemas: Schemas | None = None, cut: bool = False) -> ParsedReply:
    """GLM-4.5's calls: each ``<tool_call>`` holds its function's name (up to a newline or the first argument) and
    nothing but ``<arg_key>``/``<arg_value>`` pairs; a block with anything else, or cut inside a pair, is text
    (see :func:`tool_call_blocks` on ``cut``)."""
    def calls(match: re.Match[str]) -> list[Any] | None:
        call = bare_call(match.group(1).strip(), match.group(2), _GLM_ARG,
                          lambda pair, schema: _glm_value(pair.group(2).strip(), schema), schemas)
        return None if call is None else [call]

    return tool_call_blocks(text, _GLM_CALL, calls, cut)


_QWEN_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
#: A function in a block: its ``</function>`` may be left out where another function or the block's end follows.
_QWEN_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)(?:</function>\s*|(?=<function=)|\Z)", re.DOTALL)
#: A parameter's value ends at its ``</parameter>``, or, where the model left that out, where the next parameter or
#: the function's end begins (as vLLM's parser reads it).
_QWEN_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)\s*", re.DOTALL)
#: A ``<function=...>`` block a reply writes without the ``<tool_call>`` around it.
_QWEN_BARE_FUNCTION = re.compile(r"<function=.*?(?:</function>|$)", re.DOTALL)


def _qwen3_coder_value(text: str, schema: Any) -> Any:
    """An argument's text read by the type its parameter declares, as vLLM's ``qwen3_coder`` parser reads it:
    ``null`` is None; text where the schema has no such parameter, or it does not convert. Where vLLM reads a
    parameter without a ``type`` as text, this reads it as JSON unless it admits only strings (an enum's
    values; a ``$ref`` object), as the forced grammar writes it."""
    if text.lower() == "null":
        return None
    if not isinstance(schema, dict) or declared_string(schema):
        return text
    kind = str(schema.get("type", "")).strip().lower()
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        try:
            return int(text)
        except ValueError:
            return text
    if kind.startswith(("num", "float")):
        try:
            number = float(text)
        except ValueError:
            return text
        return int(number) if number.is_integer() else number
    if kind in ("boolean", "bool", "binary"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except NOT_JSON:
        pass
    try:
        return ast.literal_eval(text)
    except PYTHON_LITERAL:
        return text


def _function_blocks(opening: str, closing: str) -> Callable[..., ParsedReply]:
    """The reader of calls written as Qwen3-Coder's are, each block between ``opening`` and ``closing``."""
    block = re.compile(re.escape(opening) + r"(.*?)(?:" + re.escape(closing) + r"|$)", re.DOTALL)

    def parse(text: str, schemas: Schemas | None = None, cut: bool = False) -> ParsedReply:
        def calls(body: str, closed: bool) -> list[Any] | None:
            found, at = [], 0
            while function := _QWEN_FUNCTION.match(body, at):
                call = bare_call(function.group(1).strip(), function.group(2), _QWEN_PARAMETER,
                                 lambda parameter, schema: _qwen3_coder_value(
                                     parameter.group(2).removeprefix("\n").removesuffix("\n"), schema), schemas)
                if call is None or not (closed or function.group(0).rstrip().endswith("</function>")):
                    return None
                found.append(call)
                at = function.end()
            return found if found and not body[at:].strip() else None

        if opening not in text:
            return tool_call_blocks(text, _QWEN_BARE_FUNCTION, lambda match: calls(match.group(0), False), cut,
                                    "<function=", "</function>")
        return tool_call_blocks(text, block, lambda match: calls(match.group(1), match.group(0).endswith(closing)),
                                cut, opening, closing)

    return parse


#: Qwen3-Coder's calls: each ``<tool_call>`` holds a ``<function=NAME>`` of ``<parameter=K>`` blocks, a value's
#: first and last newline the template's; a block with anything else, or cut before its end, is text (see
#: :func:`tool_call_blocks` on ``cut``). As vLLM's parser reads them: a reply with no ``<tool_call>`` has its
#: ``<function=...>`` blocks read as calls; a block may hold several functions, and a closed one need not close its
#: last ``</function>``; a ``</parameter>`` left out ends where the next parameter or ``</function>`` begins.
read_qwen3_coder = _function_blocks("<tool_call>", "</tool_call>")
#: Seed-OSS's calls: Qwen3-Coder's inside ``<seed:tool_call>`` (vLLM's ``seed_oss`` parser is its ``qwen3_coder``
#: one with these tags); its template writes a value that is no string as Python writes it, which reads as one.
read_seed_oss = _function_blocks("<seed:tool_call>", "</seed:tool_call>")


def glm_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Blocks as GLM's template writes them, a newline apart: GLM-4.5's name and each ``<arg_key>`` and
    ``<arg_value>`` on a line of their own, GLM-4.7's (``</arg_key><arg_value>`` in its template) all on one."""
    line = "" if "</arg_key><arg_value>" in template else r'"\n"'

    def arg(key: str, value: str) -> str:
        return (f'{mark("<arg_key>")} {json.dumps(key)} {mark("</arg_key>")} {line} {mark("<arg_value>")} {value} '
                f'{mark("</arg_value>")} {line}')

    names = [json.dumps(tool["function"]["name"]) for tool in tools]
    rules = [f"call{i}: {name} {line} {body}" for i, (name, body) in enumerate(zip(names, bare_arguments(tools, arg)))]
    calls = " | ".join(f"call{i}" for i in range(len(tools)))
    blocks = repeated("block", r'"\n"', many)
    return "\n".join([f"start: {blocks}", f'block: {mark("<tool_call>")} ({calls}) {mark("</tool_call>")}', *rules])


def _function_grammar(opening: str, closing: str, lines: bool) -> Callable[..., str]:
    """Blocks between ``opening`` and ``closing`` a newline apart (and, where several may follow, maybe one after the
    last, as with Hermes's): ``<function=NAME>``, then each argument's ``<parameter=K>`` block, its value on lines
    of its own where ``lines``, then ``</function>``."""
    def grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
        def arg(key: str, value: str) -> str:
            head = json.dumps(f"<parameter={key}>" + ("\n" if lines else ""))
            return f"{head} {value}"

        bodies = bare_arguments(tools, arg, end=("\n" if lines else "") + "</parameter>\n")
        heads = [json.dumps(tool["function"]["name"] + ">\n") for tool in tools]
        rules = [f"call{i}: {head} {body}" for i, (head, body) in enumerate(zip(heads, bodies))]
        names = " | ".join(f"call{i}" for i in range(len(tools)))
        blocks = repeated("block", r'"\n"', many) + (r' "\n"?' if many else "")
        block = f'block: {mark(opening)} "\\n<function=" ({names}) "</function>\\n" {mark(closing)}'
        return "\n".join([f"start: {blocks}", block, *rules])

    return grammar


#: Blocks as Qwen3-Coder's template writes them, each value on lines of its own.
qwen3_coder_grammar = _function_grammar("<tool_call>", "</tool_call>", lines=True)
#: Blocks as Seed-OSS's template writes them, each value right inside its ``<parameter=K>`` tags.
seed_oss_grammar = _function_grammar("<seed:tool_call>", "</seed:tool_call>", lines=False)
