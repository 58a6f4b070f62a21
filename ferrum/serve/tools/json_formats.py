"""The formats whose calls are JSON objects naming their function (``hermes``, ``mistral``, ``granite``,
``llama3_json``, ``llama4_json``, ``internlm``, ``hunyuan_a13b`` / ``jamba``, ``phi4_mini``): their parsers and
forced-call grammars."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from ferrum.serve.tools.grammars import call_schema, json_rule, per_function_rules, repeated
from ferrum.serve.tools.reading import NOT_JSON, ParsedReply, make_call, object_call, read_object_call


def _tagged_calls(opening: str, closing: str, *keys: str) -> Callable[[str], ParsedReply]:
    """Calls written each between ``opening`` and ``closing`` as a JSON object naming its function, its arguments
    under the first of ``keys`` it has; the text around the blocks kept, a block that does not read so (or is not
    closed but at the end) leaves the whole reply text."""
    block = re.compile(re.escape(opening) + r"\s*(.*?)\s*(?:" + re.escape(closing) + "|$)", re.DOTALL)

    def parse(text: str) -> ParsedReply:
        start = text.find(opening)
        if start < 0:
            return ParsedReply(text, [])
        calls, rest, end = [], [], start
        for match in block.finditer(text, start):
            rest.append(text[end:match.start()])
            call = read_object_call(match.group(1), keys)
            if call is None:
                return ParsedReply(text, [])
            calls.append(call)
            end = match.end()
        return ParsedReply(text[:start], calls, "".join(rest) + text[end:])

    return parse


read_hermes = _tagged_calls("<tool_call>", "</tool_call>", "arguments")
INTERNLM_CALL, _INTERNLM_END = "<|action_start|><|plugin|>", "<|action_end|>"
#: InternLM 2 / 2.5 / 3's calls, each ``<|action_start|><|plugin|>\n{"name": ..., "parameters": ...}<|action_end|>``
#: (vLLM's ``internlm`` parser also takes ``arguments``, which its template writes back).
read_internlm = _tagged_calls(INTERNLM_CALL, _INTERNLM_END, "parameters", "arguments")


def json_list_reader(token: str, closing: str = "", keys: tuple[str, ...] = ("arguments",),
                     bare: bool = True) -> Callable[[str], ParsedReply]:
    """Calls written as ``token`` then a JSON list of objects naming their function, their arguments under the
    first of ``keys`` each has (Mistral, Granite, Phi-4-mini), then ``closing`` where the format closes the list
    (Hunyuan's and Jamba's ``</tool_calls>``; left out at the end, as a reply cut there, it is still the calls).
    Where ``token`` is a special one, which decoding may drop (``bare``), a reply opening with such a list is
    calls too."""

    def parse(text: str) -> ParsedReply:
        marker = text.find(token)
        body = (text[marker + len(token):] if marker >= 0 else text).lstrip()
        if marker < 0 and not (bare and body.startswith("[{")):
            return ParsedReply(text, [])
        try:
            value, end = json.JSONDecoder().raw_decode(body)
        except NOT_JSON:
            return ParsedReply(text, [])
        calls = [object_call(item, keys) for item in (value if isinstance(value, list) else [value])]
        if not calls or None in calls:
            return ParsedReply(text, [])
        after = body[end:]
        if closing and after.lstrip().startswith(closing):
            after = after.lstrip()[len(closing):]
        return ParsedReply(text[:max(marker, 0)], calls, after)

    return parse


MISTRAL_CALLS = "[TOOL_CALLS]"
_mistral_list = json_list_reader(MISTRAL_CALLS)
#: What follows ``[TOOL_CALLS]`` in a v11 call, up to its arguments: the name, maybe ``[CALL_ID]id``, ``[ARGS]``.
_MISTRAL_CALL_HEAD = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*(?:\[CALL_ID\]\s*\w*\s*)?(?:\[ARGS\])?\s*")


def read_mistral(text: str) -> ParsedReply:
    """Mistral's calls: a JSON list after ``[TOOL_CALLS]`` (tokenizers before v11), else, from v11 on, each
    call opened by its own ``[TOOL_CALLS]``, then its name, ``[ARGS]`` and its arguments' JSON object."""
    start = text.find(MISTRAL_CALLS)
    if start < 0 or text[start + len(MISTRAL_CALLS):].lstrip().startswith("["):
        return _mistral_list(text)
    decoder, calls, rest, at = json.JSONDecoder(), [], [], start
    while at >= 0:
        head = _MISTRAL_CALL_HEAD.match(text, at + len(MISTRAL_CALLS))
        if head is None:
            return ParsedReply(text, [])
        try:
            arguments, end = decoder.raw_decode(text, head.end())
        except NOT_JSON:
            return ParsedReply(text, [])
        call = make_call(head.group(1), arguments)
        if call is None:
            return ParsedReply(text, [])
        calls.append(call)
        at = text.find(MISTRAL_CALLS, end)
        rest.append(text[end:] if at < 0 else text[end:at])
    return ParsedReply(text[:start], calls, "".join(rest))


def json_objects_reader(opening: str, closing: str = "") -> Callable[[str], ParsedReply]:
    """The whole reply is calls: JSON objects naming their function, their arguments under "parameters" (or
    "arguments"), one after another (Llama 3.1 separates several with ``;``, Llama 4's template writes them right
    after one another), maybe after ``opening`` (Llama 3.1's ``<|python_tag|>``, Llama 4's ``<|python_start|>``);
    ``closing`` (Llama 4's ``<|python_end|>``) may close them, or an empty block before them, as Llama 4's template
    writes a call back."""
    def parse(text: str) -> ParsedReply:
        body = text.strip().removeprefix(opening).strip()
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            if closing and body.startswith(closing, at):
                at += len(closing)
            else:
                try:
                    value, at = decoder.raw_decode(body, at)
                except NOT_JSON:
                    return ParsedReply(text, [])
                if not isinstance(value, dict):
                    return ParsedReply(text, [])
                call = make_call(value.get("name"), value.get("parameters", value.get("arguments")))
                if call is None:
                    return ParsedReply(text, [])
                calls.append(call)
            while at < len(body) and body[at] in " \t\r\n;":
                at += 1
        return ParsedReply("", calls) if calls else ParsedReply(text, [])

    return parse


read_llama3_json = json_objects_reader("<|python_tag|>")
LLAMA4_CALLS, _LLAMA4_END = "<|python_start|>", "<|python_end|>"
#: Llama 4's calls under its official JSON template (meta-llama/Llama-4-Scout-17B-16E-Instruct), which asks for
#: ``{"name": function name, "parameters": ...}`` and writes a call back as ``<|python_start|><|python_end|>`` (the
#: message's text between them) then the calls (vLLM reads them with its ``llama3_json`` / ``llama4_json`` parser).
read_llama4_json = json_objects_reader(LLAMA4_CALLS, _LLAMA4_END)


MISTRAL_HEAD = re.compile(re.escape(MISTRAL_CALLS) + r"\s*(?P<name>[A-Za-z_][\w.\-]*)\s*"
                          r"(?:\[CALL_ID\]\s*\w*\s*)?\[ARGS\]\s*")


def hermes_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Blocks a line apart, as the template writes them. Where several may follow, a newline may also end the
    last: models trained on those blocks write one before ending their turn, and were it only the way into another
    call, a required reply repeated its call until max_tokens. (A single block ends the reply where it closes.)"""
    block = f'block: {mark("<tool_call>")} "\\n" call "\\n" {mark("</tool_call>")}'
    blocks = repeated("block", r'"\n"', many) + (' "\\n"?' if many else "")
    return f"start: {blocks}\n{block}\ncall: {json_rule(call_schema(tools))}"


def internlm_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Calls one right after another, each naming its arguments "parameters" as InternLM writes them (lagent's
    format, which vLLM's parser reads first)."""
    block = f'block: {mark("<|action_start|>")} {mark("<|plugin|>")} "\\n" call {mark(_INTERNLM_END)}'
    return f"start: {'block+' if many else 'block'}\n{block}\ncall: {json_rule(call_schema(tools, 'parameters'))}"


def _list_call(marker: str, closing: str = "") -> Callable[[list[dict[str, Any]], Callable[[str], str], str, bool],
                                                            str]:
    """One JSON list of calls after ``marker`` (and before ``closing``, where the format closes it)."""
    def grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
        call = call_schema(tools)
        defs = call.pop("$defs", None)  # at the root, where the refs resolve
        calls = {"type": "array", "items": call, "minItems": 1, **({} if many else {"maxItems": 1}),
                 **({"$defs": defs} if defs else {})}
        return f"start: {mark(marker)} calls{f' {mark(closing)}' if closing else ''}\ncalls: {json_rule(calls)}"

    return grammar


granite_grammar = _list_call("<|tool_call|>")
TOOL_CALLS, _TOOL_CALLS_END = "<tool_calls>", "</tool_calls>"
#: Hunyuan-A13B's and Jamba's calls: ``<tool_calls>[{"name": ..., "arguments": {...}}, ...]</tool_calls>`` (vLLM's
#: ``hunyuan_a13b`` and ``jamba`` parsers; Jamba's tags are special tokens).
read_tool_calls_list = json_list_reader(TOOL_CALLS, _TOOL_CALLS_END)
tool_calls_list_grammar = _list_call(TOOL_CALLS, _TOOL_CALLS_END)
PHI4_CALLS = "functools"
#: Phi-4-mini's calls (vLLM's ``phi4_mini_json`` parser and template): ``functools[{"name": ..., "arguments": ...}]``,
#: no closing marker; ``functools`` is plain text, so a bare list is no call; ``parameters`` read too, as vLLM does.
read_phi4_mini = json_list_reader(PHI4_CALLS, keys=("arguments", "parameters"), bare=False)
phi4_mini_grammar = _list_call(PHI4_CALLS)


def mistral_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """The v11 form (``name[ARGS]{...}``, each call opened by ``[TOOL_CALLS]``) where the template writes it, else
    the list after ``[TOOL_CALLS]``."""
    if "[ARGS]" not in template:
        return _list_call(MISTRAL_CALLS)(tools, mark, template, many)
    names, rules = per_function_rules(tools, lambda name: f'{json.dumps(name)} {mark("[ARGS]")}')
    return f"start: {'opened+' if many else 'opened'}\nopened: {mark(MISTRAL_CALLS)} ({names})\n{rules}"


def llama3_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Llama 3.1 separates several calls with ``; ``."""
    calls = repeated("call", '"; "', many)
    return f"start: {calls}\ncall: {json_rule(call_schema(tools, 'parameters'))}"


def llama4_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Llama 4's template writes calls right after one another, no separator, no tags around them."""
    return f"start: {'call+' if many else 'call'}\ncall: {json_rule(call_schema(tools, 'parameters'))}"
