"""``/v1/chat/completions`` and ``/v1/completions`` (and the chat run ``/v1/responses`` reuses): request in, engine
requests, OpenAI-shaped response out.

Response shapes follow the OpenAI API reference (and what vLLM sends where
it is silent): a stream sends per choice a role chunk, content deltas and a
chunk with ``finish_reason``; with ``stream_options.include_usage`` one last
chunk with empty ``choices`` carries the usage; then ``data: [DONE]``. An
error after the stream has started (status 200 already sent) goes out as a
``data: {"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Iterable, Sequence

import numpy as np

from ferrum.api import LLM
from ferrum.engine import AsyncEngine, FinishReason, RequestOutput
from ferrum.errors import ChatTemplateError, ContextLengthExceededError, FerrumError
from ferrum.metadata import REQUIRE_FULL_LOGITS
from ferrum.sampling import SampledToken, SamplingParams, log_softmax
from ferrum.tokenizer import IncrementalDetokenizer, Tokenizer
from ferrum.serve.errors import APIError
from ferrum.serve.generation import ChoiceSpec, Generation
from ferrum.serve.metrics import ServerMetrics
from ferrum.serve.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, _Common, template_messages,
)
from ferrum.serve.harmony import HarmonyThinking
from ferrum.serve.reasoning import Thinking, starts_inside, structured_tags, thinking_tokens
from ferrum.serve.tools import (ToolReplies, call_or_answer_grammar, forced_call_grammar, format_of as tools_format_of,
                                raw_arguments_in)

#: JSON has no infinities; a token the logit bias banned gets this logprob (as vLLM sends).
_MIN_LOGPROB = -9999.0
_SEED_MODULUS = 2**64


@dataclass
class ServerState:
    """What every handler shares: the model, its engine, names, limits and metrics."""

    llm: LLM
    engine: AsyncEngine
    metrics: ServerMetrics
    model_names: tuple[str, ...]
    max_pending: int  # engine requests (choices) running or queued at once
    sampling_defaults: dict[str, float] = field(default_factory=dict)  # from generation_config.json
    reasoning_parser: str | None = None  # --reasoning-parser: thinking returned apart as reasoning_content
    created: int = field(default_factory=lambda: int(time.time()))
    pending: int = 0
    structured_ready: Any = None  # startup's future: True once structured outputs are ready, False if they cannot run

    @property
    def max_model_len(self) -> int:
        """The longest sequence a request may grow to: the model's context, or the KV pool where it holds less."""
        model = self.llm.model
        return min(model.config.max_seq_len, model.kv_capacity())

    def adapter_names(self) -> list[str]:
        return [a.name for a in self.llm.adapters]

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None for the base model); 404 for anything else."""
        if name is None or name in self.model_names:
            return None
        if name in self.adapter_names():
            return name
        served = ", ".join([*self.model_names, *self.adapter_names()])
        raise APIError(
            404, f"the model {name!r} does not exist; this server serves {served}",
            param="model", code="model_not_found",
        )


class Response:
    """The engine work behind a reply, and either the reply body to await or a stream of SSE lines."""

    def __init__(
        self, generation: Generation, body: Awaitable[dict] | None, stream: AsyncIterator[str] | None
    ):
        self.generation, self.body, self.stream = generation, body, stream


# --------------------------------------------------------------------- params
def _sampling_params(
    state: ServerState, body: _Common, max_tokens: int, logprobs: int, seed: int | None, stops: list[str],
    keep_special_tokens: bool = False, grammar: str | None = None, thinks: bool = False,
    needs_special_tokens: bool = False,
) -> SamplingParams:
    """``keep_special_tokens``: what an unset ``skip_special_tokens`` means is to keep them;
    ``needs_special_tokens``: kept whatever the request says (a gpt-oss reply is read by its markers, which vLLM
    reads from the token ids); ``grammar``: a forced tool call's, else ``response_format`` shapes the reply;
    ``thinks``: after the thinking, where there is one (``--reasoning-parser``)."""
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()):  # int() would take " 7", "1_0" and other scripts' digits
            raise APIError(400, f"logit_bias keys are token ids (decimal digits), got {key!r}", param="logit_bias")
        token = key.lstrip("0") or "0"
        if len(token) > 18:  # no vocabulary is near it (and int() refuses past 4,300 digits)
            raise APIError(400, f"logit_bias key {key[:40]}... is no token id of this model", param="logit_bias")
        bias[int(token)] = float(value)
    defaults = state.sampling_defaults
    skip_special = body.skip_special_tokens

    def pick(name: str, api_default: float) -> Any:
        value = getattr(body, name)
        return value if value is not None else defaults.get(name, api_default)

    schema = body.output_schema() if grammar is None else None
    shaped = schema is not None or grammar is not None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=int(pick("top_k", 0)),
        min_p=pick("min_p", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=bias,
        seed=seed,
        stop=tuple(stops),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=False if needs_special_tokens else (
            not keep_special_tokens if skip_special is None else skip_special),
        json_schema=schema,
        grammar=grammar,
        reasoning_tags=structured_tags(state.llm.tokenizer) if thinks and shaped else None,
    )


def _max_tokens(state: ServerState, prompt_len: int, requested: int | None, prompt_param: str) -> int:
    """The request's limit, or all the room the context and the KV pool leave; 0 (scoring the prompt) takes
    a prompt as long as the context."""
    model = state.llm.model
    context = model.config.max_seq_len
    if prompt_len > context or (prompt_len == context and requested != 0):
        raise APIError(
            400, f"the prompt has {prompt_len} tokens but this model's context length is {context}; "
            "shorten the prompt", param=prompt_param, code="context_length_exceeded",
        )
    if requested is None:
        return max(1, min(context, model.kv_capacity()) - prompt_len)
    if prompt_len + requested > context:
        raise APIError(
            400, f"this model's context length is {context} tokens, but the prompt ({prompt_len}) plus "
            f"max_tokens ({requested}) asks for {prompt_len + requested}; lower max_tokens",
            param="max_tokens", code="context_length_exceeded",
        )
    return requested


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Each choice gets its own stream of draws (same seed -> same choices); OpenAI seeds may be negative."""
    return None if seed is None else (seed + index) % _SEED_MODULUS


async def _encode(state: ServerState, prompt: str | Sequence[Any], param: str,
                  tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                  ) -> tuple[int, ...]:
    """The prompt's token ids, found in a worker thread: a chat template and the tokenizer take ~3 ms per 1,000
    tokens here (a 100,000-token prompt 0.3 s), which on the event loop would stall every stream."""
    return await asyncio.to_thread(_encode_now, state, prompt, param, tools, template_kwargs)


def _encode_now(state: ServerState, prompt: str | Sequence[Any], param: str, tools: list[dict[str, Any]] | None,
                template_kwargs: dict[str, Any] | None) -> tuple[int, ...]:
    try:
        return tuple(state.llm.encode_prompt(prompt, tools=tools, chat_template_kwargs=template_kwargs))
    except FerrumError as error:
        raise _encoding_error(error, prompt, param) from None
    except Exception as error:  # a chat template's raise_exception, or one that breaks on this input
        raise APIError(400, f"the chat template failed on these messages: {error}", param=param) from None


def _encoding_error(error: FerrumError, prompt: Any, param: str) -> APIError:
    """The 400 for a prompt that could not be encoded: where a chat template failed on messages holding a call
    whose arguments are no JSON object, it names that call, the likely cause (templates that read arguments as an
    object cannot render text)."""
    where = raw_arguments_in(prompt) if isinstance(error, ChatTemplateError) else None
    if getattr(error, "param", None) not in (None, "prompt"):  # another field of the request (template kwargs)
        param = error.param
    if isinstance(error, ContextLengthExceededError):  # a text too long is refused before it is encoded
        return APIError(400, str(error), param=param, code="context_length_exceeded")
    if where is None:
        return APIError(400, str(error), param=param)
    return APIError(400, f"{error}; {where}.function.arguments is not a JSON object, and this model's chat template "
                    "reads a call's arguments as one: send them as JSON object text", param=where)


# -------------------------------------------------------------- run and reply
#: Ferrum's names of a request's arguments (``InvalidRequestError.param``) as chat requests name them (the
#: Responses API renames them once more); legacy completions name them as Ferrum does.
_CHAT_FIELDS = {"prompt": "messages", "json_schema": "response_format", "grammar": "tools",
                "logprobs": "top_logprobs"}


async def _start(state: ServerState, endpoint: str, specs: list[ChoiceSpec]) -> Generation:
    if len(specs) > state.max_pending:
        raise APIError(
            400, f"this request asks for {len(specs)} choices but the server runs or queues at most "
            f"{state.max_pending} at once; lower n (or the number of prompts)", param="n",
        )
    if state.pending + len(specs) > state.max_pending:
        raise APIError(
            429, f"the server is at capacity ({state.max_pending} requests running or queued); retry shortly",
            code="server_busy", headers={"Retry-After": "1"},
        )

    started = False  # a request refused at submission counts as rejected (its status), not as aborted choices

    def ended(out: RequestOutput | None) -> None:
        state.pending -= 1
        if out is not None:
            state.metrics.finished(endpoint, out)
        elif started:
            state.metrics.requests.labels(endpoint, "abort").inc()

    state.pending += len(specs)  # before any await: requests arriving meanwhile see these choices
    generation = Generation(state.engine, specs, ended)  # which ends each one (``ended``) whatever happens
    try:
        await generation.start()
    except FerrumError as error:
        raise APIError.from_ferrum(error, None if endpoint == "completions" else _CHAT_FIELDS) from None
    started = True
    return generation


def _finish_reason(out: RequestOutput) -> str:
    if out.finish_reason is FinishReason.ABORT:
        raise APIError(503, "the request was aborted: the server is shutting down", code="aborted")
    return out.finish_reason.value


def generated_tokens(out: RequestOutput) -> int:
    """Tokens the model generated: those returned, and the end-of-sequence or stop token that ended it (computed
    like the others, though not returned), as vLLM counts them."""
    return len(out.token_ids) + isinstance(out.stop_reason, int)


def _usage(prompts: list[tuple[int, ...]], finals: dict[int, RequestOutput], first_of_prompt: set[int],
           completion_tokens: bool = True, reasoning_tokens: int | None = None) -> dict:
    """``completion_tokens=False``: the generated tokens were not returned (a scoring-only request);
    ``reasoning_tokens``: of the completion's, those of thinking (a chat reply read for it)."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(generated_tokens(out) for out in finals.values()) if completion_tokens else 0
    cached = sum(finals[i].metrics.num_cached_tokens for i in first_of_prompt if i in finals)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


async def _event_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """``events``, then ``[DONE]``; an error after the 200 went out becomes an error event before it."""
    try:
        async for event in events:
            yield event
    except Exception as error:
        yield _sse(APIError.of(error).body())
    yield "data: [DONE]\n\n"


async def _finals(generation: Generation) -> dict[int, RequestOutput]:
    finals = {}
    async for index, out in generation.events():
        if out.finished:
            finals[index] = out
    return finals


class Logprobs:
    """Token strings and bytes for logprob entries."""

    def __init__(self, llm: LLM):
        self.tok = llm.tokenizer

    def token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tok.token_bytes(token_id) if self.tok is not None else str(token_id).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)

    @staticmethod
    def value(logprob: float | None) -> float:
        return _MIN_LOGPROB if logprob is None or logprob != logprob or logprob < _MIN_LOGPROB else logprob

    def chat(self, picks: Sequence[SampledToken], top: int) -> dict:
        content = []
        for pick in picks:
            text, raw = self.token(pick.token)
            alternatives = []
            for token_id, lp in pick.top_logprobs[:top]:
                t, b = self.token(token_id)
                alternatives.append({"token": t, "logprob": self.value(lp), "bytes": b})
            content.append({"token": text, "logprob": self.value(pick.logprob), "bytes": raw,
                            "top_logprobs": alternatives})
        return {"content": content, "refusal": None}

    def offsets(self, start: int, context: Sequence[int] = (), skip_special: bool = True) -> TextOffsets:
        return TextOffsets(self.tok, start, context, skip_special)

    def prompt(self, prompt: Sequence[int], logits: np.ndarray, top: int, offsets: Sequence[int]) -> dict:
        """The completions form for the prompt's own tokens (``echo``): each one's logprob under the logits of
        the position before it (``logits`` row ``i`` predicts token ``i + 1``); the first has none. ``offsets``:
        where each token starts in the echoed prompt."""
        rows = log_softmax(logits[: len(prompt) - 1].astype(np.float32))
        tokens, values, tops = [], [None], [None]
        for position, token_id in enumerate(prompt):
            text = self.token(token_id)[0]
            tokens.append(text)
            if position == 0:
                continue
            row = rows[position - 1]
            values.append(self.value(float(row[token_id])))
            best = np.argsort(-row)[:top] if top else ()
            alternatives = {}
            for t in best:
                alternatives.setdefault(self.token(int(t))[0], self.value(float(row[t])))
            alternatives.setdefault(text, values[-1])
            tops.append(alternatives)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": list(offsets)}

    def completion(self, picks: Sequence[SampledToken], top: int, offsets: TextOffsets) -> dict:
        tokens, values, tops = [], [], []
        for pick in picks:
            text, _ = self.token(pick.token)
            tokens.append(text)
            values.append(self.value(pick.logprob))
            alternatives: dict[str, float] = {}
            for token_id, lp in pick.top_logprobs[:top]:  # best first; tokens spelt alike keep the best
                alternatives.setdefault(self.token(token_id)[0], self.value(lp))
            alternatives.setdefault(text, self.value(pick.logprob))  # the sampled token is always listed
            tops.append(alternatives)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets.of(pick.token for pick in picks)}


class TextOffsets:
    """Where each token's text starts in a choice's text: after the text the tokens before it completed, as the
    engine's detokenizer writes it. A token holding part of a character starts where that character does, and a
    skipped special token adds nothing (a token's own spelling, U+FFFD for a byte, would drift the offsets)."""

    def __init__(self, tok: Tokenizer | None, start: int, context: Sequence[int] = (), skip_special: bool = True):
        self._detokenizer = IncrementalDetokenizer(tok, context, skip_special) if tok is not None else None
        self.at = start

    def of(self, tokens: Iterable[int]) -> list[int]:
        offsets = []
        for token in tokens:
            if self._detokenizer is None:
                offsets.append(self.at)
                self.at += len(str(token))
                continue
            text = self._detokenizer.push(token)
            offsets.append(self.at + self._detokenizer.earlier)  # after the U+FFFD of bytes it did not complete
            self.at += len(text)
        return offsets


#: Logits kept for a prompt's own logprobs (``echo`` with ``logprobs``): float32, every position by the vocabulary.
_PROMPT_LOGITS_BYTES = 1 << 30


def _check_prompt_logits(state: ServerState, prompts: list[tuple[int, ...]], choices_each: int) -> None:
    """Every choice keeps its prompt's logits until it finishes: all of them together stay under the bound."""
    vocab = state.llm.model.config.vocab_size
    positions = sum(len(p) for p in prompts) * choices_each
    if positions * vocab * 4 > _PROMPT_LOGITS_BYTES:
        raise APIError(400, f"echo with logprobs keeps the logits of every prompt position: {positions} positions "
                       f"(prompts x n) x {vocab} tokens is over {_PROMPT_LOGITS_BYTES >> 20} MiB; score fewer or "
                       "shorter prompts per request", param="prompt")


def _joined(first: dict, then: dict) -> dict:
    """Two completions logprob objects, one after the other (the prompt's, then the generated tokens')."""
    return {"tokens": first["tokens"] + then["tokens"],
            "token_logprobs": first["token_logprobs"] + then["token_logprobs"],
            "top_logprobs": first["top_logprobs"] + then["top_logprobs"],
            "text_offset": first["text_offset"] + then["text_offset"]}


def _new_picks(out: RequestOutput) -> Sequence[SampledToken]:
    if not out.logprobs:
        return ()
    return out.logprobs[len(out.token_ids) - len(out.new_token_ids):]


def _with_stop_pick(picks: Sequence[SampledToken], out: RequestOutput) -> Sequence[SampledToken]:
    """A completion's picks and, once it ended on one, the end-of-sequence or stop token's: OpenAI and vLLM list
    that token among the logprobs (not the text), and scoring clients (lm-eval) read the last entry as the last
    token generated."""
    return picks if out.stop_logprobs is None else (*picks, out.stop_logprobs)


# ------------------------------------------------------------------------ chat
def _tool_replies(state: ServerState, body: ChatCompletionRequest) -> ToolReplies:
    tools = body.active_tools()
    template = state.llm.tokenizer.tool_chat_template
    fmt = tools_format_of(template) if tools else None
    if tools and fmt is None:
        raise APIError(400, "this model's chat template does not describe tools to it, so it cannot call them; "
                       "send the request without tools", param="tools")
    replies = ToolReplies(tools, fmt, single=body.parallel_tool_calls is False)
    forced, schema = body.forced_tools(tools), body.output_schema()
    if forced is not None:
        if schema is not None:
            raise APIError(400, "a forced tool call and response_format cannot both shape the reply",
                           param="response_format")
        many = body.tool_choice == "required" and body.parallel_tool_calls is not False
        replies.grammar = forced_call_grammar(fmt, forced, state.llm.tokenizer, template, many)
    elif tools and schema is not None:  # calls, or the answer in the schema (the schema over all left no call)
        replies.grammar = call_or_answer_grammar(fmt, tools, state.llm.tokenizer, template, schema,
                                                 many=body.parallel_tool_calls is not False)
    return replies


def _thinking(state: ServerState, prompt: Sequence[int]) -> Thinking | HarmonyThinking | None:
    """How this prompt's replies split into thinking and answer: always for a model that writes harmony
    (gpt-oss: its reply is messages, not text), else with ``--reasoning-parser``."""
    if state.llm.tokenizer.writes_harmony:
        return HarmonyThinking()
    if state.reasoning_parser is None:
        return None
    return Thinking(starts_inside(state.llm.tokenizer.decode(prompt[-8:], skip_special_tokens=False)))


@dataclass
class ChatRun:
    """A chat request's engine work and how its replies are read: thinking apart (``--reasoning-parser``), then
    the content and tool calls."""

    generation: Generation
    prompt: tuple[int, ...]
    replies: ToolReplies
    thinking: Thinking | HarmonyThinking | None

    def split(self, out: RequestOutput) -> tuple[str | None, dict[str, Any], str]:
        """A finished choice's thinking (None without), message and finish reason."""
        thought, answer = self.thinking.split(out.text or "") if self.thinking else (None, out.text or "")
        message, reason = self.replies.message(answer, _finish_reason(out))
        return thought, message, reason

    def opening(self) -> dict[str, Any]:
        """A streamed choice's first delta."""
        return {"role": "assistant", "content": self.replies.no_content}

    def advance(self, index: int, out: RequestOutput) -> tuple[str, str, tuple[list[dict[str, Any]], str] | None]:
        """Streamed choice ``index``, its output now ``out``: the thinking and the content not sent yet, and once it
        has finished, its last deltas (calls, text after them) and finish reason; all of it adds up to
        :meth:`split`'s."""
        text, thought = out.text or "", ""
        if self.thinking is not None:
            thought, text = self.thinking.delta(index, text, out.finished)
        content = self.replies.delta(index, text, out.finished)
        return thought, content, self.replies.ending(text, _finish_reason(out)) if out.finished else None


async def start_chat(state: ServerState, body: ChatCompletionRequest, endpoint: str = "chat") -> ChatRun:
    """Check the request, build its prompt and submit its choices; any bad input raises before a response."""
    lora = state.check_model(body.model)
    body.check_supported()
    if state.llm.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so chat messages cannot be encoded; use /v1/completions "
                       "with token ids")
    replies = _tool_replies(state, body)
    prompt = await _encode(state, template_messages(body.messages), "messages", replies.tools,
                           body.template_variables())
    max_tokens = _max_tokens(state, len(prompt), body.max_new_tokens(), "messages")
    want_logprobs = max(body.top_logprobs or 0, 1) if body.logprobs else 0
    stops = body.stop_strings() + replies.stops
    thinking = _thinking(state, prompt)
    keeps_special = thinking is not None and thinking.keeps_special_tokens
    specs = [
        ChoiceSpec(i, prompt, _sampling_params(state, body, max_tokens, want_logprobs, _choice_seed(body.seed, i),
                                               stops, replies.keeps_special_tokens, replies.grammar,
                                               thinks=thinking is not None, needs_special_tokens=keeps_special), lora)
        for i in range(body.n)
    ]
    return ChatRun(await _start(state, endpoint, specs), prompt, replies, thinking)


async def chat_completion(state: ServerState, body: ChatCompletionRequest) -> Response:
    run = await start_chat(state, body)
    generation, prompt, replies, thinking = run.generation, run.prompt, run.replies, run.thinking
    top = body.top_logprobs or 0
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model_names[0]
    logprobs = Logprobs(state.llm)

    def envelope(obj: str) -> dict:
        return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None}

    def usage(finals: dict[int, RequestOutput]) -> dict:
        reasoning = None if thinking is None else sum(
            thinking_tokens(state.llm.tokenizer, out.token_ids, run.split(out)[0]) for out in finals.values())
        return _usage([prompt], finals, {0}, reasoning_tokens=reasoning)

    if not body.stream:
        async def collect() -> dict:
            finals = await _finals(generation)
            choices = []
            for i, out in sorted(finals.items()):
                thought, message, reason = run.split(out)
                if thinking is not None:
                    message["reasoning_content"] = thought
                choices.append({"index": i, "message": message,
                                "logprobs": logprobs.chat(out.logprobs, top) if body.logprobs else None,
                                "finish_reason": reason})
            return {**envelope("chat.completion"), "choices": choices, "usage": usage(finals)}

        return Response(generation, collect(), None)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream() -> AsyncIterator[str]:
        usage_field = {"usage": None} if include_usage else {}
        finals: dict[int, RequestOutput] = {}
        started: set[int] = set()
        async for index, out in generation.events():
            if index not in started:
                started.add(index)
                yield _sse({**envelope("chat.completion.chunk"), **usage_field, "choices": [
                    {"index": index, "delta": run.opening(), "logprobs": None, "finish_reason": None}]})
            thought, content, ending = run.advance(index, out)
            if thought:
                yield _sse({**envelope("chat.completion.chunk"), **usage_field, "choices": [
                    {"index": index, "delta": {"reasoning_content": thought}, "logprobs": None,
                     "finish_reason": None}]})
            if content or (body.logprobs and out.new_token_ids):
                yield _sse({**envelope("chat.completion.chunk"), **usage_field, "choices": [
                    {"index": index, "delta": {"content": content or replies.no_content},
                     "logprobs": logprobs.chat(_new_picks(out), top) if body.logprobs else None,
                     "finish_reason": None}]})
            if ending is not None:
                finals[index] = out
                deltas, reason = ending
                for delta in deltas:
                    yield _sse({**envelope("chat.completion.chunk"), **usage_field, "choices": [
                        {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]})
                yield _sse({**envelope("chat.completion.chunk"), **usage_field, "choices": [
                    {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]})
        if include_usage:
            yield _sse({**envelope("chat.completion.chunk"), "choices": [], "usage": usage(finals)})

    return Response(generation, None, _event_stream(stream()))


# ----------------------------------------------------------------- completions
async def completion(state: ServerState, body: CompletionRequest) -> Response:
    lora = state.check_model(body.model)
    body.check_supported()
    prompts = [await _encode(state, p, "prompt") for p in body.prompts()]
    top = body.logprobs or 0
    want_logprobs = max(top, 1) if body.logprobs is not None else 0
    scored = body.echo and body.logprobs is not None  # the prompt's own logprobs: its logits, every position
    if scored:
        _check_prompt_logits(state, prompts, body.n)
    stops = body.stop_strings()
    specs, first_of_prompt = [], set()
    scoring_only = body.max_tokens == 0  # one token is computed for the prompt's logits, then dropped
    for p_index, prompt in enumerate(prompts):
        max_tokens = max(1, _max_tokens(state, len(prompt), body.max_tokens, "prompt"))  # scoring: one, dropped
        first_of_prompt.add(p_index * body.n)
        for j in range(body.n):
            index = p_index * body.n + j
            # the seed is the prompt's wherever it sits in the batch; its n choices each take their own (vLLM's)
            params = _sampling_params(state, body, max_tokens, want_logprobs, _choice_seed(body.seed, j), stops)
            specs.append(ChoiceSpec(index, prompt, params, lora, {REQUIRE_FULL_LOGITS: True} if scored else None))
    generation = await _start(state, "completions", specs)
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model_names[0]
    logprobs = Logprobs(state.llm)
    tok = state.llm.tokenizer

    def skips_special(index: int) -> bool:
        return specs[index].params.skip_special_tokens is not False

    def echo_text(index: int) -> str:
        """The prompt as written, or its token ids decoded as the reply is."""
        if not body.echo:
            return ""
        prompt = body.prompts()[index // body.n]
        if isinstance(prompt, str):
            return prompt
        return IncrementalDetokenizer.text_before(tok, prompt, skips_special(index)) if tok is not None else ""

    def prompt_offsets(index: int) -> list[int]:
        """Where each prompt token starts in :func:`echo_text`: by the tokenizer's own alignment for text (a
        special token's spelling, an added BOS), else as the decoding writes the tokens."""
        prompt = body.prompts()[index // body.n]
        if isinstance(prompt, str):
            return tok.char_starts(prompt)
        return logprobs.offsets(0, skip_special=skips_special(index)).of(prompts[index // body.n])

    def text_of(out: RequestOutput) -> str:
        return out.text if out.text is not None else ""

    def choice_offsets(index: int, start: int) -> TextOffsets:
        return logprobs.offsets(start, prompts[index // body.n], skips_special(index))

    def envelope() -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": None}

    if not body.stream:
        async def collect() -> dict:
            finals = await _finals(generation)
            choices = []
            for i, out in sorted(finals.items()):
                prefix = echo_text(i)
                picks = () if scoring_only else _with_stop_pick(out.logprobs, out)
                entry = None
                if body.logprobs is not None:
                    entry = logprobs.completion(picks, top, choice_offsets(i, len(prefix)))
                if scored:
                    prompt_ids = prompts[i // body.n]
                    entry = _joined(logprobs.prompt(prompt_ids, out.full_logits, top, prompt_offsets(i)), entry)
                choices.append({"index": i, "text": prefix + ("" if scoring_only else text_of(out)),
                                "logprobs": entry, "finish_reason": "length" if scoring_only else _finish_reason(out)})
            usage = _usage(prompts, finals, first_of_prompt, completion_tokens=not scoring_only)
            return {**envelope(), "choices": choices, "usage": usage}

        return Response(generation, collect(), None)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream() -> AsyncIterator[str]:
        usage_field = {"usage": None} if include_usage else {}
        finals: dict[int, RequestOutput] = {}
        offsets: dict[int, TextOffsets] = {}
        async for index, out in generation.events():
            prefix = ""
            if index not in offsets:
                prefix = echo_text(index)
                offsets[index] = choice_offsets(index, len(prefix))
            text = prefix + out.new_text
            piece = None
            if body.logprobs is not None:
                picks = _with_stop_pick(_new_picks(out), out) if out.finished else _new_picks(out)
                piece = logprobs.completion(picks, top, offsets[index])
            if text or (piece and piece["tokens"]) or out.finished:
                yield _sse({**envelope(), **usage_field, "choices": [{
                    "index": index, "text": text, "logprobs": piece,
                    "finish_reason": _finish_reason(out) if out.finished else None}]})
            if out.finished:
                finals[index] = out
        if include_usage:
            yield _sse({**envelope(), "choices": [], "usage": _usage(prompts, finals, first_of_prompt)})

    return Response(generation, None, _event_stream(stream()))


# ------------------------------------------------------------ tokenizer extras
async def tokenize(state: ServerState, body: TokenizeRequest) -> dict:
    """:func:`tokenize_now` off the event loop (a long text takes seconds to encode)."""
    return await asyncio.to_thread(tokenize_now, state, body)


def tokenize_now(state: ServerState, body: TokenizeRequest) -> dict:
    """vLLM's ``/tokenize``: the ids a prompt (or chat messages, with tools) becomes, and the room left."""
    state.check_model(body.model)
    body.check_supported()
    tok = state.llm.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer, so text cannot be tokenized")
    messages = None if body.messages is None else template_messages(body.messages)
    try:
        if messages is None:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        else:
            ids = tok.encode_chat(messages, body.tools, body.add_generation_prompt, body.chat_template_kwargs)
    except FerrumError as error:
        raise _encoding_error(error, messages, "prompt" if messages is None else "messages") from None
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}


def detokenize(state: ServerState, body: DetokenizeRequest) -> dict:
    """vLLM's ``/detokenize``: token ids back to their text, special tokens included (as vLLM's, Hugging Face's
    ``decode``, keeps them), so the ids ``/tokenize`` gives for a chat come back as the text they encode."""
    state.check_model(body.model)
    tok = state.llm.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer, so ids cannot be turned into text")
    bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})", param="tokens")
    return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}

