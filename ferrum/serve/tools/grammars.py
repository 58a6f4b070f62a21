"""What the forced-call grammars share (Lark, llguidance's dialect, :mod:`ferrum.structured`): a call's JSON
under the tools' schemas, arguments written bare, repetition."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from ferrum.serve.tools.reading import parameters_of, string_schema
from ferrum.structured import DATA_KEYWORDS


#: How a call's JSON is held: the separators of ``json.dumps`` and Jinja's ``tojson``, which wrote the calls
#: in the model's training, and no free whitespace to spend tokens on.
_CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def call_schema(tools: list[dict[str, Any]], args: str = "arguments") -> dict[str, Any]:
    """One call to one of ``tools``: ``{"name": <its name>, <args>: <its parameters>}``. Each tool's parameters
    move whole under ``#/$defs/tool<i>``, their refs (``#``, ``#/$defs/...``, ``#/properties/...``: relative to
    their own root) rewritten to point there, so they resolve inside the call's schema as they did alone."""
    calls, defs = [], {}
    for i, function in enumerate(tool["function"] for tool in tools):
        name = f"tool{i}"
        defs[name] = _rerooted(parameters_of(function), f"#/$defs/{name}")
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


def call_or_answer(calls: str, answer: dict[str, Any]) -> str:
    """A Lark grammar of a reply that is either what the forced-call grammar ``calls`` takes or a JSON ``answer``
    under that schema (as compiled: :func:`~ferrum.structured.compiled_schema`)."""
    calls = re.sub(r"^start:", "tool_reply:", calls, count=1, flags=re.MULTILINE)
    return f"start: tool_reply | schema_answer\nschema_answer: %json {json.dumps(answer)}\n{calls}"


def json_rule(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _CALL_JSON})


def repeated(one: str, separator: str, many: bool) -> str:
    """A Lark body of one ``one``, or (``many``) one or more separated by ``separator`` (a Lark string)."""
    return f"{one} ({separator} {one})*" if many else one


def per_function_rules(tools: list[dict[str, Any]], head: Callable[[str], str]) -> tuple[str, str]:
    """Lark rules for calls that name their function ahead of its arguments: ``call0 | call1 | ...``, and per
    tool ``head(name)`` (a Lark body) then its parameters' JSON."""
    names = " | ".join(f"call{i}" for i in range(len(tools)))
    rules = "\n".join(f'call{i}: {head(t["function"]["name"])} '
                      f'{json_rule(parameters_of(t["function"]))}' for i, t in enumerate(tools))
    return names, rules


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


def bare_arguments(tools: list[dict[str, Any]], arg: Callable[[str, str], str], end: str = "",
                   quoted: bool = False, separator: str = "") -> list[str]:
    """Per tool, a Lark body of its arguments written one by one: ``arg(key, value)`` per declared property, in
    the schema's order, the required ones always; a string's value bare (or, ``quoted``, as JSON), any other's as
    JSON under its schema (which keeps its refs: the whole parameters ride along under ``$defs``), each value then
    ``end``; ``separator`` (a Lark string) between two arguments written."""
    bodies = []
    for function in (tool["function"] for tool in tools):
        parameters = parameters_of(function)
        root = _rerooted(parameters, "#/$defs/parameters")
        required = set(parameters.get("required") or ())
        items = []
        for key, schema in (root.get("properties") or {}).items():
            value = (_bare_string(string_schema(schema), end) if string_schema(schema) is not None and not quoted
                     else json_rule({**schema, "$defs": {"parameters": root}}) + (f" {json.dumps(end)}" if end else ""))
            items.append((f"({arg(key, value)})", key in required))
        bodies.append(separated(items, separator) or '""')
    return bodies


def separated(items: list[tuple[str, bool]], separator: str) -> str:
    """A Lark body of ``items`` (each a body and whether it is required) in order, the optional ones maybe left out,
    ``separator`` between two written (none before the first): built from the end, as what may follow where none
    was written yet (``first``) and where one was (``rest``)."""
    first = rest = ""
    for item, required in reversed(items):
        written = f"{item} {rest}".strip()
        if not separator:
            first = rest = written if required else f"{item}? {rest}".strip()
            continue
        first = written if required else f"({written} | {first})" if first else f"({written})?"
        rest = (f"{separator} {item}" if required else f"({separator} {item})?") + (f" {rest}" if rest else "")
    return first
