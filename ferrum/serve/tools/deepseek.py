"""DeepSeek's calls (``deepseek_v3``, ``deepseek_v31``): their parsers and forced-call grammars, and the reading of
calls in sections between markers that Kimi K2's share."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from ferrum.serve.tools.grammars import per_function_rules, repeated
from ferrum.serve.tools.reading import NOT_JSON, ParsedReply, make_call


DS_CALLS, _DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_DS_CALL, _DS_SEP, _DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
#: A call up to its arguments' JSON: its type (``function``), the name, a fenced block's opening.
_DEEPSEEK_CALL = re.compile(r"\s*" + re.escape(_DS_CALL) + r"[^<\n]*" + re.escape(_DS_SEP)
                            + r"(?P<name>[^\n]+)\n```json\n")
_DEEPSEEK_CALL_TAIL = re.compile(r"\s*```\s*" + re.escape(_DS_CALL_END))
_DEEPSEEK_CALLS_END = re.compile(r"\s*" + re.escape(_DS_CALLS_END))
#: DeepSeek-V3.1's call up to its arguments: the name alone (no type, no fence), then the separator (also where a
#: cut forced reply's call is read from: its name is whole where the separator follows it).
DEEPSEEK_V31_CALL = re.compile(r"\s*" + re.escape(_DS_CALL) + r"\s*(?P<name>[^<\s]+)\s*" + re.escape(_DS_SEP)
                               + r"\s*")
_DEEPSEEK_V31_CALL_TAIL = re.compile(r"\s*" + re.escape(_DS_CALL_END))


def read_sections(text: str, opening: str, closing: re.Pattern[str], head: re.Pattern[str], tail: re.Pattern[str],
                  make: Callable[[re.Match[str], Any], dict[str, Any] | None]) -> ParsedReply:
    """The calls of a reply that writes them in sections: after ``opening``, calls one after another, each ``head``
    (up to its arguments' JSON), the arguments, then ``tail``; the section ends at ``closing``. ``make(head,
    arguments)`` gives the call, or None. Every section is read (the text between them kept); a call that does not
    read so (cut, or its arguments not a JSON object) leaves the whole reply text."""
    start = text.find(opening)
    if start < 0:
        return ParsedReply(text, [])
    decoder, calls, rest, at = json.JSONDecoder(), [], [], start
    while at >= 0:  # at: where a section of calls begins
        at += len(opening)
        while match := head.match(text, at):
            try:
                arguments, after = decoder.raw_decode(text, match.end())
                end = tail.match(text, after)
            except NOT_JSON:
                end = None
            call = None if end is None else make(match, arguments)
            if call is None:
                return ParsedReply(text, [])
            calls.append(call)
            at = end.end()
        if not calls:
            return ParsedReply(text, [])
        end = closing.match(text, at)
        at = end.end() if end else at
        following = text.find(opening, at)
        rest.append(text[at:following] if following >= 0 else text[at:])
        at = following
    return ParsedReply(text[:start], calls, "".join(rest))


def _named(match: re.Match[str], arguments: Any) -> dict[str, Any] | None:
    return make_call(match.group("name").strip(), arguments)


def read_deepseek_v3(text: str) -> ParsedReply:
    """DeepSeek-V3's and R1's calls: after ``<｜tool▁calls▁begin｜>``, each call's type, name and its arguments as
    a fenced JSON block between ``<｜tool▁call▁begin｜>`` and ``<｜tool▁call▁end｜>``, in one such block of calls
    or several (the text between them kept); a call that does not read so (cut, or its arguments not a JSON
    object) leaves the whole reply text."""
    return read_sections(text, DS_CALLS, _DEEPSEEK_CALLS_END, _DEEPSEEK_CALL, _DEEPSEEK_CALL_TAIL, _named)


def read_deepseek_v31(text: str) -> ParsedReply:
    """DeepSeek-V3.1's (and V3.2-Exp's) calls: as V3's, each call only its name, ``<｜tool▁sep｜>`` and its
    arguments' JSON as they are (no type, no fence) between ``<｜tool▁call▁begin｜>`` and ``<｜tool▁call▁end｜>``."""
    return read_sections(text, DS_CALLS, _DEEPSEEK_CALLS_END, DEEPSEEK_V31_CALL, _DEEPSEEK_V31_CALL_TAIL, _named)


DEEPSEEK_HEAD = re.compile(re.escape(_DS_CALL) + r"[^<\n]*" + re.escape(_DS_SEP) + r"(?P<name>[^\n]+)"
                           r"(?P<args>\n```json\n)?")


def deepseek_v3_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Calls as DeepSeek-V3's template writes them, a newline apart inside one ``<｜tool▁calls▁begin｜>`` and
    ``<｜tool▁calls▁end｜>``."""
    names, rules = per_function_rules(tools, lambda name: json.dumps(f"{name}\n```json\n"))
    call = f'call: {mark(_DS_CALL)} "function" {mark(_DS_SEP)} ({names}) "\\n```" {mark(_DS_CALL_END)}'
    calls = repeated("call", r'"\n"', many)
    return f"start: {mark(DS_CALLS)} {calls} {mark(_DS_CALLS_END)}\n{call}\n{rules}"


def deepseek_v31_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Calls as DeepSeek-V3.1's template writes them, one right after another (no separator) inside one
    ``<｜tool▁calls▁begin｜>`` and ``<｜tool▁calls▁end｜>``."""
    names, rules = per_function_rules(tools, lambda name: f"{json.dumps(name)} {mark(_DS_SEP)}")
    call = f"call: {mark(_DS_CALL)} ({names}) {mark(_DS_CALL_END)}"
    calls = "call+" if many else "call"
    return f"start: {mark(DS_CALLS)} {calls} {mark(_DS_CALLS_END)}\n{call}\n{rules}"
