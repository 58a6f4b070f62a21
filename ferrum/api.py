"""The user surface: ``ferrum.load(path)`` -> :class:`LLM` with ``generate`` / ``stream``."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator, Sequence

from ferrum.errors import InvalidRequestError
from ferrum.executor import LlmExecutor
from ferrum.executor_api import DecodeInput, PrefillInput
from ferrum.model import DecoderOnlyLLM, ProgressFn
from ferrum.sampling import RequestSampler, SamplingParams, sample_batch
from ferrum.stop import StopStringFilter
from ferrum.tokenizer import IncrementalDetokenizer, Message, Tokenizer

Prompt = str | Sequence[Message] | Sequence[int]


class LLM:
    """A loaded model with its tokenizer, ready to generate text."""

    def __init__(self, executor: LlmExecutor, tokenizer: Tokenizer | None, path: Path):
        self.executor = executor
        self.model = executor.model
        self.tokenizer = tokenizer
        self.path = path
        self._ids = itertools.count()

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: str | None = None,
        dtype: str | None = None,
        num_kv_blocks: int | None = None,
        max_seq_len: int | None = None,
        progress: ProgressFn | None = None,
    ) -> "LLM":
        path = Path(path)
        model = DecoderOnlyLLM.from_pretrained(
            path, backend=backend, dtype=dtype, num_kv_blocks=num_kv_blocks,
            max_seq_len=max_seq_len, progress=progress,
        )
        tokenizer = Tokenizer(path) if (path / "tokenizer.json").exists() else None
        return cls(LlmExecutor(model), tokenizer, path)

    # --------------------------------------------------------------- prompts
    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError(
                f"{self.path} has no tokenizer.json, so text prompts cannot be encoded; pass token ids"
            )
        return self.tokenizer

    def encode_prompt(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a text prompt, chat messages or ids.

        ``chat=None`` applies the chat template to message lists only;
        ``chat=True`` also wraps a plain string as one user message.
        """
        if isinstance(prompt, str):
            tok = self._require_tokenizer()
            if chat:
                return tok.encode_chat([{"role": "user", "content": prompt}])
            return tok.encode(prompt)
        prompt = list(prompt)
        if prompt and all(isinstance(m, dict) for m in prompt):
            if chat is False:
                raise InvalidRequestError("chat messages were given but chat=False")
            return self._require_tokenizer().encode_chat(prompt)
        if all(isinstance(t, int) for t in prompt):
            return prompt
        raise InvalidRequestError("a prompt is a string, a list of chat messages or a list of token ids")

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids.update(self.model.config.eos_token_ids)
            if self.tokenizer is not None:
                ids.update(self.tokenizer.eos_token_ids)
        return frozenset(ids)

    # ------------------------------------------------------------ generation
    def generate_tokens(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yield sampled token ids until a stop token or ``max_tokens``.

        The stop token itself is not yielded. The sequence's KV cache is
        released when the generator finishes or is closed early.
        """
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        cache_id = ("generate", next(self._ids))
        sampler = RequestSampler(params, prompt_ids)
        ops = self.model.backend.ops
        stop_ids = self._stop_ids(params)
        output: list[int] = []
        logits = self.executor.prefill(PrefillInput(cache_id, prompt_ids)).logits
        try:
            while True:
                token = sample_batch(ops, ops.from_numpy(logits[None], None), [sampler])[0].token
                if token in stop_ids:
                    return
                output.append(token)
                sampler.record(token)
                yield token
                if len(output) >= params.max_tokens:
                    return
                position = len(prompt_ids) + len(output) - 1
                logits = self.executor.decode(DecodeInput(cache_id, token, position)).logits
        finally:
            self.executor.release_cache(cache_id)

    def stream(
        self,
        prompt: Prompt,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Yield the generated text piece by piece (never half a character)."""
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **sampling
        )
        prompt_ids = self.encode_prompt(prompt, chat)
        detok = IncrementalDetokenizer(self._require_tokenizer(), prompt_ids)
        stops = StopStringFilter(params.stop)
        tokens = self.generate_tokens(prompt_ids, params)
        try:
            for token in tokens:
                piece = stops.feed(detok.push(token))
                if piece:
                    yield piece
                if stops.stopped:
                    return
            tail = stops.feed(detok.flush()) + stops.flush()
            if tail:
                yield tail
        finally:
            tokens.close()

    def generate(self, prompt: Prompt, max_tokens: int = 256, **kwargs: Any) -> str:
        """The whole completion as one string (see :meth:`stream` for options)."""
        return "".join(self.stream(prompt, max_tokens=max_tokens, **kwargs))
