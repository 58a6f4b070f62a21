"""A streamed chat reply adds up to the whole one: the content, thinking, calls and finish reason a client
gathers from the deltas (the openai SDK's own accumulator, as ``client.chat.completions.stream`` uses it) are the
message the same reply comes back as unstreamed, for every tool-call format, with text before, between and after
the calls, whitespace around them, or calls alone (content null, not "")."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from ferrum.engine import FinishReason
from ferrum.serve.harmony import HarmonyThinking
from ferrum.serve.handlers import ChatRun
from ferrum.serve.reasoning import Thinking
from ferrum.serve.tools import FORMATS, ToolReplies
from support import write_scripted_checkpoint
from test_serve_tool_formats import (_functiongemma, _gemma4, _internlm, _llama4, _minimax, _olmo3, _phi4, _py,
                                     _seed, _tool_calls_list)
from test_serve_tools import TOOL_TEMPLATE, WEATHER, _ds, _ds31, _glm, _kimi, _qwen

FORMAT = {f.name: f for f in FORMATS}
CITIES = ("Paris", "Oslo", "Lima")
TOOLS = [WEATHER]


def _args(i: int) -> dict[str, str]:
    return {"city": CITIES[i]}


def _json(i: int) -> str:
    return json.dumps(_args(i))


#: Per format: a group of calls (the indices of their arguments) as the model writes it. The formats that write
#: all calls in one list or section write each group as one; the others write a block per call.
WRITE = {
    "hermes": lambda calls: "\n".join(
        f'<tool_call>\n{{"name": "get_weather", "arguments": {_json(i)}}}\n</tool_call>' for i in calls),
    "mistral": lambda calls: "".join(f"[TOOL_CALLS]get_weather[ARGS]{_json(i)}" for i in calls),
    "granite": lambda calls: "<|tool_call|>" + json.dumps([{"name": "get_weather", "arguments": _args(i)}
                                                           for i in calls]),
    "llama3_json": lambda calls: "; ".join(f'{{"name": "get_weather", "parameters": {_json(i)}}}' for i in calls),
    "glm45": lambda calls: "\n".join(_glm("get_weather", **_args(i)) for i in calls),
    "qwen3_coder": lambda calls: "\n".join(_qwen("get_weather", **_args(i)) for i in calls),
    "deepseek_v3": lambda calls: _ds(*[("get_weather", _json(i)) for i in calls]),
    "deepseek_v31": lambda calls: _ds31(*[("get_weather", _json(i)) for i in calls]),
    "kimi_k2": lambda calls: _kimi(*[("get_weather", _json(i)) for i in calls], start=min(calls)),
    "minimax_m2": lambda calls: _minimax([("get_weather", _args(i)) for i in calls]),
    "seed_oss": lambda calls: _seed([("get_weather", _args(i)) for i in calls]),
    "pythonic": lambda calls: _py([("get_weather", _args(i)) for i in calls]),
    "internlm": lambda calls: _internlm([("get_weather", _args(i)) for i in calls]),
    "hunyuan_a13b": lambda calls: _tool_calls_list([("get_weather", _args(i)) for i in calls]),
    "jamba": lambda calls: _tool_calls_list([("get_weather", _args(i)) for i in calls]),
    "phi4_mini": lambda calls: _phi4([("get_weather", _args(i)) for i in calls]),
    "olmo3": lambda calls: _olmo3([("get_weather", _args(i)) for i in calls]),
    "gemma4": lambda calls: _gemma4([("get_weather", _args(i)) for i in calls]),
    "functiongemma": lambda calls: _functiongemma([("get_weather", _args(i)) for i in calls]),
    "llama4_json": lambda calls: _llama4([("get_weather", _args(i)) for i in calls]),
}

#: Replies as text and groups of calls (how many in each).
LAYOUTS = {
    "calls only": [2],
    "calls amid whitespace": ["\n\n", 1, "\n", 1, "\n"],
    "text before": ["Let me check.\n\n", 2],
    "text before, between and after": ["Sure, two calls:\n", 1, "\n\nand then\n", 1, "\nDone.\n"],
    "text after": [2, "\n\nDone."],
    "whitespace opening the text": ["\n Sure.", 1],
    "text only": ["No call needed.\n"],
    "nothing": [""],
}

#: Thinking before the answer, as Qwen 3 writes it and as DeepSeek-R1 does after its template opened it.
REASONING = {None: ("", None), "qwen3": ("<think>\nCall <tool_call> for it.\n</think>\n\n", False),
             "deepseek_r1": ("plan it</think>\n\n", True)}

#: What a tokenizer has as one token (special markers), which a stream never splits.
_MARKER = re.compile(r"<\|[a-z_]+\|>|<｜[^｜]+｜>|\[[A-Z_]+\]")


def _reply(fmt: str, layout: list[str | int]) -> str:
    text, first = "", 0
    for item in layout:
        if isinstance(item, int):
            text += WRITE[fmt](range(first, first + item))
            first += item
        else:
            text += item
    return text


def _tokens(text: str) -> list[str]:
    """``text`` as a stream delivers it at worst: markers whole, everything else a character at a time."""
    pieces, at = [], 0
    for marker in _MARKER.finditer(text):
        pieces += list(text[at:marker.start()]) + [marker.group(0)]
        at = marker.end()
    return pieces + list(text[at:]) or [""]  # an empty reply still ends with an output


def _output(text: str, finished: bool, reason: FinishReason = FinishReason.STOP) -> SimpleNamespace:
    return SimpleNamespace(text=text, finished=finished, finish_reason=reason if finished else None)


def _run(fmt: str, thinking: Thinking | HarmonyThinking | None) -> ChatRun:
    return ChatRun(None, (), ToolReplies(TOOLS, FORMAT[fmt]), thinking)  # type: ignore[arg-type]


def _streamed(run: ChatRun, pieces: list[str], reason: FinishReason) -> dict:
    """The reply fed piece by piece through the chat stream's deltas, gathered as the openai SDK gathers them."""
    state = ChatCompletionStreamState()

    def send(delta: dict, finish_reason: str | None = None) -> None:
        state.handle_chunk(ChatCompletionChunk.model_validate({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}))

    send(run.opening())
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        thought, content, ending = run.advance(0, _output(text, i == len(pieces) - 1, reason))
        if thought:
            send({"reasoning_content": thought})
        if content:
            send({"content": content})
    assert ending is not None
    deltas, finish_reason = ending
    for delta in deltas:
        send(delta)
    send({}, finish_reason)
    choice = state.current_completion_snapshot.choices[0]
    return {"content": choice.message.content, "reasoning_content": getattr(choice.message, "reasoning_content", None),
            "tool_calls": [call.model_dump() for call in choice.message.tool_calls or ()],
            "finish_reason": choice.finish_reason}


def _whole(run: ChatRun, text: str, reason: FinishReason) -> dict:
    thought, message, finish_reason = run.split(_output(text, True, reason))
    return {"content": message["content"], "reasoning_content": thought, "tool_calls": message.get("tool_calls", []),
            "finish_reason": finish_reason}


def _check_same(streamed: dict, whole: dict, ids_written: bool) -> None:
    """The same reply, streamed and whole: equal but for the calls' ids, each fresh (unless the model wrote them)."""
    for got in (streamed, whole):
        ids = [call["id"] for call in got["tool_calls"]]
        assert len(set(ids)) == len(ids) and (ids_written or all(i.startswith("call_") for i in ids)), ids
        got["tool_calls"] = [(call["type"], call["function"]["name"], call["function"]["arguments"])
                             + ((call["id"],) if ids_written else ()) for call in got["tool_calls"]]
    assert streamed == whole


@pytest.mark.parametrize("schedule", ["token by token", "at once"])
@pytest.mark.parametrize("reasoning", list(REASONING), ids=lambda r: f"thinking {r}")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fmt", list(WRITE))
def test_a_streamed_reply_adds_up_to_the_whole_message(fmt, layout, reasoning, schedule):
    prefix, inside = REASONING[reasoning]
    text = prefix + _reply(fmt, LAYOUTS[layout])
    pieces = _tokens(text) if schedule == "token by token" else [text]
    thinking = None if reasoning is None else Thinking(inside)
    whole = _whole(_run(fmt, thinking), text, FinishReason.STOP)
    streamed = _streamed(_run(fmt, None if reasoning is None else Thinking(inside)), pieces, FinishReason.STOP)
    _check_same(streamed, whole, fmt == "kimi_k2")


@pytest.mark.parametrize("fmt", list(WRITE))
def test_the_layouts_are_read_as_calls_with_the_text_around_them(fmt):
    """What the consistency test runs on: each format's calls are read, and the whitespace around them is not
    content (a llama3_json or llama4_json reply is calls alone; the Mistral list's, Granite's, Hunyuan's, Jamba's and
    Phi-4-mini's formats hold one list, OLMo 3's one block)."""
    def reply(layout: str) -> tuple[str | None, int]:
        message, _ = ToolReplies(TOOLS, FORMAT[fmt]).message(_reply(fmt, LAYOUTS[layout]), "stop")
        return message["content"], len(message.get("tool_calls", ()))

    assert reply("calls only") == (None, 2) and reply("nothing") == ("", 0)
    assert reply("text only") == ("No call needed.\n", 0)
    if fmt in ("llama3_json", "llama4_json"):
        assert reply("calls amid whitespace") == (None, 2)
        return
    if fmt == "pythonic":  # one list is the whole reply: two lists, or text beside one, are text
        assert reply("calls amid whitespace")[1] == reply("text before")[1] == 0
        return
    assert reply("text before") == ("Let me check.", 2) and reply("text after") == ("Done.", 2)
    assert reply("whitespace opening the text") == ("\n Sure.", 1)
    if fmt not in ("granite", "hunyuan_a13b", "jamba", "phi4_mini", "olmo3"):  # the second list (OLMo 3's block)
        # is text after the first
        assert reply("calls amid whitespace") == (None, 2)
        assert reply("text before, between and after") == ("Sure, two calls:\n\n\nand then\n\nDone.", 2)


HARMONY_CALL = ('<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'
                "<|call|>")


@pytest.mark.parametrize("text", [
    "<|channel|>analysis<|message|>Need the weather.<|end|>" + HARMONY_CALL,
    "<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>commentary<|message|>Let me "
    "check.\n\n<|end|>" + HARMONY_CALL,
    "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>",
], ids=["call", "preamble and call", "answer"])
@pytest.mark.parametrize("schedule", ["token by token", "at once"])
def test_a_streamed_harmony_reply_adds_up_to_the_whole_message(text, schedule):
    """gpt-oss: thinking, a preamble the user sees, a call, each a message of their own."""
    pieces = _tokens(text) if schedule == "token by token" else [text]
    whole = _whole(_run("harmony", HarmonyThinking()), text, FinishReason.STOP)
    assert whole["reasoning_content"] and whole["content"] != "Let me check.\n\n"
    _check_same(_streamed(_run("harmony", HarmonyThinking()), pieces, FinishReason.STOP), whole, False)


@pytest.mark.parametrize("fmt", ["hermes", "glm45", "kimi_k2"])
def test_a_reply_cut_by_max_tokens_adds_up_too(fmt):
    """Cut after a call, inside the text that follows it: the finish reason stays "length"."""
    text = _reply(fmt, ["Checking.\n", 1, "\nThen I will"])
    whole = _whole(_run(fmt, None), text, FinishReason.LENGTH)
    assert whole["finish_reason"] == "length" and whole["content"] == "Checking.\n\nThen I will"
    _check_same(_streamed(_run(fmt, None), _tokens(text), FinishReason.LENGTH), whole, fmt == "kimi_k2")


# ------------------------------------------------------------------- served
MIXED = ("Sure.\n\n" + WRITE["hermes"]([0]) + "\n\nand\n" + WRITE["hermes"]([1]) + "\nDone.\n")
END = "<end>"


@pytest.mark.parametrize("reply", [MIXED, WRITE["hermes"]([0, 1]) + "\n"], ids=["text around calls", "calls only"])
def test_a_served_stream_gathers_to_the_whole_reply(tmp_path, reply):
    """Over HTTP, through the openai SDK's ``chat.completions.stream`` helper (with logprobs, whose chunks carry no
    text of their own): the gathered completion is the unstreamed one."""
    pytest.importorskip("transformers")
    from test_serve import Server

    folder, token = write_scripted_checkpoint(tmp_path / "model", reply + END, TOOL_TEMPLATE, context=1024)
    srv = Server(folder)
    try:
        client = srv.client()
        strict = [{**WEATHER, "function": {**WEATHER["function"], "strict": True}}]  # what the helper parses
        ask = dict(model="tiny", messages=[{"role": "user", "content": "weather in Paris and Oslo?"}], tools=strict,
                   logit_bias={str(token): 100}, stop=[END], max_tokens=4, temperature=0, logprobs=True)
        whole = client.chat.completions.create(**ask).choices[0]
        with client.chat.completions.stream(**ask) as stream:
            streamed = stream.get_final_completion().choices[0]
        assert whole.message.content == streamed.message.content == (
            "Sure.\n\n\n\nand\n\nDone." if reply == MIXED else None)
        assert whole.finish_reason == streamed.finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed.message.tool_calls] == [
            (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == [
            ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]

        # the Responses API's stream: its text deltas and final message are the unstreamed response's text
        flat = {"type": "function", **WEATHER["function"]}  # no stop strings here: the reply ends in END
        asked = dict(model="tiny", input="weather in Paris and Oslo?", tools=[flat], max_output_tokens=1,
                     temperature=0, extra_body={"logit_bias": {str(token): 100}})
        done = client.responses.create(**asked)
        events = list(client.responses.create(**asked, stream=True))
        final = events[-1].response
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text == (
            done.output_text)
        assert [(i.name, i.arguments) for i in final.output if i.type == "function_call"] == [
            (i.name, i.arguments) for i in done.output if i.type == "function_call"] and len(final.output) >= 2
    finally:
        assert srv.stop(), srv.log.read_text()
