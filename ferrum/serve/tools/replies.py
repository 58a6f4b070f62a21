"""One chat request's replies split into content and calls, whole or streamed."""

from __future__ import annotations

from typing import Any

from ferrum.serve.tools.formats import ToolCallFormat, releasable
from ferrum.serve.tools.reading import ParsedReply


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
