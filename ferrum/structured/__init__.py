"""Structured outputs: a grammar (any JSON object, a JSON schema, a Lark grammar) decides which tokens may come next.

A request with ``SamplingParams(json_schema=...)`` (or ``grammar=...``) gets a :class:`TokenMatcher` from
:func:`matcher_for`; its sampler forbids the tokens the grammar does not allow at each step
and feeds it every accepted token. The grammars are compiled by ``llguidance`` (the engine
behind llama.cpp's, vLLM's and SGLang's guidance backends), against the model's own
``tokenizer.json``.
"""

from ferrum.structured.grammar import DATA_KEYWORDS, TokenMatcher, matcher_for, prepare

__all__ = ["DATA_KEYWORDS", "TokenMatcher", "matcher_for", "prepare"]
