"""gpt-oss's calls (``harmony``): those :mod:`ferrum.serve.harmony` reads, as OpenAI's entries, and the
forced-call grammar of one."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from ferrum.serve import harmony
from ferrum.serve.tools.grammars import per_function_rules
from ferrum.serve.tools.reading import ParsedReply, make_call


HARMONY_HEAD = re.compile(re.escape(harmony.CALL_OPEN) + r"(?P<name>[^<\s]+)"
                          + re.escape(f"{harmony.CHANNEL}commentary json{harmony.MESSAGE}"))


def read_harmony(text: str) -> ParsedReply:
    visible, calls = harmony.parse_calls(text)
    parsed = [make_call(name, arguments) for name, arguments in calls]
    if not calls or None in parsed:  # text that only looks like a call stays content
        return ParsedReply(text, [])
    return ParsedReply(visible, parsed)


def harmony_grammar(tools: list[dict[str, Any]], mark: Callable[[str], str], template: str, many: bool) -> str:
    """A message to one of the functions, headed as gpt-oss's template heads the calls it writes back
    (one call: generation stops at ``<|call|>``)."""
    names, rules = per_function_rules(tools, lambda name: f'{mark(harmony.CHANNEL)} '
                                                          f'{json.dumps(f"commentary to=functions.{name} json")} '
                                                          f'{mark(harmony.MESSAGE)}')
    return f"start: {names}\n{rules}"
