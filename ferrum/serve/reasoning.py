"""A reasoning model's thinking (``<think> ... </think>``), returned apart from its answer as
``reasoning_content`` when the server runs with ``--reasoning-parser`` (vLLM's option and field).

Qwen 3 writes the opening tag itself; DeepSeek-R1's template opens it in the prompt, so that reply
starts inside its thinking with no tag of its own. Which of the two holds is read from the end of the
rendered prompt, so one parser serves both (vLLM's ``qwen3`` and ``deepseek_r1`` are accepted by name).
A reply cut off before ``</think>`` is all thinking; a reply without thinking is all answer.
"""

from __future__ import annotations

from typing import Any, Sequence

from ferrum.stop import cut_marker

OPEN, CLOSE = "<think>", "</think>"
#: ``--reasoning-parser`` values: vLLM's names for the models that think between these tags, and for gpt-oss,
#: whose harmony replies are always read apart (:mod:`ferrum.serve.harmony`).
PARSERS = ("deepseek_r1", "qwen3", "openai_gptoss")


def structured_tags(tokenizer: object) -> tuple[str, str] | None:
    """The tags for ``SamplingParams.reasoning_tags`` (a response format or forced tool call then shapes the
    answer after the thinking), where the tokenizer has each as one token; else None: the grammar applies
    from the reply's first token."""
    if all(tokenizer.token_to_id(tag) is not None for tag in (OPEN, CLOSE)):  # type: ignore[attr-defined]
        return OPEN, CLOSE
    return None


def thinking_tokens(tokenizer: Any, token_ids: Sequence[int], thought: str | None) -> int:
    """How many of a reply's tokens are its thinking, as OpenAI counts reasoning tokens: through the closing tag
    where it is one token (every token where the reply never closed it), else the thinking text's tokens."""
    if thought is None:
        return 0
    close = tokenizer.token_to_id(CLOSE)
    if close is not None:
        return list(token_ids).index(close) + 1 if close in token_ids else len(token_ids)
    return min(len(tokenizer.encode(thought, add_special_tokens=False)), len(token_ids))


def starts_inside(prompt_tail: str) -> bool:
    """Whether a reply to a prompt ending in ``prompt_tail`` begins inside its thinking: the template opened
    a ``<think>`` that it did not close."""
    return prompt_tail.rfind(OPEN) > prompt_tail.rfind(CLOSE)


class Thinking:
    """One chat request's replies split into thinking and answer, whole or as a stream."""

    keeps_special_tokens = False  # the tags are read from the text as it decodes by default

    def __init__(self, inside: bool):
        self.inside = inside
        self.sent: dict[int, int] = {}  # per choice, the characters of thinking sent

    def split(self, text: str) -> tuple[str | None, str]:
        """``(thinking, answer)``: thinking is None where the reply has none; the answer is what follows
        ``</think>``, its leading whitespace dropped."""
        head = text.lstrip()
        inside = self.inside
        if head.startswith(OPEN):
            text, inside = head[len(OPEN):], True
        if not inside:
            return None, text
        end = text.find(CLOSE)
        if end < 0:
            return text, ""
        return text[:end], text[end + len(CLOSE):].lstrip()

    def answer_start(self, text: str, token_ids: Sequence[int], tokenizer: Any) -> int:
        """Where the answer of a reply (``text``, its tokens ``token_ids``, so far) begins among its tokens: 0
        without thinking, else after ``</think>`` (one token of this tokenizer) and the whitespace ``split``
        drops; the reply's length while it thinks."""
        if self.split(text)[0] is None:
            return 0
        close = tokenizer.token_to_id(CLOSE)
        if close not in token_ids:
            return len(token_ids)
        start = list(token_ids).index(close) + 1
        while start < len(token_ids) and not tokenizer.decode([token_ids[start]]).strip():
            start += 1
        return start

    def delta(self, index: int, text: str, finished: bool) -> tuple[str, str]:
        """For choice ``index``, its reply being ``text`` so far: ``(thinking not sent yet, answer so far)``,
        holding back what may be the start of a tag until the next piece (or the end) decides it."""
        if not finished and not self.inside and OPEN.startswith(text.lstrip()):
            return "", ""  # "<thi", or only whitespace yet: the reply may be opening its thinking
        thinking, answer = self.split(text)
        if thinking is None:
            return "", answer
        ready = len(thinking) if finished or CLOSE in text else len(thinking) - cut_marker(thinking, CLOSE)
        sent = self.sent.get(index, 0)
        self.sent[index] = max(sent, ready)
        return thinking[sent:ready], answer
