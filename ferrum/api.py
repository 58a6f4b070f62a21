"""The user surface: ``ferrum.load(path)`` -> :class:`LLM` with ``generate`` / ``stream``.

Every call goes through one :class:`ferrum.engine.Engine`, so many prompts
(a list given to :meth:`LLM.generate`, several streams, asyncio users via
:meth:`LLM.astream`) share batched forward passes.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable
from numbers import Integral
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

import numpy as np

from ferrum.adapters import AdapterInfo
from ferrum.engine import AsyncEngine, Engine, EngineConfig, RequestOutput
from ferrum.errors import InvalidRequestError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM, ProgressFn
from ferrum.sampling import SamplingParams
from ferrum.spec import SpeculativeConfig, resolve_speculative
from ferrum.sources import resolve_model
from ferrum.tokenizer import Message, Tokenizer
from ferrum.tokenizer_files import has_tokenizer

Prompt = str | Sequence[Message] | Sequence[int]
#: Whether to apply the chat template (None: to message lists only), or the variables to apply it with.
Chat = bool | Mapping[str, Any] | None
_PROMPT_FORMS = "a prompt is a string, a list of chat messages or a list of token ids"


def _is_prompt_list(prompts: Any) -> bool:
    """A list of prompts, as opposed to one prompt given as token ids or chat messages."""
    return (
        not isinstance(prompts, str)
        and isinstance(prompts, Sequence)
        and len(prompts) > 0
        and all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompts)
    )


class LLM:
    """A loaded model with its tokenizer and engine, ready to generate text."""

    def __init__(
        self, executor: LlmExecutor, tokenizer: Tokenizer | None, path: Path, engine_config: EngineConfig | None = None,
        draft_model: DecoderOnlyLLM | None = None,
    ):
        self.executor = executor
        self.model = executor.model
        self.tokenizer = tokenizer
        self.path = path
        self.engine = Engine(executor, tokenizer, engine_config, draft_model=draft_model)
        self._async_engine: AsyncEngine | None = None

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        backend: str | None = None,
        dtype: str | None = None,
        num_kv_blocks: int | None = None,
        max_seq_len: int | None = None,
        progress: ProgressFn | None = None,
        engine_config: EngineConfig | None = None,
        speculative: str | SpeculativeConfig | None = None,
        draft_model: str | Path | None = None,
    ) -> "LLM":
        """``speculative="lookup"`` (prompt lookup) or ``"draft"`` with ``draft_model=PATH`` (a small
        model with the same tokenizer, loaded on the same backend with a KV pool of the same size)
        turns on speculative decoding; a :class:`SpeculativeConfig` sets its knobs. Without ``path``, the
        embedded default model (SmolLM2-135M-Instruct, see :mod:`ferrum.default_model`)."""
        speculative = resolve_speculative(speculative, engine_config and engine_config.speculative,
                                          with_draft_model=draft_model is not None)  # before the slow load
        if path is None:
            from ferrum.default_model import default_model_path

            path = default_model_path(progress)
        path = resolve_model(path, progress)
        model = DecoderOnlyLLM.from_pretrained(
            path, backend=backend, dtype=dtype, num_kv_blocks=num_kv_blocks,
            max_seq_len=max_seq_len, progress=progress,
        )
        tokenizer = Tokenizer(path) if has_tokenizer(path) else None
        rows = model.config.vocab_size
        if tokenizer is not None and tokenizer.vocab_size > rows:
            warnings.warn(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                          f"{rows} rows, so text holding a token from id {rows} on cannot run; the checkpoint's "
                          "tokenizer and weights do not match", stacklevel=2)
        if speculative is not None:
            engine_config = replace(engine_config or EngineConfig(), speculative=speculative)
        drafter = None
        if draft_model is not None:  # its own context, within the one asked for
            drafter = DecoderOnlyLLM.from_pretrained(
                resolve_model(draft_model, progress), backend=model.backend, dtype=model.dtype,
                num_kv_blocks=model.kv.num_blocks, block_size=model.kv.block_size, max_seq_len=max_seq_len,
            )
        return cls(LlmExecutor(model), tokenizer, path, engine_config, draft_model=drafter)

    # -------------------------------------------------------------- adapters
    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Load a LoRA adapter folder (PEFT or mlx-lm format); requests then name it with ``lora=name``.

        Many adapters stay resident at once and requests using different ones
        (or none) share forward passes; see :mod:`ferrum.adapters.registry` for the memory budget.
        """
        return self.model.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Free an adapter no unfinished request uses."""
        self.model.adapters.unload(name)

    @property
    def adapters(self) -> list[AdapterInfo]:
        """The resident adapters."""
        return self.model.adapters.list()

    # --------------------------------------------------------------- prompts
    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError(
                f"{self.path} has no tokenizer (tokenizer.json, tokenizer.model, tokenizer.jsonl or tiktoken "
                "ranks), so text cannot be encoded or decoded; pass token ids"
            )
        return self.tokenizer

    def use_chat_template(self, source: str) -> None:
        """Chat through ``source``, Jinja text, instead of the checkpoint's template (see
        :meth:`Tokenizer.use_chat_template`): the CLI's and the server's ``--chat-template``."""
        self._require_tokenizer().use_chat_template(source)

    def encode_prompt(self, prompt: Prompt, chat: Chat = None, tools: Sequence[dict[str, Any]] | None = None,
                      chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        """Token ids for a text prompt, chat messages or ids.

        ``chat=None`` applies the chat template to message lists only;
        ``chat=True`` also wraps a plain string as one user message; a mapping does what True does and gives
        the template these variables (``chat={"enable_thinking": False}`` for Qwen 3), as
        ``chat_template_kwargs`` does. ``tools`` (OpenAI function definitions) go to the chat template too.
        """
        return self._encode(prompt, chat, tools, chat_template_kwargs)[0]

    def _encode(self, prompt: Prompt, chat: Chat = None, tools: Sequence[dict[str, Any]] | None = None,
                chat_template_kwargs: Mapping[str, Any] | None = None) -> tuple[list[int], bool]:
        """:meth:`encode_prompt`'s ids, and whether they went through the chat template."""
        if not (chat is None or isinstance(chat, (bool, Mapping))):
            raise InvalidRequestError(f"chat must be None, True, False or a mapping of chat template variables, "
                                      f"got {chat!r}")
        if isinstance(chat, Mapping):
            chat_template_kwargs, chat = {**(chat_template_kwargs or {}), **chat}, True
        context = self.model.config.max_seq_len  # text that cannot fit is refused before it is encoded
        if isinstance(prompt, str):
            tok = self._require_tokenizer()
            if chat:
                user = [{"role": "user", "content": prompt}]
                return tok.encode_chat(user, template_kwargs=chat_template_kwargs, max_tokens=context), True
            return tok.encode(prompt, max_tokens=context), False
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise InvalidRequestError(f"{_PROMPT_FORMS}, not bytes: decode text to str first")
        if not isinstance(prompt, Iterable):
            raise InvalidRequestError(f"{_PROMPT_FORMS}, not {type(prompt).__name__}")
        prompt = list(prompt)
        if prompt and all(isinstance(m, dict) for m in prompt):
            if chat is False:
                raise InvalidRequestError("chat messages were given but chat=False")
            tok = self._require_tokenizer()
            return tok.encode_chat(prompt, tools=tools, template_kwargs=chat_template_kwargs, max_tokens=context), True
        if all(isinstance(t, Integral) and not isinstance(t, bool) for t in prompt):
            if chat:
                raise InvalidRequestError("chat applies the chat template to text or messages; token ids are run as "
                                          "they are: leave chat out for them, or give the text")
            return [int(t) for t in prompt], False  # numpy's integers too
        raise InvalidRequestError(_PROMPT_FORMS)

    def _request(self, prompt: Prompt, chat: Chat, params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """A prompt's ids and the params it runs with: an unset ``skip_special_tokens`` is decided here,
        kept for a chat reply in harmony (gpt-oss), whose channels are special tokens, else skipped."""
        tokens, templated = self._encode(prompt, chat)
        if params.skip_special_tokens is None:
            harmony = templated and self.tokenizer is not None and self.tokenizer.writes_harmony
            params = replace(params, skip_special_tokens=not harmony)
        return tokens, params

    @staticmethod
    def sampling_params(params: SamplingParams | Mapping[str, Any] | None = None, **options: Any) -> SamplingParams:
        """``params`` as given (a mapping: its options), or one built from keyword options (not both)."""
        if params is not None:
            if options:
                raise InvalidRequestError("pass either a SamplingParams or sampling keyword options, not both")
            if isinstance(params, Mapping):
                return LLM.sampling_params(None, **params)
            if not isinstance(params, SamplingParams):
                raise InvalidRequestError(f"params must be a ferrum.SamplingParams or a mapping of its options, "
                                          f"not {type(params).__name__}")
            return params
        try:
            return SamplingParams(**options)
        except TypeError as exc:
            raise InvalidRequestError(f"{exc}; see ferrum.SamplingParams for the options") from None

    # ------------------------------------------------------------ generation
    def run(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, chat: Chat = None,
        metadata: Mapping[str, Any] | None = None, lora: str | None = None, **options: Any,
    ) -> list[RequestOutput]:
        """Run many prompts together through the engine; final outputs in prompt order.

        ``metadata`` goes with every prompt's request (see :mod:`ferrum.metadata`);
        ``lora`` names a loaded adapter (:meth:`load_adapter`) every prompt runs with. A lone string is one
        prompt (not one per character).
        """
        params = self.sampling_params(params, **options)
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = [self._request(p, chat, params) for p in prompts]  # all or nothing: encode before submitting
        finals: dict[str, RequestOutput] = {}

        def keep_final(out: RequestOutput) -> None:
            if out.finished:
                finals[out.request_id] = out

        ids: list[str] = []
        try:
            for tokens, request_params in encoded:  # a prompt refused here takes the ones queued before it back out
                ids.append(self.engine.add_request(tokens, request_params, on_output=keep_final, metadata=metadata,
                                                   lora=lora))
            while len(finals) < len(ids):
                self.engine.step()
        finally:
            for request_id in ids:
                if request_id not in finals:
                    self.engine.abort(request_id)
        failed = next((finals[i].error for i in ids if finals[i].error is not None), None)
        if failed is not None:
            raise failed
        return [finals[request_id] for request_id in ids]

    def stream_outputs(
        self, prompt: Prompt, params: SamplingParams | None = None, chat: Chat = None,
        metadata: Mapping[str, Any] | None = None, lora: str | None = None, **options: Any,
    ) -> Iterator[RequestOutput]:
        """Yield a request's outputs step by step; closing the iterator early aborts it.

        Other requests in the engine advance in the same steps.
        """
        tokens, params = self._request(prompt, chat, self.sampling_params(params, **options))
        pending: deque[RequestOutput] = deque()
        request_id = self.engine.add_request(tokens, params, on_output=pending.append, metadata=metadata, lora=lora)
        finished = False
        try:
            while not finished:
                while not pending:
                    self.engine.step()
                out = pending.popleft()
                finished = out.finished
                if out.error is not None:
                    raise out.error
                yield out
        finally:
            if not finished:
                self.engine.abort(request_id)

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, chat: Chat = None,
        metadata: Mapping[str, Any] | None = None, lora: str | None = None, **options: Any,
    ) -> Iterator[str]:
        """Yield the generated text piece by piece (never half a character, never part of a stop string)."""
        self._require_tokenizer()
        for out in self.stream_outputs(prompt, params, chat, metadata, lora, **options):
            if out.new_text:
                yield out.new_text

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None, chat: Chat = None,
        metadata: Mapping[str, Any] | None = None, lora: str | None = None, **options: Any,
    ) -> str | list[str]:
        """The completion of one prompt, or the completions of a list of prompts (batched)."""
        self._require_tokenizer()
        if _is_prompt_list(prompts):
            return [out.text for out in self.run(prompts, params, chat, metadata, lora, **options)]
        return self.run([prompts], params, chat, metadata, lora, **options)[0].text

    # --------------------------------------------------------------- asyncio
    @property
    def async_engine(self) -> AsyncEngine:
        """The engine stepped by a background thread, for asyncio applications (a new one where an interrupt in
        the last one's thread stopped it; one shut down stays so, and refuses new requests)."""
        if self._async_engine is None or self._async_engine.broken is not None:
            self._async_engine = AsyncEngine(self.engine)
        return self._async_engine

    async def astream(
        self, prompt: Prompt, params: SamplingParams | None = None, chat: Chat = None,
        metadata: Mapping[str, Any] | None = None, lora: str | None = None, **options: Any,
    ) -> AsyncIterator[str]:
        """Async version of :meth:`stream`; concurrent calls are batched together."""
        self._require_tokenizer()
        tokens, params = self._request(prompt, chat, self.sampling_params(params, **options))
        async for out in self.async_engine.stream(tokens, params, metadata=metadata, lora=lora):
            if out.new_text:
                yield out.new_text
