"""Kimi K2's calls (``kimi_k2``): their parser and forced-call grammar."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from ferrum.serve.tools.deepseek import read_sections
from ferrum.serve.tools.grammars import per_function_rules
from ferrum.serve.tools.reading import ParsedReply, make_call

KIMI_CALLS, _KIMI_CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
_KIMI_CALL, _KIMI_ARGS, _KIMI_CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
#: A call up to its arguments' JSON: its id, ``functions.NAME:IDX`` (the prefix maybe left out), then the marker
#: that opens the arguments (also where a cut forced reply's call is read from: its name is whole there). A name
#: left empty reads as none, which is no call.
KIMI_CALL_HEAD = re.compile(r"\s*" + re.escape(_KIMI_CALL) + r"\s*(?P<id>(?:functions\.)?(?P<name>[^<:\s]*):\d+)\s*"
                            + re.escape(_KIMI_ARGS) + r"\s*")
_KIMI_CALL_TAIL = re.compile(r"\s*" + re.escape(_KIMI_CALL_END))
_KIMI_CALLS_CLOSE = re.compile(r"\s*" + re.escape(_KIMI_CALLS_END))
#: The calls' number in a forced call's id: the model counts them over the conversation.
_INDEX = "/[0-9]{1,5}/"


def _identified(match: re.Match[str], arguments: Any) -> dict[str, Any] | None:
    """The call, its id the one the model wrote (as vLLM keeps it): Kimi's template writes a call's id back in
    the calls it renders, and the tool's reply names it."""
    call = make_call(match.group("name"), arguments)
    return None if call is None else {**call, "id": match.group("id")}


def read_kimi_k2(text: str) -> ParsedReply:
    """Kimi K2's calls: inside ``<|tool_calls_section_begin|>...<|tool_calls_section_end|>``, per call
    ``<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>``; a call that does
    not read so leaves the whole reply text (as DeepSeek's, whose layout Kimi's follows)."""
    return read_sections(text, KIMI_CALLS, _KIMI_CALLS_CLOSE, KIMI_CALL_HEAD, _KIMI_CALL_TAIL, _identified)


def kimi_k2_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """Calls as Kimi K2's template writes them, one right after another inside one section, each id
    ``functions.NAME:IDX``."""
    names, rules = per_function_rules(
        tools, lambda name: f"{json.dumps(f'functions.{name}:')} {_INDEX} {mark(_KIMI_ARGS)}")
    call = f"call: {mark(_KIMI_CALL)} ({names}) {mark(_KIMI_CALL_END)}"
    calls = "call+" if many else "call"
    return f"start: {mark(KIMI_CALLS)} {calls} {mark(_KIMI_CALLS_END)}\n{call}\n{rules}"
