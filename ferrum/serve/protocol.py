"""The OpenAI request bodies Ferrum accepts, as pydantic models.

Unknown fields are refused (a misspelt ``temprature`` must not be silently
ignored); fields of the OpenAI API that Ferrum cannot honour are accepted
only at their no-op values and refused by name otherwise (see
:meth:`_Common.refuse_unsupported`). ``top_k``, ``min_p``,
``repetition_penalty``, ``stop_token_ids``, ``ignore_eos`` and ``skip_special_tokens`` are extras (vLLM's names),
sent by the ``openai`` client as ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from ferrum.serve.errors import APIError
from ferrum.serve.tools import check_tools, template_tool_calls

#: OpenAI's own bounds (the API reference), checked before anything reaches the engine.
Temperature = Annotated[float, Field(ge=0, le=2)]
Penalty = Annotated[float, Field(ge=-2, le=2)]

#: Every request body: unknown fields refused, no type coercion, and ``NaN`` / ``Infinity`` (which the
#: JSON parser accepts) refused as "not a finite number" instead of failing a bound check confusingly.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
#: Between the text parts of one message's content, as vLLM joins them (parts are paragraphs, not fragments).
PART_SEPARATOR = "\n"


class Body(BaseModel):
    """A request body (or part of one): :data:`STRICT`, and a field sent as ``null`` takes its default, as the
    OpenAI API reads null (the ``openai`` client sends an argument passed as None that way)."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required()}


class Obfuscation(Body):
    """``stream_options`` of the Responses API, and the part of chat's it shares."""

    include_obfuscation: StrictBool = True  # padding against length side channels: nothing to pad here


class StreamOptions(Obfuscation):
    include_usage: StrictBool = False


class TextPart(Body):
    type: Literal["text"]
    text: StrictStr


class Prediction(Body):
    """OpenAI's Predicted Outputs: text the reply will likely repeat, which only makes OpenAI's reply faster (never
    different), so a request is served as it would be without it."""

    type: Literal["content"]
    content: StrictStr | list[TextPart]


class _Common(Body):
    """Sampling fields shared by chat and legacy completions."""

    model: StrictStr | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: StrictStr | None = None  # ignored: only for the caller's abuse monitoring at OpenAI
    # Ferrum extras.
    # Unset: the checkpoint's generation_config.json, else off; top_k -1 is off too (vLLM's).
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    stop_token_ids: list[StrictInt] | None = None  # ids that end the output, beside the model's end tokens
    ignore_eos: StrictBool = False  # generate max_tokens whatever the model's end tokens say
    #: Unset: special tokens are left out of the text, except in chat requests with tools whose format marks
    #: calls with one (Mistral's ``[TOOL_CALLS]``), which keep them so the calls can be found.
    skip_special_tokens: StrictBool | None = None

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def refuse_unsupported(self, fields: dict[str, Any], reasons: dict[str, str] | None = None) -> None:
        """Raise a 400 naming the first field set to a value Ferrum cannot honour, with its reason where given."""
        for name, allowed in fields.items():
            value = getattr(self, name)
            if value is not None and value != allowed and not (isinstance(allowed, tuple) and value in allowed):
                why = (reasons or {}).get(name)
                raise APIError(400, f"{name}={value!r} is not supported by this server" + (f": {why}" if why else ""),
                               param=name)

    def output_schema(self) -> bool | dict[str, Any] | None:
        """The structure the output must have (``SamplingParams.json_schema``): none for plain text."""
        return None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return stops


class ContentPart(BaseModel):
    """A part's own fields (``image_url``, ``input_audio``, ...) pass validation so that a part of any
    type other than text is refused by name when the prompt is built."""

    model_config = ConfigDict(**{**STRICT, "extra": "ignore"})
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(Body):
    """One message; non-text parts are refused when the prompt is built. An assistant message the server
    returned may come back whole (``message.model_dump()`` in the ``openai`` client): its thinking
    (``reasoning_content``) goes to the template, its output-only fields are accepted empty, and the client's
    own ``parsed`` (what ``.parse()`` read of a structured reply) is ignored."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None
    refusal: StrictStr | None = None
    reasoning_content: StrictStr | None = None
    reasoning: StrictStr | None = None  # vLLM's newer name for it
    annotations: list[dict[str, Any]] | None = None  # citations of a reply: nothing a prompt holds
    audio: None = None
    function_call: None = None  # the deprecated form of tool_calls
    parsed: Any = None


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: ``role`` and text ``content``, with an assistant's earlier
    ``tool_calls`` and thinking and a tool result's ``tool_call_id`` and ``name`` where given."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text":
                    raise APIError(
                        400, f"content part of type {part.type!r} is not supported; send text parts",
                        param=f"messages.{i}.content",
                    )
                if part.text is None:
                    raise APIError(400, "a text content part needs a 'text' string", param=f"messages.{i}.content.{j}")
                texts.append(part.text)
            content = PART_SEPARATOR.join(texts)
        # Templates rarely know OpenAI's newer "developer" role; it is the system prompt.
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": content or ""}
        if message.tool_calls:
            entry["tool_calls"] = template_tool_calls(message.tool_calls, f"messages.{i}.tool_calls")
        for key in ("tool_call_id", "name"):
            if getattr(message, key) is not None:
                entry[key] = getattr(message, key)
        thought = message.reasoning_content or message.reasoning
        if thought:  # the tokenizer hands it to templates under every name they read it by
            entry["reasoning_content"] = thought
        out.append(entry)
    return out


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    #: vLLM's extra: more variables for the chat template (Qwen 3's ``{"enable_thinking": false}``).
    chat_template_kwargs: dict[str, Any] | None = None
    # Accepted only at their no-op values.
    functions: list[dict[str, Any]] | None = None
    function_call: StrictStr | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[StrictStr] | None = None
    audio: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    #: Validated, then ignored: it only changes how fast OpenAI answers (:class:`Prediction`).
    prediction: Prediction | None = None
    #: vLLM's way with it: a variable of the chat template, for the templates that read one (gpt-oss's).
    reasoning_effort: StrictStr | None = None
    # Bookkeeping fields of OpenAI's platform; nothing to do here.
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    #: How long OpenAI may keep the prompt's cached prefix: a cost and latency matter, never the answer's.
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: StrictStr | None = None

    def check_supported(self) -> None:
        super().check_supported()
        self.refuse_unsupported({
            "functions": [], "function_call": ("none", "auto"), "modalities": ["text"], "audio": None,
            "verbosity": "medium", "web_search_options": None, "moderation": None,
        }, {"verbosity": "the model writes as it does (medium)",
            "web_search_options": "this server has no web search; send the request without it",
            "moderation": "this server runs no moderation model; send the request without it"})
        self.output_schema()  # a malformed response_format is a 400 before anything is queued
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if not self.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")

    def output_schema(self) -> bool | dict[str, Any] | None:
        """``response_format``: ``{"type": "json_object"}`` is any JSON object (True), ``{"type":
        "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` that schema (``strict`` is how
        Ferrum always holds it), ``{"type": "text"}`` or none plain text."""
        fmt = self.response_format
        kind = None if fmt is None else fmt.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return True
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema", True) if isinstance(spec, dict) else None
            if schema is True or isinstance(schema, dict):
                return schema
            raise APIError(400, "response_format json_schema needs a 'json_schema' object whose 'schema' is a JSON "
                           "schema object", param="response_format")
        raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, json_schema",
                       param="response_format")

    def active_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model may call: all of them unless ``tool_choice`` is "none"."""
        choice = self.tool_choice if self.tool_choice is not None else "auto"
        if choice not in ("auto", "none", "required") and not isinstance(choice, dict):
            raise APIError(400, f"tool_choice={choice!r} is not one of auto, none, required or "
                           '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        if choice != "auto" and choice != "none" and not self.tools:
            raise APIError(400, "tool_choice forces a call but the request has no tools", param="tool_choice")
        if not self.tools or choice == "none":
            return None
        return check_tools(self.tools)

    def forced_tools(self, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """Of the ``active_tools``, those one of which the reply must call: all with "required", the named one
        with ``{"type": "function", "function": {"name": ...}}``; None when the model may answer in text."""
        choice = self.tool_choice
        if tools is None or choice in (None, "auto"):
            return None
        if choice == "required":
            return tools
        if choice.get("type") != "function":
            raise APIError(400, f"tool_choice of type {choice.get('type')!r} is not supported; send auto, none, "
                           'required or {"type": "function", "function": {"name": ...}}', param="tool_choice.type")
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise APIError(400, 'tool_choice names no function: send {"type": "function", "function": {"name": '
                           '...}}', param="tool_choice.function.name")
        named = [t for t in tools if t["function"]["name"] == name]
        if not named:
            raise APIError(400, f"tool_choice names {name!r}, which is not one of the request's tools",
                           param="tool_choice")
        return named[:1]

    def template_variables(self) -> dict[str, Any] | None:
        """``chat_template_kwargs``, with ``reasoning_effort`` among them where the request sets it."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        return {"reasoning_effort": self.reasoning_effort, **(self.chat_template_kwargs or {})}

    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens`` replaces the deprecated ``max_tokens``; the first one set wins."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # the API's documented default; 0 scores an echoed prompt
    echo: StrictBool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: StrictStr | None = None

    def check_supported(self) -> None:
        super().check_supported()
        self.refuse_unsupported({"suffix": None})
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        if self.max_tokens == 0 and not (self.echo and not self.stream):
            raise APIError(400, "max_tokens 0 only scores the prompt: send echo=true (without stream), or ask for "
                           "at least 1 token", param="max_tokens")
        if self.echo and self.logprobs is not None and self.stream:
            raise APIError(400, "echo with logprobs (the prompt's logprobs) is not supported when streaming; "
                           "send stream=false", param="stream")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)


class TokenizeRequest(Body):
    """vLLM's ``/tokenize``: a text prompt, or chat messages rendered by the chat template (tools too)."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    #: A text prompt's BOS (default true); a chat template writes its own (default false, as vLLM's).
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool = True

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "send either prompt (text) or messages (chat)", param="prompt")
        if self.messages is not None and self.add_special_tokens:
            raise APIError(400, "add_special_tokens true with messages would add the tokenizer's special tokens to "
                           "the chat template's own, which Ferrum does not do; leave it out or false",
                           param="add_special_tokens")
        if self.tools is not None:
            self.tools = check_tools(self.tools)


class DetokenizeRequest(Body):
    """vLLM's ``/detokenize``: token ids back to text."""

    model: StrictStr | None = None
    tokens: list[StrictInt]

