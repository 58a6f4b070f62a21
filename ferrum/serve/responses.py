"""``/v1/responses``: OpenAI's Responses API over the chat machinery.

A request becomes a chat request (``instructions`` the system message, input items the messages, flat
function tools the chat form, ``text.format`` the response format) and runs as one; its reply comes back
as output items: the thinking as a ``reasoning`` item (with ``--reasoning-parser``), the text as a
``message``, each call as a ``function_call``. A stream sends the API's typed events (``response.created``,
``response.output_text.delta``, ..., ``response.completed``) with no ``[DONE]``. Stored responses (``store``,
on by default, kept in memory, the latest :data:`STORED` of them within :data:`STORED_BYTES`) continue with
``previous_response_id`` and can be read back, with their input items, or deleted by id; their items can be
named by ``item_reference`` input items. ``include`` of the text's logprobs fills the output text's ``logprobs``
with the chat reply's entries for the answer's tokens (not with tools); the API's other ``include`` values have
nothing to include here. Hosted tools, files and images are refused by name.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import OrderedDict
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Sequence

from pydantic import Field, StrictBool, StrictInt, StrictStr, ValidationError

from ferrum.engine import RequestOutput
from ferrum.serve.errors import APIError
from ferrum.serve.handlers import ChatRun, Logprobs, Response, ServerState, generated_tokens, start_chat
from ferrum.serve.protocol import PART_SEPARATOR, Body, ChatCompletionRequest, Obfuscation, Temperature
from ferrum.serve.reasoning import CLOSE, OPEN, structured_tags, thinking_tokens

#: Responses kept for ``previous_response_id`` and ``GET /v1/responses/{id}``, the oldest dropped first: at most
#: this many, holding at most ``STORED_BYTES`` of JSON between them (each keeps its whole conversation, so a long
#: chain of turns would otherwise hold its history once per turn).
STORED = 1024
STORED_BYTES = 256 * 2**20
#: Chat's parameters under the Responses API's names, for the errors of a request run as a chat request.
_RESPONSES_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens",
                     "max_completion_tokens": "max_output_tokens", "response_format": "text.format"}


def _responses_param(param: str | None) -> str | None:
    """``param`` (chat's name, maybe with a path under it) as the Responses API names it; a message's index
    is left out, since instructions and items do not map one to one onto messages."""
    if param is None:
        return None
    head = param.split(".", 1)[0]
    return _RESPONSES_PARAMS.get(head, param)


def _in_responses_words(error: APIError) -> None:
    """Make ``error``, of the chat request a Responses request runs as, name the Responses API's fields: its
    ``param``, and the chat names its message uses (max_tokens...)."""
    for chat_name, name in _RESPONSES_PARAMS.items():
        error.message = re.sub(rf"\b{chat_name}\b", name, error.message)
    error.param = _responses_param(error.param)


class ResponsesRequest(Body):
    model: StrictStr | None = None
    input: StrictStr | list[dict[str, Any]]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: StrictBool = False
    store: StrictBool | None = None
    previous_response_id: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    include: list[StrictStr] | None = None
    # Accepted only at their no-op values.
    truncation: Literal["disabled"] | None = None
    background: Literal[False] | None = None
    max_tool_calls: Annotated[int, Field(ge=0)] | None = None  # of built-in tools, which this server has none of
    stream_options: Obfuscation | None = None
    moderation: dict[str, Any] | None = None  # refused by name, as in chat
    # Bookkeeping fields of OpenAI's platform; nothing to do here.
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None  # a cost and latency matter, as in chat
    safety_identifier: StrictStr | None = None
    # Ferrum extras (vLLM's names), as in chat.
    seed: StrictInt | None = None
    # Unset: the checkpoint's generation_config.json, else off; top_k -1 is off too (vLLM's).
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None


class ResponseStore:
    """Stored responses: each one's object, its conversation as chat messages (input and output) and its input
    items as the API lists them back. Each is kept as its JSON text, so the bytes counted are the bytes held (as
    Python objects a response took 5x its JSON) and every ``get`` hands out a copy of its own."""

    def __init__(self, size: int = STORED, max_bytes: int = STORED_BYTES):
        self.size, self.max_bytes = size, max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0  # the stored items' JSON, together
        #: Each stored input and output item's id, to the response holding it (the latest, where several do: an
        #: ``item_reference`` puts the item it names into the new response's input).
        self._holders: dict[str, str] = {}
        self._item_ids: dict[str, list[str]] = {}  # a response's items' ids, dropped with it

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]],
            inputs: Sequence[dict[str, Any]] = ()) -> None:
        """Keep a response; one larger than the whole budget is not kept (a later ``get`` says so)."""
        stored = json.dumps([response, conversation, list(inputs)], ensure_ascii=False).encode()
        if len(stored) > self.max_bytes:
            return
        self._drop(response["id"])
        self._items[response["id"]] = stored
        self.bytes += len(stored)
        self._item_ids[response["id"]] = ids = [item["id"] for item in _items_of(response, inputs) if "id" in item]
        self._holders.update(dict.fromkeys(ids, response["id"]))
        while len(self._items) > self.size or self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def get(self, response_id: str, param: str = "response_id") -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The response and its conversation."""
        response, conversation, _ = self._entry(response_id, param)
        return response, conversation

    def inputs(self, response_id: str) -> list[dict[str, Any]]:
        """The response's input items."""
        return self._entry(response_id, "response_id")[2]

    def item(self, item_id: str, param: str) -> dict[str, Any]:
        """The stored input or output item ``item_id`` (what an ``item_reference`` names); 404 for one no stored
        response holds."""
        holder = self._holders.get(item_id)
        if holder is None:
            raise APIError(404, f"no stored response holds an item with the id {item_id!r} (items of responses made "
                           f"with store false are not kept; this server keeps the latest {self.size} responses, up "
                           f"to {self.max_bytes // 2**20} MiB, in memory)", param=param, code="not_found")
        response, _, inputs = self._entry(holder, param)
        return next(item for item in _items_of(response, inputs) if item.get("id") == item_id)

    def _entry(self, response_id: str, param: str) -> list[Any]:
        return json.loads(self._stored(response_id, param))

    def _stored(self, response_id: str, param: str) -> bytes:
        """The response's JSON text, now the most recently used; 404 for an id not (or no longer) stored."""
        if response_id not in self._items:
            raise APIError(404, f"no stored response has the id {response_id!r} (this server keeps the latest "
                           f"{self.size}, up to {self.max_bytes // 2**20} MiB, in memory)", param=param,
                           code="not_found")
        self._items.move_to_end(response_id)
        return self._items[response_id]

    def delete(self, response_id: str) -> None:
        self._stored(response_id, "response_id")  # a 404 for one not stored
        self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        """Forget the response (if stored) and its items' ids (where no later response holds them)."""
        self.bytes -= len(self._items.pop(response_id, b""))
        for item_id in self._item_ids.pop(response_id, ()):
            if self._holders.get(item_id) == response_id:
                del self._holders[item_id]


def _items_of(response: dict[str, Any], inputs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [*response.get("output", ()), *inputs]


def input_item_list(items: list[dict[str, Any]], limit: int = 20, order: str = "desc",
                    after: str | None = None) -> dict[str, Any]:
    """``GET /v1/responses/{id}/input_items``: a page of ``limit`` items in ``order``, after the item ``after``."""
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be asc or desc, got {order!r}", param="order")
    if not 1 <= limit <= 100:
        raise APIError(400, f"limit must be between 1 and 100, got {limit}", param="limit")
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise APIError(400, f"after={after!r} is not an input item of this response", param="after")
        start = ids.index(after) + 1
    page = ordered[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(ordered)}


#: The id prefix of each input item type, as OpenAI's own ids begin.
_ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def _input_items(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as the API lists it back: each item with an id, a message's text as content parts."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    listed = []
    for item in items:
        item = {"type": "message", **item}
        if item["type"] == "message":
            if isinstance(item.get("content"), str):
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": part, "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", _id(_ITEM_ID_PREFIXES.get(item["type"], "item")))
        listed.append(item)
    return listed


# --------------------------------------------------------------------- request
def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (``input_text``, or ``output_text`` in replayed replies)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise APIError(400, f"content part of type {kind!r} is not supported; send input_text parts",
                           param=f"{where}.{i}")
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}.{i} ({kind}) needs a 'text' string", param=f"{where}.{i}.text")
        texts.append(part["text"])
    return PART_SEPARATOR.join(texts)


def resolve_references(items: str | list[dict[str, Any]], store: ResponseStore) -> str | list[dict[str, Any]]:
    """The input with each ``{"type": "item_reference", "id": ...}`` (the Vercel AI SDK sends its earlier turns'
    items so) replaced by the stored item it names."""
    if isinstance(items, str) or not any(item.get("type") == "item_reference" for item in items):
        return items
    resolved = []
    for i, item in enumerate(items):
        if item.get("type") == "item_reference":
            if not (isinstance(item.get("id"), str) and item["id"]):
                raise APIError(400, f"input.{i} (item_reference) needs an 'id' string", param=f"input.{i}.id")
            item = store.item(item["id"], f"input.{i}.id")
        resolved.append(item)
    return resolved


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: messages, and the calls and results of earlier turns, an assistant turn
    with the thinking of the reasoning item before it (templates write it into a tool loop's turns)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    thought: str | None = None  # a reasoning item's, for the assistant turn that follows it

    def assistant(turn: dict[str, Any]) -> dict[str, Any]:
        nonlocal thought
        if thought:
            turn["reasoning_content"], thought = thought, None
        return turn

    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role {role!r} is not one of user, system, developer, assistant",
                               param=f"{where}.role")
            turn = {"role": role, "content": _text_of(item.get("content"), f"{where}.content")}
            messages.append(assistant(turn) if role == "assistant" else turn)
        elif kind in ("function_call", "function_call_output") and not (
                isinstance(item.get("call_id"), str) and item["call_id"]):
            raise APIError(400, f"{where} ({kind}) needs a 'call_id' string", param=f"{where}.call_id")
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not thought:  # one turn: its text, its calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append(assistant({"role": "assistant", "content": "", "tool_calls": [call]}))
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _text_of(output, f"{where}.output")})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            texts = [p.get("text", "") for p in parts if isinstance(p, dict)] if isinstance(parts, list) else None
            if texts is not None and not all(isinstance(t, str) for t in texts):
                raise APIError(400, "a reasoning item's parts carry their text as a string", param=f"{where}.content")
            thought = None if texts is None else "".join(texts)
        else:
            raise APIError(400, f"input item type {kind!r} is not supported; send messages, reasoning, "
                           "function_call, function_call_output and item_reference items", param=f"{where}.type")
    return messages


def _chat_tools(body: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """The flat function tools and tool choice of the Responses API in chat's form."""
    tools = None
    if body.tools is not None:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.get("type") != "function":
                raise APIError(400, f"tool type {tool.get('type')!r} is not supported; send function tools",
                               param=f"tools.{i}.type")
            tools.append({"type": "function", "function": {
                k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}})
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(400, 'tool_choice must be auto, none, required or {"type": "function", "name": ...}',
                           param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text``: its ``format`` as chat's response format; a ``verbosity`` other than the default is refused."""
    text = text or {}
    if set(text) - {"format", "verbosity"}:
        raise APIError(400, f"text fields {sorted(set(text) - {'format', 'verbosity'})} are not supported",
                       param="text")
    if text.get("verbosity") not in (None, "medium"):
        raise APIError(400, f"text.verbosity={text['verbosity']!r} is not supported by this server (only medium)",
                       param="text.verbosity")
    fmt = text.get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise APIError(400, "text.format must be an object such as {\"type\": \"json_schema\", \"schema\": {...}}",
                       param="text.format")
    if fmt is None or fmt.get("type") in ("text", "json_object"):
        return fmt
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise APIError(400, f"text.format type {fmt.get('type')!r} is not one of text, json_object, json_schema",
                   param="text.format")


#: The one ``include`` value Ferrum fills: each output text's tokens with their logprobs.
TEXT_LOGPROBS = "message.output_text.logprobs"
#: The API's other ``include`` values, each with nothing to include here, so accepted as no-ops: a reasoning item
#: carries its text in the clear (Codex CLI and the Agents SDK ask for the encrypted form with ``store`` false, to
#: send it back: the clear text goes back as well), and the rest are parts of hosted tools' calls and of input
#: images, which this server refuses.
NOTHING_TO_INCLUDE = frozenset((
    "reasoning.encrypted_content", "file_search_call.results", "web_search_call.results",
    "web_search_call.action.sources", "code_interpreter_call.outputs", "computer_call_output.output.image_url",
    "message.input_image.image_url",
))


def wants_logprobs(body: ResponsesRequest) -> bool:
    """Whether the reply's text comes with its tokens' logprobs (``include``), checking what goes with it."""
    unknown = sorted(set(body.include or ()) - {TEXT_LOGPROBS} - NOTHING_TO_INCLUDE)
    if unknown:
        raise APIError(400, f"include {unknown} is not one of the API's values ({TEXT_LOGPROBS!r}, "
                       f"{', '.join(map(repr, sorted(NOTHING_TO_INCLUDE)))})", param="include")
    wanted = TEXT_LOGPROBS in (body.include or ())
    if body.top_logprobs and not wanted:
        raise APIError(400, f"top_logprobs needs include: [{TEXT_LOGPROBS!r}]", param="top_logprobs")
    if wanted and body.tools:
        raise APIError(400, "logprobs of a reply that may hold function calls are not supported; send the request "
                       "without tools or without include", param="include")
    return wanted


def to_chat(body: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list]:
    """The chat request this one runs as, and its conversation (``history`` and the input, without the
    instructions, which a continuation does not inherit)."""
    conversation = history + _messages(body.input)
    if not conversation:
        raise APIError(400, "input holds no message; send a string or at least one message item", param="input")
    system = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    tools, choice = _chat_tools(body)
    effort = (body.reasoning or {}).get("effort")
    if effort is not None and not isinstance(effort, str):
        raise APIError(400, f"reasoning.effort must be a string such as 'low', got {effort!r}",
                       param="reasoning.effort")
    fields = {
        "model": body.model, "messages": system + conversation, "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "tools": tools, "tool_choice": choice,
        "parallel_tool_calls": body.parallel_tool_calls, "response_format": _response_format(body.text),
        "stream": body.stream, "seed": body.seed, "top_k": body.top_k, "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty, "logit_bias": body.logit_bias,
        "reasoning_effort": effort, "logprobs": wants_logprobs(body), "top_logprobs": body.top_logprobs,
        "moderation": body.moderation,
    }
    try:
        chat = ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as error:
        first = error.errors()[0]
        raise APIError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", param="input") from None
    return chat, conversation


# -------------------------------------------------------------------- response
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Reply:
    """One response's envelope (the request's settings echoed back) and its output items."""

    def __init__(self, state: ServerState, body: ResponsesRequest, run: ChatRun, logprobs: bool = False):
        self.run, self.body = run, body
        self.id, self.created = _id("resp"), int(time.time())
        self.model = body.model or state.model_names[0]
        self.tokenizer = state.llm.tokenizer
        #: With ``include`` of the text's logprobs: how entries are written, and how many alternatives each has.
        self.logprobs = Logprobs(state.llm) if logprobs else None
        self.top = body.top_logprobs or 0

    def entries(self, out: RequestOutput, since: int = 0) -> list[dict[str, Any]]:
        """The output text's logprob entries for the reply's answer tokens from index ``since`` on (none unless
        asked for): after the thinking (``--reasoning-parser``, gpt-oss's analysis), none while the reply thinks."""
        if self.logprobs is None:
            return []
        thinking = self.run.thinking
        start = 0 if thinking is None else thinking.answer_start(out.text or "", out.token_ids, self.tokenizer)
        return self.logprobs.chat(out.logprobs[max(start, since):], self.top)["content"]

    def envelope(self, status: str, output: list[dict[str, Any]], out: RequestOutput | None = None,
                 thought: str | None = None) -> dict[str, Any]:
        body = self.body
        incomplete = status == "incomplete"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": body.reasoning or {"effort": None},
            "store": body.store is not False, "temperature": body.temperature, "top_p": body.top_p,
            "text": body.text or {"format": {"type": "text"}}, "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [], "truncation": "disabled", "user": body.user, "metadata": body.metadata or {},
            "usage": None if out is None else self.usage(out, thought),
        }

    def usage(self, out: RequestOutput, thought: str | None) -> dict[str, Any]:
        prompt, generated = len(self.run.prompt), generated_tokens(out)
        thinking = thinking_tokens(self.tokenizer, out.token_ids, thought)
        return {"input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": out.metrics.num_cached_tokens, "cache_write_tokens": 0},
                "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": thinking},
                "total_tokens": prompt + generated}

    def ending(self, out: RequestOutput) -> tuple[str, str | None, dict[str, Any]]:
        """A finished reply's status, thinking and chat message."""
        thought, message, reason = self.run.split(out)
        return "incomplete" if reason == "length" else "completed", thought, message

    def items(self, out: RequestOutput) -> tuple[list[dict[str, Any]], str, str | None, dict[str, Any]]:
        """A finished reply's output items, with its :meth:`ending`."""
        status, thought, message = self.ending(out)
        items = []
        calls = message.get("tool_calls") or []
        if thought is not None:  # finished where the reply went on past it, as a stream closes it
            items.append(reasoning_item(_id("rs"), thought, "completed" if message["content"] or calls else status))
        if message["content"] or _empty_message_shown(message, thought, status):
            items.append(message_item(_id("msg"), message["content"] or "", status, self.entries(out)))
        items += [call_item(_id("fc"), call, "completed") for call in calls]
        return items, status, thought, message


def _empty_message_shown(message: dict[str, Any], thought: str | None, status: str) -> bool:
    """Whether a reply without text still gets a message item: it does unless it called, or it thought until
    ``max_output_tokens`` cut it (OpenAI then returns the reasoning item alone)."""
    return not message.get("tool_calls") and not (thought is not None and status == "incomplete")


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def _text_part(text: str, logprobs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs)}


def message_item(item_id: str, text: str | None, status: str,
                 logprobs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [_text_part(text, logprobs)]}


def call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


def _stored_turn(message: dict[str, Any], thought: str | None) -> dict[str, Any]:
    """The reply as the assistant message a continuation replays, with its thinking (a template writes it into
    the turns of a tool loop: Qwen 3's after the last user message, gpt-oss's into its calls)."""
    turn = {"role": "assistant", "content": message["content"] or ""}
    if message.get("tool_calls"):
        turn["tool_calls"] = message["tool_calls"]
    if thought:
        turn["reasoning_content"] = thought
    return turn


async def create_response(state: ServerState, store: ResponseStore, body: ResponsesRequest) -> Response:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    previous = body.previous_response_id
    history = [] if previous is None else list(store.get(previous, "previous_response_id")[1])
    body.input = resolve_references(body.input, store)  # also as the response's input items: what they stand for
    chat, conversation = to_chat(body, history)
    if chat.logprobs and state.reasoning_parser is not None and structured_tags(state.llm.tokenizer) is None:
        raise APIError(400, f"this model's {OPEN} and {CLOSE} are not single tokens, so its answer's tokens cannot be "
                       "told from its thinking's for their logprobs; send the request without include",
                       param="include")
    try:
        run = await start_chat(state, chat, endpoint="responses")
    except APIError as error:
        _in_responses_words(error)
        raise
    reply = _Reply(state, body, run, logprobs=chat.logprobs)

    def keep(response: dict[str, Any], message: dict[str, Any], thought: str | None) -> None:
        if body.store is not False:
            store.put(response, conversation + [_stored_turn(message, thought)], _input_items(body.input))

    if not body.stream:
        async def collect() -> dict:
            out = None
            async for _, out in run.generation.events():
                pass
            items, status, thought, message = reply.items(out)
            response = reply.envelope(status, items, out, thought)
            keep(response, message, thought)
            return response

        return Response(run.generation, collect(), None)
    return Response(run.generation, None, _Events(reply, keep).stream())


class _Events:
    """A response's stream: typed events, each numbered, the items opened and closed as the reply unfolds."""

    def __init__(self, reply: _Reply, keep: Callable[[dict[str, Any], dict[str, Any], str | None], None]):
        self.reply, self.keep = reply, keep
        self.number = 0
        self.items: list[dict[str, Any]] = []  # finished output items
        self.open: dict[str, Any] | None = None  # the item being streamed: reasoning or message
        self.text = ""  # of the open item
        self.logprobs: list[dict[str, Any]] = []  # the message's logprob entries sent so far
        self.unsent: list[dict[str, Any]] = []  # those of tokens whose text is not out yet (held back)
        self.seen = 0  # the reply's tokens looked at for entries

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"

    def _place(self) -> dict[str, Any]:
        return {"item_id": self.open["id"], "output_index": len(self.items), "content_index": 0}

    def _begin(self, kind: str) -> list[str]:
        item_id = _id("rs" if kind == "reasoning" else "msg")
        self.open, self.text = {"type": kind, "id": item_id}, ""
        if kind == "reasoning":
            return [self.event("response.output_item.added", output_index=len(self.items),
                               item={**reasoning_item(item_id, "", "in_progress"), "content": []})]
        return [self.event("response.output_item.added", output_index=len(self.items),
                           item=message_item(item_id, None, "in_progress")),
                self.event("response.content_part.added", **self._place(), part=_text_part(""))]

    def _add(self, kind: str, delta: str) -> list[str]:
        events = []
        if self.open is not None and self.open["type"] != kind:
            events += self._close("completed")
        if self.open is None:
            events += self._begin(kind)
        self.text += delta
        if kind == "reasoning":
            return events + [self.event("response.reasoning_text.delta", **self._place(), delta=delta)]
        sent, self.unsent = self.unsent, []
        self.logprobs += sent
        return events + [self.event("response.output_text.delta", **self._place(), delta=delta, logprobs=sent)]

    def _close(self, status: str) -> list[str]:
        item, text, place = self.open, self.text, self._place()
        if item["type"] == "reasoning":
            done = reasoning_item(item["id"], text, status)
            events = [self.event("response.reasoning_text.done", **place, text=text)]
        else:
            self.logprobs += self.unsent
            self.unsent = []
            done = message_item(item["id"], text, status, self.logprobs)
            events = [self.event("response.output_text.done", **place, text=text, logprobs=self.logprobs),
                      self.event("response.content_part.done", **place, part=_text_part(text, self.logprobs))]
        events.append(self.event("response.output_item.done", output_index=len(self.items), item=done))
        self.items.append(done)
        self.open = None
        return events

    def _calls(self, calls: list[dict[str, Any]]) -> list[str]:
        events = []
        for call in calls:
            item = call_item(_id("fc"), call, "completed")
            index = len(self.items)
            events += [
                self.event("response.output_item.added", output_index=index,
                           item={**item, "arguments": "", "status": "in_progress"}),
                self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                           delta=item["arguments"]),
                self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                           name=item["name"], arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=index, item=item),
            ]
            self.items.append(item)
        return events

    async def stream(self) -> AsyncIterator[str]:
        reply, run = self.reply, self.reply.run
        try:
            yield self.event("response.created", response=reply.envelope("in_progress", []))
            yield self.event("response.in_progress", response=reply.envelope("in_progress", []))
            async for _, out in run.generation.events():
                self.unsent += reply.entries(out, since=self.seen)
                self.seen = len(out.token_ids)
                text = out.text or ""
                if run.thinking is not None:
                    thought, text = run.thinking.delta(0, text, out.finished)
                    for event in self._add("reasoning", thought) if thought else ():
                        yield event
                content = run.replies.delta(0, text, out.finished)
                for event in self._add("message", content) if content else ():
                    yield event
                if out.finished:
                    status, thought, message = reply.ending(out)
                    after = run.replies.after_calls(text)
                    for event in self._add("message", after) if after else ():
                        yield event  # the text after the calls, held back with them: the message's, as in chat
                    if self.open is not None:
                        for event in self._close(status):
                            yield event
                    if not any(item["type"] == "message" for item in self.items) and _empty_message_shown(
                            message, thought, status):
                        for event in self._begin("message") + self._close(status):
                            yield event  # an empty reply is still a message
                    for event in self._calls(message.get("tool_calls") or []):
                        yield event
                    response = reply.envelope(status, self.items, out, thought)
                    self.keep(response, message, thought)
                    yield self.event("response.completed" if status == "completed" else "response.incomplete",
                                     response=response)
        except Exception as error:  # after the 200 went out: an error event ends the stream
            api = APIError.of(error)
            yield self.event("error", code=api.code, message=api.message, param=api.param)
