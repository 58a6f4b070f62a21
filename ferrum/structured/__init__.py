"""Structured outputs: a grammar (any JSON object, a JSON schema, a Lark grammar) decides which tokens may come next.

A request with ``SamplingParams(json_schema=...)`` (or ``grammar=...``) gets a :class:`TokenMatcher` from
:func:`matcher_for`; its sampler forbids the tokens the grammar does not allow at each step
and feeds it every accepted token. The grammars are compiled by ``llguidance`` (the engine
behind llama.cpp's, vLLM's and SGLang's guidance backends), against the model's own
``tokenizer.json``.
"""

from ferrum.structured.grammar import DATA_KEYWORDS, TokenMatcher, compiled_schema, matcher_for, prepare
from ferrum.structured.strict import closed_objects

__all__ = ["DATA_KEYWORDS", "TokenMatcher", "closed_objects", "compiled_schema", "matcher_for", "prepare"]
