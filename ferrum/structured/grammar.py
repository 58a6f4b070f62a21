"""Compile a request's grammar against the model's tokenizer, and track it token by token."""

from __future__ import annotations

import functools
import json
import threading
import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from ferrum.errors import InvalidRequestError, UnsupportedFeatureError
from ferrum.structured.strict import closed_objects
from ferrum.structured.thinking import AfterThinking

#: llguidance's view of each tokenizer (building one reads every token's bytes: ~0.5 s), per
#: Ferrum tokenizer and logits width.
_compiled_tokenizers: "weakref.WeakKeyDictionary[Any, dict[int, Any]]" = weakref.WeakKeyDictionary()


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise UnsupportedFeatureError(
            "structured outputs (json_schema) need the llguidance package: pip install llguidance"
        ) from None
    return llguidance


_tokenizer_lock = threading.Lock()  # one build per tokenizer, also when a server builds it ahead of a request


def _lltokenizer(tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> Any:
    with _tokenizer_lock:
        by_width = _compiled_tokenizers.setdefault(tokenizer, {})
        if vocab_size not in by_width:
            llg = _llguidance()
            try:
                by_width[vocab_size] = llg.LLTokenizer(tokenizer.for_llguidance(vocab_size), n_vocab=vocab_size,
                                                       eos_token=sorted(eos_ids))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # also llguidance's Rust panics, pyo3's PanicException (a BaseException):
                # a token of thousands of characters overflows its token trie
                raise UnsupportedFeatureError(f"structured outputs cannot use this model's tokenizer: "
                                              f"{type(exc).__name__}: {exc}") from None
        return by_width[vocab_size]


def prepare(tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> bool:
    """Build llguidance's view of ``tokenizer`` now (the slow part of a model's first structured request),
    so a server can do it off its event loop at startup; False where structured outputs cannot run."""
    if tokenizer is None:
        return False
    try:
        _llguidance()
        _lltokenizer(tokenizer, vocab_size, eos_ids)
    except UnsupportedFeatureError:
        return False
    return True


def _grammar(json_schema: bool | Mapping[str, Any] | None, lark: str | None) -> str:
    """``json_schema`` True: any JSON object (OpenAI's ``json_object`` mode); a mapping: that schema; else the
    Lark grammar."""
    if lark is not None:
        return _llguidance().LLMatcher.grammar_from_lark(lark)
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(json.dumps(compiled_schema(json_schema)))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"json_schema is not a JSON schema Ferrum can compile: {exc}",
                                  param="json_schema") from None
    except RecursionError:  # ~300 levels of nesting: a request body allows 200
        raise InvalidRequestError("json_schema nests too deeply to compile; flatten it, or name the repeated "
                                  "part in $defs and refer to it with $ref", param="json_schema") from None


def compiled_schema(json_schema: bool | Mapping[str, Any]) -> dict[str, Any]:
    """The schema a ``json_schema`` is compiled as: True any JSON object; a schema held strictly (its objects closed
    where they do not say, :func:`~ferrum.structured.strict.closed_objects`), its unknown formats left out."""
    if json_schema is True:
        return {"type": "object"}
    return _without_unknown_formats(closed_objects(dict(json_schema)))


#: Keywords whose values are data, not schemas: a "format" key inside them is not an annotation.
DATA_KEYWORDS = frozenset(("const", "enum", "default", "examples"))


def _without_unknown_formats(schema: Any) -> Any:
    """``schema`` without the ``format`` annotations llguidance cannot enforce (OpenAPI's ``int32``, pydantic's
    ``binary`` or ``path``...): JSON Schema makes a format an annotation, which a validator that does not know it
    ignores; llguidance refuses the whole schema instead. Formats it knows (date-time, email, uuid...) stay."""
    if isinstance(schema, list):
        return [_without_unknown_formats(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: value if key in DATA_KEYWORDS else _without_unknown_formats(value)
            for key, value in schema.items()
            if not (key == "format" and isinstance(value, str) and not _enforced_format(value))}


@functools.lru_cache(maxsize=256)
def _enforced_format(name: str) -> bool:
    grammar = _llguidance().LLMatcher.grammar_from_json_schema(json.dumps({"type": "string", "format": name}))
    failed, warnings = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    return not failed and not warnings


def _error_of(matcher: Any) -> str:
    """llguidance's error in a line (its marker of left-out details dropped)."""
    message = matcher.get_error().replace("<non-verbose/>", "").strip() or "rejected by the grammar"
    return message if len(message) <= 400 else message[:400] + "..."


def _limits() -> Any:
    """llguidance's parser limits, one raised: a row may hold 10,000 Earley items instead of 2,000, so an object
    of up to ~2,500 properties is followed (600 needed 2,407; each step then costs a few ms) where vLLM's
    defaults fail it mid-reply. Errors leave out the parser state and the grammar (``verbose_errors``)."""
    return _llguidance().LLParserLimits(max_items_in_row=10_000, verbose_errors=False)


class TokenMatcher:
    """Where a request stands in its grammar: which tokens may come next, and the tokens it took."""

    def __init__(self, matcher: Any, vocab_size: int):
        self._matcher = matcher
        self._vocab_size = vocab_size

    def forbidden(self) -> np.ndarray:
        """Token ids the grammar does not allow next, int32 ascending (every one but the end of sequence
        once the grammar is complete)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        if self._matcher.is_error():  # e.g. a schema too large for the parser's limits, found only now
            raise InvalidRequestError(f"the requested structure cannot be followed: {_error_of(self._matcher)}")
        allowed = np.unpackbits(bits, bitorder="little")[: self._vocab_size]
        return np.flatnonzero(allowed == 0).astype(np.int32)

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise InvalidRequestError(
                f"token {token} does not continue the requested output: {_error_of(self._matcher)}")

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing more."""
        return self._matcher.is_stopped() and self._matcher.is_accepting()

    def fork(self) -> "TokenMatcher":
        return TokenMatcher(self._matcher.deep_copy(), self._vocab_size)


def matcher_for(params: Any, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int],
                prompt_ids: Sequence[int] = ()) -> Any:
    """A fresh matcher of ``params.json_schema`` or ``params.grammar`` for a model whose logits have
    ``vocab_size`` columns, applied after the thinking where ``params.reasoning_tags`` says (``prompt_ids``
    tell whether the reply starts inside it); one that does not compile is an :class:`InvalidRequestError`
    (raised before the request is queued)."""
    what = "grammar" if params.grammar is not None else "json_schema"
    if tokenizer is None:
        raise InvalidRequestError(f"structured outputs ({what}) need the model's tokenizer; this model has none",
                                  param=what)
    llg = _llguidance()
    grammar = _grammar(params.json_schema, params.grammar)
    matcher = llg.LLMatcher(_lltokenizer(tokenizer, vocab_size, eos_ids), grammar, log_level=0, limits=_limits())
    if matcher.is_error():
        raise InvalidRequestError(f"{what} is not one Ferrum can compile: {_error_of(matcher)}", param=what)
    tokens = TokenMatcher(matcher, vocab_size)
    try:
        tokens.forbidden()  # some grammars fail only at their first mask (a schema nothing satisfies): refused now
    except InvalidRequestError as error:
        raise InvalidRequestError(str(error), param=what) from None
    if params.reasoning_tags is None:
        return tokens
    return AfterThinking(tokens, tokenizer, params.reasoning_tags, prompt_ids, eos_ids)
