"""gpt-oss's replies, written in OpenAI's harmony format, read into thinking, answer and tool calls.

After the prompt's ``<|start|>assistant`` a reply is a run of messages: a header, ``<|message|>``, the
message's text, ``<|end|>``; the next one opens with ``<|start|>assistant``. Generation stops at
``<|return|>`` after the answer or at ``<|call|>`` after a call (both end-of-sequence ids in gpt-oss's
generation config). The header names the channel: ``<|channel|>analysis`` is thinking, ``final`` the
answer, ``commentary`` a preamble the user may see, or a call where the header names a recipient,
``to=functions.NAME`` (before or after the channel), whose text is the arguments as JSON.

The markers are special tokens, so these replies decode with special tokens kept, and each marker
arrives whole in a stream. What is read comes out in the shapes the rest of the server takes:
:class:`HarmonyThinking` splits like :class:`ferrum.serve.reasoning.Thinking` (the thinking, then an
answer holding the visible text and, after it, each call in one canonical harmony form), and
``ferrum.serve.tools`` reads those calls (format ``harmony``). Nothing is dropped: a reply without
headers (say, one shaped by a JSON schema from its first token) is all answer once it ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
#: Ends of a message's text: its own end, or generation's where the tokenizer keeps them in the text.
_ENDS = re.compile(r"<\|(?:end|call|return)\|>")
_CHANNEL = re.compile(r"<\|channel\|>\s*([\w.-]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
#: How the answer carries a call: the way gpt-oss's chat template writes one back into the prompt.
CALL_OPEN = f"{START}assistant to=functions."


@dataclass(frozen=True)
class _Message:
    channel: str | None
    recipient: str | None
    text: str


def _messages(text: str, finished: bool) -> list[_Message]:
    """The reply's messages whose header is complete; once the reply has ended, text without a header
    is a message of its own (channel None) rather than lost."""
    out = []
    for chunk in text.split(START):
        header, opened, body = chunk.partition(MESSAGE)
        if not opened:
            if finished and chunk.strip() and CHANNEL not in chunk:
                out.append(_Message(None, None, chunk))
            continue
        channel, recipient = _CHANNEL.search(header), _RECIPIENT.search(header)
        out.append(_Message(channel and channel.group(1), recipient and recipient.group(1),
                            _ENDS.split(body, maxsplit=1)[0]))
    return out


def read(text: str, finished: bool) -> tuple[str | None, str]:
    """``(thinking, answer)`` of a reply so far: the analysis messages' text (None without any), and the
    other messages' text followed by the calls, each as ``CALL_OPEN`` name, header end, arguments.
    Both only grow as the reply does, so a stream can send what is new."""
    thinking, visible, calls = [], [], []
    for message in _messages(text, finished):
        if message.channel == "analysis":
            thinking.append(message.text)
        elif message.recipient and message.recipient.startswith("functions."):
            name = message.recipient.removeprefix("functions.")
            calls.append(f"{CALL_OPEN}{name}{CHANNEL}commentary json{MESSAGE}{message.text}")
        else:
            visible.append(message.text)
    return ("".join(thinking) if thinking else None), "".join(visible) + "".join(calls)


class HarmonyThinking:
    """One chat request's harmony replies split into thinking and answer, whole or as a stream (the
    interface of :class:`ferrum.serve.reasoning.Thinking`)."""

    #: The markers are special tokens: replies must decode with them.
    keeps_special_tokens = True

    def __init__(self) -> None:
        self.sent: dict[int, int] = {}  # per choice, the characters of thinking sent

    def split(self, text: str) -> tuple[str | None, str]:
        return read(text, finished=True)

    def answer_start(self, text: str, token_ids: Sequence[int], tokenizer: Any) -> int:
        """Where the answer of a reply (``token_ids``, so far) begins among its tokens: after the header of its
        first message that is neither thinking nor a call; the reply's length before one (0 for a reply without
        headers, all answer)."""
        start, message = (tokenizer.token_to_id(marker) for marker in (START, MESSAGE))
        if message not in token_ids:
            return 0 if read(text, finished=True)[0] is None and CHANNEL not in text else len(token_ids)
        header = 0
        for i, token in enumerate(token_ids):
            if token == start:
                header = i + 1
            elif token == message:
                said = _messages(tokenizer.decode(token_ids[header:i + 1], skip_special_tokens=False), True)[-1]
                if said.channel != "analysis" and not (said.recipient or "").startswith("functions."):
                    return i + 1
        return len(token_ids)

    def delta(self, index: int, text: str, finished: bool) -> tuple[str, str]:
        """For choice ``index``, its reply being ``text`` so far: ``(thinking not sent yet, answer so far)``."""
        thinking, answer = read(text, finished)
        thinking = thinking or ""
        sent = self.sent.get(index, 0)
        self.sent[index] = max(sent, len(thinking))
        return thinking[sent:], answer


def parse_calls(answer: str) -> tuple[str, list[tuple[str, str]]]:
    """An answer of :func:`read` as its visible text and its calls' ``(name, arguments)``."""
    visible, *calls = answer.split(CALL_OPEN)
    parsed = []
    for call in calls:
        name, _, rest = call.partition(CHANNEL)
        parsed.append((name, rest.partition(MESSAGE)[2]))
    return visible, parsed
