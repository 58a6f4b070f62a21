"""DeepSeek's calls (``deepseek_v3``): their parser and forced-call grammar."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from ferrum.serve.tools.grammars import _per_function, _repeated
from ferrum.serve.tools.reading import _NOT_JSON, ParsedReply, _call


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


_DEEPSEEK_HEAD = re.compile(re.escape(_DS_CALL) + r"[^<\n]*" + re.escape(_DS_SEP) + r"(?P<name>[^\n]+)"
                            r"(?P<args>\n```json\n)?")


def _deepseek_v3_call(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Calls as DeepSeek-V3's template writes them, a newline apart inside one ``<｜tool▁calls▁begin｜>`` and
    ``<｜tool▁calls▁end｜>``."""
    names, rules = _per_function(tools, lambda name: json.dumps(f"{name}\n```json\n"))
    call = f'call: {mark(_DS_CALL)} "function" {mark(_DS_SEP)} ({names}) "\\n```" {mark(_DS_CALL_END)}'
    calls = _repeated("call", r'"\n"', many)
    return f"start: {mark(_DS_CALLS)} {calls} {mark(_DS_CALLS_END)}\n{call}\n{rules}"
