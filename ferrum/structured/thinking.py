"""A reasoning model's thinking left free: the grammar applies to the answer after ``</think>``.

Forcing a schema from a reply's first token would stop Qwen 3, QwQ or DeepSeek-R1 from thinking (the grammar
forbids ``<think>``), or, where the template opened the thinking in the prompt, make the model write its
JSON inside its thinking. So, as vLLM does with a reasoning parser, a request with ``reasoning_tags`` is
unconstrained while it thinks; the grammar takes over once the closing tag is out. A reply that does not
start inside its thinking may open one as its first token, or answer at once. A few whitespace tokens may
come before the answer ("</think>\\n\\n{...}"), which a JSON grammar would refuse; the end of sequence is
forbidden while thinking, so a finished reply always holds its answer.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ferrum.errors import InvalidRequestError

#: Whitespace-only tokens allowed before the answer, at most: room for "\n\n" however it is split.
_LEADING_SPACE_TOKENS = 4
_SPACES = (" ", "  ", "\n", "\n\n", "\t", "\r\n")


def tag_ids(tokenizer: Any, tags: tuple[str, str]) -> tuple[int, int]:
    """The token ids of the opening and closing tags; each must be one token of the vocabulary."""
    ids = tuple(tokenizer.token_to_id(tag) for tag in tags)
    missing = [tag for tag, i in zip(tags, ids) if i is None]
    if missing:
        raise InvalidRequestError(
            f"reasoning_tags {missing[0]!r} is not one token of this model's vocabulary; structured outputs "
            "can follow thinking only between tags the tokenizer has as single tokens (Qwen 3, DeepSeek-R1)"
        )
    return ids  # type: ignore[return-value]


def _space_ids(tokenizer: Any) -> np.ndarray:
    ids = {ids[0] for ids in (tokenizer.encode(s, add_special_tokens=False) for s in _SPACES) if len(ids) == 1}
    return np.array(sorted(ids), dtype=np.int32)


class AfterThinking:
    """A :class:`~ferrum.structured.TokenMatcher` (``answer``) that waits for the thinking to end."""

    def __init__(self, answer: Any, tokenizer: Any, tags: tuple[str, str], prompt_ids: Sequence[int],
                 eos_ids: frozenset[int]):
        self.answer = answer
        self.open_id, self.close_id = tag_ids(tokenizer, tags)
        prompt = np.asarray(prompt_ids)
        opened, closed = (np.flatnonzero(prompt == t) for t in (self.open_id, self.close_id))
        self.thinking = opened.size > 0 and (closed.size == 0 or opened[-1] > closed[-1])  # opened by the template
        self.may_open = not self.thinking
        self.spaces = _space_ids(tokenizer)
        self.spaces_left = _LEADING_SPACE_TOKENS
        self.started = False  # the answer's first token is out: the grammar alone decides
        self._grammar_forbids: np.ndarray | None = None  # before the answer: what the grammar alone forbade last
        self._eos = np.array(sorted(eos_ids), dtype=np.int32)

    def forbidden(self) -> np.ndarray:
        if self.thinking:
            return self._eos
        forbidden = self.answer.forbidden()
        if self.started:
            return forbidden
        self._grammar_forbids = forbidden
        extra = self.spaces if self.spaces_left else self.spaces[:0]
        if self.may_open:
            extra = np.append(extra, np.int32(self.open_id))
        return np.setdiff1d(forbidden, extra).astype(np.int32)

    def consume(self, token: int) -> None:
        forbids, self._grammar_forbids = self._grammar_forbids, None  # this step's, used once
        if self.thinking:
            self.thinking = token != self.close_id
        elif self.started:
            self.answer.consume(token)
        elif self.may_open and token == self.open_id:
            self.thinking, self.may_open = True, False
        elif self.spaces_left and token in self.spaces and not self._grammar_allows(token, forbids):
            self.spaces_left -= 1
            self.may_open = False
        else:
            self.answer.consume(token)
            self.started = True

    def _grammar_allows(self, token: int, forbids: np.ndarray | None) -> bool:
        """Whether the grammar itself takes ``token`` (a grammar whose text may begin with a space gets it)."""
        if forbids is None:
            forbids = self.answer.forbidden()
        i = np.searchsorted(forbids, token)
        return not (i < forbids.size and forbids[i] == token)

    @property
    def complete(self) -> bool:
        return self.started and self.answer.complete

    def fork(self) -> "AfterThinking":
        twin = object.__new__(AfterThinking)
        twin.__dict__.update(self.__dict__, answer=self.answer.fork())
        return twin
