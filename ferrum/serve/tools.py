"""Tool calls: how a model's chat template asks for them, and the calls parsed back out of its text.

A chat template that describes tools to the model also fixes how the model writes a call; the format is
recognised from the template itself, as vLLM's ``--tool-call-parser`` choices are named after them:

* ``hermes`` (Qwen 2.5 / 3, Hermes, and most templates with ``<tool_call>``): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
* ``mistral`` (templates with ``[TOOL_CALLS]``): ``[TOOL_CALLS]`` then a JSON list of such objects, or, from
  the v11 tokenizers on (Mistral Small 3.1+, Devstral, Magistral), ``[TOOL_CALLS]name[ARGS]{...}`` per call;
* ``granite`` (IBM Granite 3, templates with ``<|tool_call|>``): the same list after ``<|tool_call|>``;
* ``llama3_json`` (Llama 3.1-3.3, whose templates carry ``<|python_tag|>``): the whole reply is one JSON object
  ``{"name": ..., "parameters": {...}}``;
* ``harmony`` (gpt-oss, templates with ``<|call|>``): a message to ``functions.NAME`` whose text is the
  arguments (read by :mod:`ferrum.serve.harmony`, which hands the calls on in one canonical form);
* ``glm45`` (GLM-4.5 / 4.6 / 4.7, templates with ``<arg_key>``): ``<tool_call>NAME`` then per argument
  ``<arg_key>K</arg_key><arg_value>V</arg_value>``, then ``</tool_call>``: a value is read as JSON where it parses
  and the tool does not declare it a string, else kept as text (vLLM's ``glm45`` parser);
* ``qwen3_coder`` (Qwen3-Coder, Qwen3.5; templates with ``<parameter=``): ``<tool_call>\\n<function=NAME>``, then
  per argument ``<parameter=K>\\nV\\n</parameter>``, then ``</function>\\n</tool_call>``: values read by the type
  the tool's schema gives them (vLLM's ``qwen3_coder`` parser);
* ``deepseek_v3`` (DeepSeek-V3 and R1, templates with ``<｜tool▁calls▁begin｜>``): inside
  ``<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>``, per call
  ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>``.

Markers such as ``[TOOL_CALLS]`` are special tokens, which decoding leaves out by default, so a request with
tools decodes its reply with special tokens kept (unless it sets ``skip_special_tokens``).
Text that does not parse as calls stays the reply's content: nothing is dropped. A stream holds back only
what may turn out to be a call (from its opening marker on) and sends the calls when the choice ends.
A forced call (``tool_choice`` required or named) is sampled under a grammar of calls in the format: one or
more for "required" (unless ``parallel_tool_calls`` is false), one for a named function
(``forced_call_grammar``, :mod:`ferrum.structured`).
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from ferrum.serve import harmony
from ferrum.serve.errors import APIError
from ferrum.stop import cut_marker
from ferrum.structured import DATA_KEYWORDS

#: What reading text that is not (or too deeply nested) JSON raises.
_NOT_JSON = (json.JSONDecodeError, RecursionError)


@dataclass(frozen=True)
class ParsedReply:
    """A reply split into the text around the calls and the calls (OpenAI's ``tool_calls`` entries)."""

    before: str  # the text before the first call (all of it when there is none)
    calls: list[dict[str, Any]]
    after: str = ""  # text between and after the calls

    @property
    def content(self) -> str | None:
        """The message's content: the text as it is without calls; the text around them, or null, with calls."""
        if not self.calls:
            return self.before
        return (self.before + self.after).strip() or None


def _call(name: Any, arguments: Any) -> dict[str, Any] | None:
    """One OpenAI tool call, or None where the model's object is not a call (no name, odd arguments)."""
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except _NOT_JSON:
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


def _object_call(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except _NOT_JSON:
        return None
    return _call(value.get("name"), value.get("arguments")) if isinstance(value, dict) else None


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _hermes(text: str) -> ParsedReply:
    start = text.find("<tool_call>")
    if start < 0:
        return ParsedReply(text, [])
    calls, rest, end = [], [], start
    for match in _HERMES_CALL.finditer(text, start):
        rest.append(text[end:match.start()])
        call = _object_call(match.group(1))
        if call is None:
            return ParsedReply(text, [])
        calls.append(call)
        end = match.end()
    return ParsedReply(text[:start], calls, "".join(rest) + text[end:])


def _json_list_after(token: str) -> Callable[[str], ParsedReply]:
    """Calls written as ``token`` then a JSON list of ``{"name", "arguments"}`` objects (Mistral, Granite). The
    token is a special one, which decoding may drop: a reply opening with such a list is a call too."""

    def parse(text: str) -> ParsedReply:
        marker = text.find(token)
        body = (text[marker + len(token):] if marker >= 0 else text).lstrip()
        if marker < 0 and not body.startswith("[{"):
            return ParsedReply(text, [])
        try:
            value, end = json.JSONDecoder().raw_decode(body)
        except _NOT_JSON:
            return ParsedReply(text, [])
        items = value if isinstance(value, list) else [value]
        calls = [_call(i.get("name"), i.get("arguments")) if isinstance(i, dict) else None for i in items]
        if not calls or None in calls:
            return ParsedReply(text, [])
        return ParsedReply(text[:max(marker, 0)], calls, body[end:])

    return parse


_TOOL_CALLS = "[TOOL_CALLS]"
_mistral_list = _json_list_after(_TOOL_CALLS)
#: What follows ``[TOOL_CALLS]`` in a v11 call, up to its arguments: the name, maybe ``[CALL_ID]id``, ``[ARGS]``.
_MISTRAL_CALL_HEAD = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*(?:\[CALL_ID\]\s*\w*\s*)?(?:\[ARGS\])?\s*")


def _mistral(text: str) -> ParsedReply:
    """Mistral's calls: a JSON list after ``[TOOL_CALLS]`` (tokenizers before v11), else, from v11 on, each
    call opened by its own ``[TOOL_CALLS]``, then its name, ``[ARGS]`` and its arguments' JSON object."""
    start = text.find(_TOOL_CALLS)
    if start < 0 or text[start + len(_TOOL_CALLS):].lstrip().startswith("["):
        return _mistral_list(text)
    decoder, calls, rest, at = json.JSONDecoder(), [], [], start
    while at >= 0:
        head = _MISTRAL_CALL_HEAD.match(text, at + len(_TOOL_CALLS))
        if head is None:
            return ParsedReply(text, [])
        try:
            arguments, end = decoder.raw_decode(text, head.end())
        except _NOT_JSON:
            return ParsedReply(text, [])
        call = _call(head.group(1), arguments)
        if call is None:
            return ParsedReply(text, [])
        calls.append(call)
        at = text.find(_TOOL_CALLS, end)
        rest.append(text[end:] if at < 0 else text[end:at])
    return ParsedReply(text[:start], calls, "".join(rest))


def _llama3_json(text: str) -> ParsedReply:
    """The whole reply is calls: JSON objects, one after another (Llama 3.1 separates several with ``;``)."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            value, at = decoder.raw_decode(body, at)
        except _NOT_JSON:
            return ParsedReply(text, [])
        if not isinstance(value, dict):
            return ParsedReply(text, [])
        call = _call(value.get("name"), value.get("parameters", value.get("arguments")))
        if call is None:
            return ParsedReply(text, [])
        calls.append(call)
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    return ParsedReply("", calls) if calls else ParsedReply(text, [])


#: The tools' parameter schemas, by function name: how the formats that write arguments bare read their values.
Schemas = dict[str, dict[str, Any]]


def _properties(schemas: Schemas, name: str) -> dict[str, Any]:
    properties = (schemas.get(name) or {}).get("properties")
    return properties if isinstance(properties, dict) else {}


def _declared_string(schema: Any) -> bool:
    """Whether a parameter's schema admits only strings (its type, or an enum or const of strings only): the
    formats that write arguments bare write those as they are, anything else as JSON."""
    if not isinstance(schema, dict):
        return False
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(values, list) and values:
        return all(isinstance(value, str) for value in values)
    return schema.get("type") == "string"


_GLM_CALL = re.compile(r"<tool_call>([^\n<]*)(.*?)(?:</tool_call>|$)", re.DOTALL)
_GLM_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.DOTALL)


#: What ``ast.literal_eval`` raises on text that is no Python literal (or one too large or deep to read).
_PYTHON_LITERAL = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)


def _glm_value(text: str, schema: Any) -> Any:
    """An argument's text: JSON where it parses (numbers, objects, ``true``), else a Python literal where the tool
    declares the parameter and it parses as one (``['x', 'y']``, as vLLM's glm45 parser falls back), else the text
    itself, which is also what a parameter the tool declares a string keeps ("42" stays "42")."""
    if _declared_string(schema):
        return text
    try:
        return json.loads(text)
    except _NOT_JSON:
        pass
    if not isinstance(schema, dict):
        return text
    try:
        return ast.literal_eval(text)
    except _PYTHON_LITERAL:
        return text


def _tool_call_blocks(text: str, block: re.Pattern[str], read: Callable[[re.Match[str]], Any],
                      cut: bool) -> ParsedReply:
    """The calls of a reply whose ``<tool_call>`` blocks (``block`` matches one) name their function and write their
    arguments bare: ``read(match)`` gives a block's call, or None where the block does not read as one, which makes
    the whole reply text. Read as ``cut`` (a forced reply stopped inside a call, by max_tokens or a stop), an
    unclosed last block is left out and the calls before it stand, as a JSON format's calls so far do. Text before
    the first block is the content; text between and after blocks stays too."""
    start = text.find("<tool_call>")
    if start < 0:
        return ParsedReply(text, [])
    calls, rest, end = [], [], start
    for match in block.finditer(text, start):
        call = read(match)
        if call is None:
            unclosed = not match.group(0).endswith("</tool_call>")
            return ParsedReply(text[:start], calls, "".join(rest)) if cut and unclosed and calls else (
                ParsedReply(text, []))
        rest.append(text[end:match.start()])
        calls.append(call)
        end = match.end()
    return ParsedReply(text[:start], calls, "".join(rest) + text[end:])


def _bare_call(name: str, body: str, argument: re.Pattern[str], read: Callable[[re.Match[str], Any], Any],
               schemas: Schemas | None) -> Any:
    """The call to ``name`` whose ``body`` is nothing but ``argument`` blocks (group 1 the key), each value read
    by ``read(match, its parameter's schema)``; None where anything else is in the body. A value JSON cannot
    hold (NaN, Infinity: ``NaN`` or ``1e400`` written for a number) stays the text written, as a string's would:
    the arguments must be JSON text clients can parse."""
    properties, arguments, at = _properties(schemas or {}, name), {}, 0
    while pair := argument.match(body, at):
        key = pair.group(1).strip()
        value = read(pair, properties.get(key))
        arguments[key] = value if _json_holds(value) else read(pair, _STRING)
        at = pair.end()
    return _call(name, arguments) if body[at:].strip() == "" else None


_STRING = {"type": "string"}


def _json_holds(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def _glm(text: str, schemas: Schemas | None = None, cut: bool = False) -> ParsedReply:
    """GLM-4.5's calls: each ``<tool_call>`` holds its function's name (up to a newline or the first argument) and
    nothing but ``<arg_key>``/``<arg_value>`` pairs; a block with anything else, or cut inside a pair, is text
    (see :func:`_tool_call_blocks` on ``cut``)."""
    return _tool_call_blocks(text, _GLM_CALL, lambda match: _bare_call(
        match.group(1).strip(), match.group(2), _GLM_ARG,
        lambda pair, schema: _glm_value(pair.group(2).strip(), schema), schemas), cut)


_QWEN_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_QWEN_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.DOTALL)
_QWEN_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>\s*", re.DOTALL)


def _qwen3_coder_value(text: str, schema: Any) -> Any:
    """An argument's text read by the type its parameter declares, as vLLM's ``qwen3_coder`` parser reads it:
    ``null`` is None; text where the schema has no such parameter, or it does not convert. Where vLLM reads a
    parameter without a ``type`` as text, this reads it as JSON unless it admits only strings (an enum's
    values; a ``$ref`` object), as the forced grammar writes it."""
    if text.lower() == "null":
        return None
    if not isinstance(schema, dict) or _declared_string(schema):
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
    except _NOT_JSON:
        pass
    try:
        return ast.literal_eval(text)
    except _PYTHON_LITERAL:
        return text


def _qwen3_coder(text: str, schemas: Schemas | None = None, cut: bool = False) -> ParsedReply:
    """Qwen3-Coder's calls: each ``<tool_call>`` holds one ``<function=NAME>`` of ``<parameter=K>`` blocks, a
    value's first and last newline the template's; a block with anything else, or cut before
    ``</function>``, is text (see :func:`_tool_call_blocks` on ``cut``)."""
    def call(match: re.Match[str]) -> Any:
        function = _QWEN_FUNCTION.fullmatch(match.group(1))
        return None if function is None else _bare_call(
            function.group(1).strip(), function.group(2), _QWEN_PARAMETER,
            lambda parameter, schema: _qwen3_coder_value(
                parameter.group(2).removeprefix("\n").removesuffix("\n"), schema), schemas)

    return _tool_call_blocks(text, _QWEN_CALL, call, cut)


_DS_CALLS, _DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_DS_CALL, _DS_SEP, _DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
#: A call up to its arguments' JSON: its type (``function``), the name, a fenced block's opening.
_DEEPSEEK_CALL = re.compile(r"\s*" + re.escape(_DS_CALL) + r"[^<\n]*" + re.escape(_DS_SEP) + r"([^\n]+)\n```json\n")
_DEEPSEEK_CALL_TAIL = re.compile(r"\s*```\s*" + re.escape(_DS_CALL_END))
_DEEPSEEK_CALLS_END = re.compile(r"\s*" + re.escape(_DS_CALLS_END))


def _deepseek_v3(text: str) -> ParsedReply:
    """DeepSeek-V3's and R1's calls: after ``<｜tool▁calls▁begin｜>``, each call's type, name and its arguments as
    a fenced JSON block between ``<｜tool▁call▁begin｜>`` and ``<｜tool▁call▁end｜>``, in one such block of calls
    or several (the text between them kept); a call that does not read so (cut, or its arguments not a JSON
    object) leaves the whole reply text."""
    start = text.find(_DS_CALLS)
    if start < 0:
        return ParsedReply(text, [])
    decoder, calls, rest, at = json.JSONDecoder(), [], [], start
    while at >= 0:  # at: where a block of calls begins
        at += len(_DS_CALLS)
        while head := _DEEPSEEK_CALL.match(text, at):
            try:
                arguments, after = decoder.raw_decode(text, head.end())
                tail = _DEEPSEEK_CALL_TAIL.match(text, after)
            except _NOT_JSON:
                tail = None
            call = None if tail is None else _call(head.group(1).strip(), arguments)
            if call is None:
                return ParsedReply(text, [])
            calls.append(call)
            at = tail.end()
        if not calls:
            return ParsedReply(text, [])
        end = _DEEPSEEK_CALLS_END.match(text, at)
        at = end.end() if end else at
        following = text.find(_DS_CALLS, at)
        rest.append(text[at:following] if following >= 0 else text[at:])
        at = following
    return ParsedReply(text[:start], calls, "".join(rest))


# ------------------------------------------------------------- forced calls
#: How a call's JSON is held: the separators of ``json.dumps`` and Jinja's ``tojson``, which wrote the calls
#: in the model's training, and no free whitespace to spend tokens on.
_CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: The arguments of a function declared without ``parameters`` (or with null or ``{}``): none, as OpenAI reads it.
#: A bare ``{"type": "object"}`` would let a forced call invent any keys, nested without end.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or _NO_PARAMETERS


def _call_schema(tools: list[dict[str, Any]], args: str = "arguments") -> dict[str, Any]:
    """One call to one of ``tools``: ``{"name": <its name>, <args>: <its parameters>}``. Each tool's parameters
    move whole under ``#/$defs/tool<i>``, their refs (``#``, ``#/$defs/...``, ``#/properties/...``: relative to
    their own root) rewritten to point there, so they resolve inside the call's schema as they did alone."""
    calls, defs = [], {}
    for i, function in enumerate(tool["function"] for tool in tools):
        name = f"tool{i}"
        defs[name] = _rerooted(_parameters(function), f"#/$defs/{name}")
        calls.append({"type": "object", "required": ["name", args], "additionalProperties": False,
                      "properties": {"name": {"const": function["name"]}, args: {"$ref": f"#/$defs/{name}"}}})
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**schema, "$defs": defs}


def _rerooted(schema: Any, root: str) -> Any:
    """``schema`` with each of its document-relative refs (``#``, ``#/...``) made relative to ``root``."""
    if isinstance(schema, list):
        return [_rerooted(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema

    def value(key: str, item: Any) -> Any:
        if key == "$ref" and isinstance(item, str) and (item == "#" or item.startswith("#/")):
            return root + item[1:]
        return item if key in DATA_KEYWORDS else _rerooted(item, root)

    return {key: value(key, item) for key, item in schema.items()}


def _json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _CALL_JSON})


def _repeated(one: str, separator: str, many: bool) -> str:
    """A Lark body of one ``one``, or (``many``) one or more separated by ``separator`` (a Lark string)."""
    return f"{one} ({separator} {one})*" if many else one


def _hermes_call(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Blocks a line apart, as the template writes them. Where several may follow, a newline may also end the
    last: models trained on those blocks write one before ending their turn, and were it only the way into another
    call, a required reply repeated its call until max_tokens. (A single block ends the reply where it closes.)"""
    block = f'block: {mark("<tool_call>")} "\\n" call "\\n" {mark("</tool_call>")}'
    blocks = _repeated("block", r'"\n"', many) + (' "\\n"?' if many else "")
    return f"start: {blocks}\n{block}\ncall: {_json(_call_schema(tools))}"


def _list_call(marker: str) -> Callable[[list[dict[str, Any]], Callable[[str], str], str, bool], str]:
    def grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
        call = _call_schema(tools)
        defs = call.pop("$defs", None)  # at the root, where the refs resolve
        calls = {"type": "array", "items": call, "minItems": 1, **({} if many else {"maxItems": 1}),
                 **({"$defs": defs} if defs else {})}
        return f"start: {mark(marker)} calls\ncalls: {_json(calls)}"

    return grammar


_granite_call = _list_call("<|tool_call|>")


def _mistral_call(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """The v11 form (``name[ARGS]{...}``, each call opened by ``[TOOL_CALLS]``) where the template writes it, else
    the list after ``[TOOL_CALLS]``."""
    if "[ARGS]" not in template:
        return _list_call(_TOOL_CALLS)(tools, mark, template, many)
    names, rules = _per_function(tools, lambda name: f'{json.dumps(name)} {mark("[ARGS]")}')
    return f"start: {'opened+' if many else 'opened'}\nopened: {mark(_TOOL_CALLS)} ({names})\n{rules}"


def _per_function(tools: list[dict[str, Any]], head: Callable[[str], str]) -> tuple[str, str]:
    """Lark rules for calls that name their function ahead of its arguments: ``call0 | call1 | ...``, and per
    tool ``head(name)`` (a Lark body) then its parameters' JSON."""
    names = " | ".join(f"call{i}" for i in range(len(tools)))
    rules = "\n".join(f'call{i}: {head(t["function"]["name"])} '
                      f'{_json(_parameters(t["function"]))}' for i, t in enumerate(tools))
    return names, rules


def _calls_so_far(heads: tuple[re.Pattern[str], ...], text: str) -> ParsedReply:
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
            except _NOT_JSON:
                arguments, at = text[match.end():], len(text)
        calls.append(_entry(name, arguments))
    return ParsedReply("", calls) if calls else ParsedReply(text, [])


#: A call as JSON names its function first (the forced grammar's order), then its arguments (group ``args``: the
#: key, where the reply got that far).
_JSON_HEAD = re.compile(r'\{\s*"name"\s*:\s*(?P<name>"(?:[^"\\]|\\.)*")'
                        r'(?P<args>\s*,\s*"(?:arguments|parameters)"\s*:\s*)?')
_MISTRAL_HEAD = re.compile(re.escape(_TOOL_CALLS) + r"\s*(?P<name>[A-Za-z_][\w.\-]*)\s*"
                           r"(?:\[CALL_ID\]\s*\w*\s*)?\[ARGS\]\s*")
_DEEPSEEK_HEAD = re.compile(re.escape(_DS_CALL) + r"[^<\n]*" + re.escape(_DS_SEP) + r"(?P<name>[^\n]+)"
                            r"(?P<args>\n```json\n)?")
_HARMONY_HEAD = re.compile(re.escape(harmony.CALL_OPEN) + r"(?P<name>[^<\s]+)"
                           + re.escape(f"{harmony.CHANNEL}commentary json{harmony.MESSAGE}"))


def _harmony(text: str) -> ParsedReply:
    visible, calls = harmony.parse_calls(text)
    parsed = [_call(name, arguments) for name, arguments in calls]
    if not calls or None in parsed:  # text that only looks like a call stays content
        return ParsedReply(text, [])
    return ParsedReply(visible, parsed)


def _harmony_call(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """A message to one of the functions, headed as gpt-oss's template heads the calls it writes back
    (one call: generation stops at ``<|call|>``)."""
    names, rules = _per_function(tools, lambda name: f'{mark(harmony.CHANNEL)} '
                                                    f'{json.dumps(f"commentary to=functions.{name} json")} '
                                                    f'{mark(harmony.MESSAGE)}')
    return f"start: {names}\n{rules}"


def _bare_string(schema: dict[str, Any], end: str) -> str:
    """A Lark body of a string argument written bare (no quotes), then ``end``, as the XML-like formats write
    them: one of its enum's values, else text up to the next tag (so without ``<``), at most its ``maxLength``
    characters. ``end`` joins the text's regex: a separate lexeme would fight it over the text's last newline."""
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(values, list) and values:
        return f'({" | ".join(json.dumps(value) for value in values)})' + (f" {json.dumps(end)}" if end else "")
    most = schema.get("maxLength")
    text = f"[^<]{{0,{most}}}" if isinstance(most, int) else "[^<]*"
    return "/" + text + end.replace("\n", "\\n").replace("/", "\\/") + "/"


def _bare_arguments(tools: list[dict[str, Any]], arg: Callable[[str, str], str], end: str = "") -> list[str]:
    """Per tool, a Lark body of its arguments written one by one: ``arg(key, value)`` per declared property, in
    the schema's order, the required ones always; a string's value bare, any other's as JSON under its schema
    (which keeps its refs: the whole parameters ride along under ``$defs``), each value then ``end``."""
    bodies = []
    for function in (tool["function"] for tool in tools):
        parameters = _parameters(function)
        root = _rerooted(parameters, "#/$defs/parameters")
        required = set(parameters.get("required") or ())
        items = []
        for key, schema in (root.get("properties") or {}).items():
            value = (_bare_string(schema, end) if _declared_string(schema)
                     else _json({**schema, "$defs": {"parameters": root}}) + (f" {json.dumps(end)}" if end else ""))
            items.append(f"({arg(key, value)})" + ("" if key in required else "?"))
        bodies.append(" ".join(items) or '""')
    return bodies


def _glm_call(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Blocks as GLM's template writes them, a newline apart: GLM-4.5's name and each ``<arg_key>`` and
    ``<arg_value>`` on a line of their own, GLM-4.7's (``</arg_key><arg_value>`` in its template) all on one."""
    line = "" if "</arg_key><arg_value>" in template else r'"\n"'

    def arg(key: str, value: str) -> str:
        return (f'{mark("<arg_key>")} {json.dumps(key)} {mark("</arg_key>")} {line} {mark("<arg_value>")} {value} '
                f'{mark("</arg_value>")} {line}')

    names = [json.dumps(tool["function"]["name"]) for tool in tools]
    rules = [f"call{i}: {name} {line} {body}" for i, (name, body) in enumerate(zip(names, _bare_arguments(tools, arg)))]
    calls = " | ".join(f"call{i}" for i in range(len(tools)))
    blocks = _repeated("block", r'"\n"', many)
    return "\n".join([f"start: {blocks}", f'block: {mark("<tool_call>")} ({calls}) {mark("</tool_call>")}', *rules])


def _qwen3_coder_call(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Blocks as Qwen3-Coder's template writes them, a newline apart (and, where several may follow, maybe one
    after the last, as with Hermes's): ``<function=NAME>``, then each argument's ``<parameter=K>`` block, its
    value on lines of its own."""
    def arg(key: str, value: str) -> str:
        head = json.dumps(f"<parameter={key}>\n")
        return f"{head} {value}"

    bodies = _bare_arguments(tools, arg, end="\n</parameter>\n")
    heads = [json.dumps(tool["function"]["name"] + ">\n") for tool in tools]
    rules = [f"call{i}: {head} {body}" for i, (head, body) in enumerate(zip(heads, bodies))]
    names = " | ".join(f"call{i}" for i in range(len(tools)))
    blocks = _repeated("block", r'"\n"', many) + (r' "\n"?' if many else "")
    block = f'block: {mark("<tool_call>")} "\\n<function=" ({names}) "</function>\\n" {mark("</tool_call>")}'
    return "\n".join([f"start: {blocks}", block, *rules])


def _deepseek_v3_call(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Calls as DeepSeek-V3's template writes them, a newline apart inside one ``<｜tool▁calls▁begin｜>`` and
    ``<｜tool▁calls▁end｜>``."""
    names, rules = _per_function(tools, lambda name: json.dumps(f"{name}\n```json\n"))
    call = f'call: {mark(_DS_CALL)} "function" {mark(_DS_SEP)} ({names}) "\\n```" {mark(_DS_CALL_END)}'
    calls = _repeated("call", r'"\n"', many)
    return f"start: {mark(_DS_CALLS)} {calls} {mark(_DS_CALLS_END)}\n{call}\n{rules}"


def _llama3_call(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Llama 3.1 separates several calls with ``; ``."""
    calls = _repeated("call", '"; "', many)
    return f"start: {calls}\ncall: {_json(_call_schema(tools, 'parameters'))}"


@dataclass(frozen=True)
class ToolCallFormat:
    """How one family of chat templates has the model write calls."""

    name: str
    detect: str  # a template holding this text uses the format
    marker: str | None  # opens a call anywhere in the reply
    openers: tuple[str, ...]  # open a call at the start of the reply
    parse: Callable[..., ParsedReply]  # (text), or (text, schemas) where ``typed``
    #: A Lark grammar (llguidance's dialect) of one call to one of ``tools`` written this way, or one or more, for a
    #: forced call: ``(tools, mark, template, many)``, ``mark`` spelling a marker as its special token or as text.
    forced: Callable[[list[dict[str, Any]], Callable[[str], str], str, bool], str]
    #: Where a call names its function, up to its arguments (``_calls_so_far``); group ``name``. Empty: the
    #: arguments are written bare, and ``parse`` reads a cut forced reply itself (its ``cut`` argument).
    heads: tuple[re.Pattern[str], ...] = (_JSON_HEAD,)
    #: Whether ``parse`` also takes the tools' parameter schemas (:data:`Schemas`), to type arguments written bare.
    typed: bool = False

    def read(self, text: str, tools: list[dict[str, Any]] | None) -> ParsedReply:
        """``text`` parsed as this format writes calls to ``tools``."""
        if not self.typed:
            return self.parse(text)
        return self.parse(text, self._schemas(tools))

    def read_cut(self, text: str, tools: list[dict[str, Any]] | None) -> ParsedReply:
        """A forced reply that does not parse, read as cut short: its calls so far (where arguments are JSON, the
        last as far as it got; where they are written bare, the whole calls before the cut one)."""
        if self.heads:
            return _calls_so_far(self.heads, text)
        return self.parse(text, self._schemas(tools), cut=True)

    @staticmethod
    def _schemas(tools: list[dict[str, Any]] | None) -> Schemas:
        return {t["function"]["name"]: _parameters(t["function"]) for t in tools or ()}


FORMATS = (  # the first whose ``detect`` a template holds: GLM's and Qwen3-Coder's also write <tool_call>
    ToolCallFormat("glm45", "<arg_key>", "<tool_call>", (), _glm, _glm_call, (), typed=True),
    ToolCallFormat("qwen3_coder", "<parameter=", "<tool_call>", (), _qwen3_coder, _qwen3_coder_call, (), typed=True),
    ToolCallFormat("hermes", "<tool_call>", "<tool_call>", (), _hermes, _hermes_call),
    ToolCallFormat("mistral", _TOOL_CALLS, _TOOL_CALLS, ("[{",), _mistral, _mistral_call, (_MISTRAL_HEAD, _JSON_HEAD)),
    ToolCallFormat("granite", "<|tool_call|>", "<|tool_call|>", ("[{",), _json_list_after("<|tool_call|>"),
                   _granite_call),
    ToolCallFormat("llama3_json", "<|python_tag|>", None, ("{", "<|python_tag|>"), _llama3_json, _llama3_call),
    ToolCallFormat("harmony", "<|call|>", harmony.CALL_OPEN, (), _harmony, _harmony_call, (_HARMONY_HEAD,)),
    ToolCallFormat("deepseek_v3", _DS_CALLS, _DS_CALLS, (), _deepseek_v3, _deepseek_v3_call, (_DEEPSEEK_HEAD,)),
)


def format_of(template: str | None) -> ToolCallFormat | None:
    """The tool-call format a chat template asks for; None for templates that do not describe tools."""
    if not template or "tools" not in template:
        return None
    return next((f for f in FORMATS if f.detect in template), None)


def releasable(fmt: ToolCallFormat, text: str) -> int:
    """How much of an unfinished reply a stream can send as content: up to where a call starts or may start."""
    head = text.lstrip()
    if any(head.startswith(opener) or opener.startswith(head) for opener in fmt.openers):
        return 0
    if fmt.marker is None:
        return len(text)
    start = text.find(fmt.marker)
    return start if start >= 0 else len(text) - cut_marker(text, fmt.marker)


class ToolReplies:
    """One chat request's replies split into content and calls, whole or as a stream (all of it content when the
    request has no tools). ``single``: ``parallel_tool_calls`` was false, so only the first call is kept."""

    def __init__(self, tools: list[dict[str, Any]] | None, fmt: ToolCallFormat | None, single: bool = False):
        self.tools, self.format, self.single = tools, fmt, single
        self.grammar: str | None = None  # a forced call's (``forced_call_grammar``)
        self.streamed: dict[int, int] = {}  # per choice, the characters of its text sent as content

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether replies decode with special tokens kept: calls may be marked by one."""
        return self.format is not None

    def parse(self, text: str) -> ParsedReply:
        """The reply's calls, where each names one of the request's tools (as OpenAI's never name another): a
        reply calling a function the request did not offer is text."""
        if self.format is None:
            return ParsedReply(text, [])
        reply = self.format.read(text, self.tools)
        if not reply.calls and self.grammar is not None:  # a forced reply is calls: one that does not parse was cut
            reply = self.format.read_cut(text, self.tools)
        offered = {tool["function"]["name"] for tool in self.tools or ()}
        if any(call["function"]["name"] not in offered for call in reply.calls):
            return ParsedReply(text, [])
        return ParsedReply(reply.before, reply.calls[:1], reply.after) if self.single else reply

    def message(self, text: str, reason: str) -> tuple[dict[str, Any], str]:
        """A finished choice's message and finish reason (``tool_calls`` where it stopped after calling)."""
        reply = self.parse(text)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
        if not reply.calls:
            return message, reason
        return {**message, "tool_calls": reply.calls}, "tool_calls" if reason == "stop" else reason

    def delta(self, index: int, text: str, finished: bool) -> str:
        """The content choice ``index`` can stream now, its reply being ``text`` so far: the new text, less what
        may be the start of a call (held back until the choice ends)."""
        sent = self.streamed.get(index, 0)
        if self.format is None:
            ready = len(text)
        elif finished:  # the calls go out apart (ending); the text before them is content
            reply = self.parse(text)
            ready = len(reply.before) if reply.calls else len(text)
        else:
            ready = releasable(self.format, text)
        self.streamed[index] = max(sent, ready)
        return text[sent:max(sent, ready)]

    def ending(self, text: str, reason: str) -> tuple[list[dict[str, Any]], str]:
        """A finished choice's last stream deltas (its calls, then any text after them) and its finish reason."""
        reply = self.parse(text)
        if not reply.calls:
            return [], reason
        deltas: list[dict[str, Any]] = [{"tool_calls": [{"index": j, **call}]} for j, call in enumerate(reply.calls)]
        if reply.after.strip():
            deltas.append({"content": reply.after})
        return deltas, "tool_calls" if reason == "stop" else reason


def forced_call_grammar(fmt: ToolCallFormat, tools: list[dict[str, Any]], tokenizer: Any, template: str,
                        many: bool = False) -> str:
    """The grammar a forced call (``tool_choice`` required or named) is sampled under: one call to one of
    ``tools`` as ``fmt`` writes it (or, ``many``, one or more), each marker its added token where the tokenizer
    has one (special or not)."""
    def mark(text: str) -> str:
        token = tokenizer.added_token_id(text)
        return json.dumps(text) if token is None else f"<[{token}]>"

    return fmt.forced(tools, mark, template, many)


def check_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's tool definitions, each an OpenAI function (name, optional description and JSON schema)."""
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise APIError(400, 'each tool must be {"type": "function", "function": {"name": ..., ...}}',
                           param=f"tools.{i}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(400, "a tool's function needs a name", param=f"tools.{i}.function.name")
        parameters = function.get("parameters")
        parameters = {} if parameters is None else parameters  # null: a function of no arguments
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise APIError(400, "a tool's parameters must be a JSON schema of an object (its arguments are one)",
                           param=f"tools.{i}.function.parameters")
    return tools


def template_tool_calls(calls: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier calls as chat templates read them: arguments as an object, not the JSON
    text OpenAI clients send back (templates write ``arguments | tojson``)."""
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, 'each tool call must be {"type": "function", "function": {"name": ..., '
                           '"arguments": "<JSON>"}}', param=f"{where}.{j}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except _NOT_JSON:
                raise APIError(400, "a tool call's arguments must be JSON text", param=f"{where}.{j}") from None
        if not isinstance(arguments, dict):  # templates read them as an object (``arguments.items()``)
            raise APIError(400, f"a tool call's arguments must be a JSON object, got {type(arguments).__name__}",
                           param=f"{where}.{j}")
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out
