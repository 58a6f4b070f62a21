"""A request's tool definitions and an assistant's earlier calls, checked and put as chat templates read them."""

from __future__ import annotations

import json
from typing import Any

from ferrum.serve.errors import APIError
from ferrum.serve.tools.reading import NOT_JSON


def check_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's tool definitions, each an OpenAI function (name, optional description and JSON schema), as
    chat templates read them: the optional keys there, null where left out, as vLLM hands them over (templates
    write ``tool.function.parameters | tojson`` whether or not a function takes arguments)."""
    out = []
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
        out.append({**tool, "function": {"description": None, "parameters": None, **function}})
    return out


class _Arguments(dict):
    """A call's arguments as templates read them: an object (``arguments.items()``, ``arguments | tojson``) that,
    joined to text with ``+`` (DeepSeek's templates write ``'<｜tool▁sep｜>' + tool['function']['arguments']``, the
    JSON text clients send), is its JSON text, as ``tojson`` writes it."""

    def __add__(self, other: Any) -> Any:
        return json.dumps(self, ensure_ascii=False) + other if isinstance(other, str) else NotImplemented

    def __radd__(self, other: Any) -> Any:
        return other + json.dumps(self, ensure_ascii=False) if isinstance(other, str) else NotImplemented


class RawArguments(str):
    """A call's arguments that are no JSON object (a reply ``max_tokens`` cut, a small model's ``{'q': 'x'}``), as
    the text they are: OpenAI takes any text back in the history. A template that joins them to text or writes them
    ``| tojson`` renders them so; one that reads them as an object (``.items()``) cannot, and ``where`` names the
    call for its error (:func:`raw_arguments_in`)."""

    where: str

    def __new__(cls, text: str, where: str) -> RawArguments:
        raw = super().__new__(cls, text)
        raw.where = where
        return raw


def template_tool_calls(calls: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier calls as chat templates read them: arguments as an object, not the JSON
    text OpenAI clients send back (templates write ``arguments | tojson``), which templates that join it to text
    still get (:class:`_Arguments`); arguments that are no JSON object as their text (:class:`RawArguments`)."""
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, 'each tool call must be {"type": "function", "function": {"name": ..., '
                           '"arguments": "<JSON>"}}', param=f"{where}.{j}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments) if arguments.strip() else {}
            except NOT_JSON:
                parsed = None
            arguments = parsed if isinstance(parsed, dict) else RawArguments(arguments, f"{where}.{j}")
        if not isinstance(arguments, (dict, str)):
            raise APIError(400, f"a tool call's arguments must be text (JSON, as the API has it) or an object, got "
                           f"{type(arguments).__name__}", param=f"{where}.{j}")
        out.append({"id": call.get("id"), "type": "function", "function": {
            "name": function["name"], "arguments": arguments if isinstance(arguments, str) else _Arguments(arguments)}})
    return out


def raw_arguments_in(messages: Any) -> str | None:
    """Where the first call of templated messages whose arguments are :class:`RawArguments` is, if one is."""
    for message in messages if isinstance(messages, list) else ():
        for call in message.get("tool_calls") or () if isinstance(message, dict) else ():
            if isinstance(call["function"]["arguments"], RawArguments):
                return call["function"]["arguments"].where
    return None
