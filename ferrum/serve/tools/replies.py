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
    def stops(self) -> list[str]:
        """Where replies stop beside the request's own stop strings: where the format's tool turn begins."""
        return list(self.format.ends) if self.format is not None else []

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

    @property
    def no_content(self) -> str | None:
        """What a stream's delta carries as content before it has any: "", or null where the reply may turn out to
        be calls only (whose message's content is null, which a client adding up the deltas must end with too)."""
        return "" if self.format is None else None

    def delta(self, index: int, text: str, finished: bool) -> str:
        """The content choice ``index`` can stream now, its reply being ``text`` so far: the new text, less what
        may be the start of a call and the whitespace that may turn out to lead to one (held back until more text
        or the choice's end decides it), so that the content streamed adds up to the message's."""
        sent = self.streamed.get(index, 0)
        if self.format is None:
            ready = len(text)
        elif finished:  # the calls go out apart (ending); the text before them is content
            reply = self.parse(text)
            ready = len(reply.around[0]) if reply.calls else len(text)
        else:
            ready = len(text[:releasable(self.format, text)].rstrip())
        self.streamed[index] = max(sent, ready)
        return text[sent:max(sent, ready)]

    def after_calls(self, text: str) -> str:
        """The content of a finished reply that follows its calls, which a stream sends after them."""
        return self.parse(text).around[1]

    def ending(self, text: str, reason: str) -> tuple[list[dict[str, Any]], str]:
        """A finished choice's last stream deltas (its calls, then any text after them) and its finish reason. A
        reply with neither text nor calls ends with an empty content, where its stream began with a null one."""
        reply = self.parse(text)
        if not reply.calls:
            return ([{"content": ""}] if not text and self.no_content is None else []), reason
        deltas: list[dict[str, Any]] = [{"tool_calls": [{"index": j, **call}]} for j, call in enumerate(reply.calls)]
        if reply.around[1]:
            deltas.append({"content": reply.around[1]})
        return deltas, "tool_calls" if reason == "stop" else reason
