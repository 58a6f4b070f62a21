"""gpt-oss's harmony replies: the analysis channel comes back as ``reasoning_content``, the final channel as the
content, a message to ``functions.NAME`` as a tool call, whole or streamed; the markers never reach the client."""

from __future__ import annotations

import json

import pytest

from ferrum.serve.harmony import HarmonyThinking, read

THINK = "<|channel|>analysis<|message|>The user wants the weather.<|end|>"
ANSWER = THINK + "<|start|>assistant<|channel|>final<|message|>It is sunny."
CALL = (THINK + "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris"}')
MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>"]
END = "<end>"
#: A harmony chat template as gpt-oss's writes it, cut down: messages, the tools' names, calls written back.
TEMPLATE = (
    "{%- for m in messages %}{%- if m.tool_calls %}<|start|>assistant to=functions."
    "{{ m.tool_calls[0].function.name }}<|channel|>commentary json<|message|>"
    "{{ m.tool_calls[0].function.arguments }}<|call|>{%- else %}<|start|>{{ m.role }}<|message|>{{ m.content }}"
    "<|end|>{%- endif %}{%- endfor %}{%- if tools %}<|start|>developer<|message|>"
    "{%- for t in tools %}{{ t.function.name }} {% endfor %}<|end|>{%- endif %}"
    "{%- if add_generation_prompt %}<|start|>assistant{%- endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _pieces(reply: str) -> list[str]:
    """A reply as a stream brings it: markers whole, words one at a time."""
    out, rest = [], reply
    while rest:
        marker = next((m for m in MARKERS if rest.startswith(m)), None)
        size = len(marker) if marker else min((rest.find(m) for m in MARKERS if m in rest[1:]), default=len(rest))
        piece = rest[: size if marker else max(1, min(size, 4))]
        out.append(piece)
        rest = rest[len(piece):]
    return out


def test_a_reply_reads_as_thinking_answer_and_calls():
    assert read(ANSWER, True) == ("The user wants the weather.", "It is sunny.")
    thinking, answer = read(CALL, True)
    assert thinking == "The user wants the weather."
    assert answer == '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'
    # the recipient may come before the channel, as the template writes calls back
    assert read("<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}", True)[1].endswith(
        "to=functions.f<|channel|>commentary json<|message|>{}")
    assert read("It is sunny.", True) == (None, "It is sunny.")  # no header (a schema shaped it): all answer
    assert read("It is sunny.", False) == (None, "")  # ... once it has ended, not while it may be a header


@pytest.mark.parametrize("reply", [ANSWER, CALL])
def test_a_stream_sends_the_thinking_once_and_the_answer_as_it_grows(reply):
    harmony, sent, answers = HarmonyThinking(), "", []
    pieces = _pieces(reply)
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        thought, answer = harmony.delta(0, text, finished=i == len(pieces) - 1)
        assert "<|" not in thought
        sent += thought
        answers.append(answer)
    assert sent == "The user wants the weather."
    assert all(later.startswith(earlier) for earlier, later in zip(answers, answers[1:]))  # streamable
    assert answers[-1] == read(reply, True)[1]


# ------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def harmony_model(tmp_path_factory):
    """A tiny model with a harmony tokenizer and template; tokens spelling a whole reply, which a logit bias
    makes it write: ``(folder, answer id, call id, call id without the stop string)``."""
    pytest.importorskip("transformers")
    from support import add_tokens, write_scripted_checkpoint

    folder, answer_id = write_scripted_checkpoint(tmp_path_factory.mktemp("harmony") / "tiny", ANSWER + END,
                                                  TEMPLATE, special=True, context=1024)
    call_id, bare_call_id = add_tokens(folder, [CALL + END, CALL], special=True)  # the Responses API takes no stop
    add_tokens(folder, MARKERS, special=True)
    return folder, answer_id, call_id, bare_call_id


@pytest.fixture(scope="module")
def harmony_server(harmony_model):
    from test_serve import Server

    folder, *ids = harmony_model
    srv = Server(folder)
    yield srv, *ids
    assert srv.stop(), srv.log.read_text()


def test_the_python_api_keeps_a_chat_reply_readable(harmony_model):
    """``LLM.generate`` returns a harmony chat reply with its markers (what ``read`` splits), not the run of
    channel names and texts that skipping special tokens leaves; other prompts, or an explicit
    ``skip_special_tokens``, decode as tokenizers do."""
    import ferrum

    folder, answer_id, *_ = harmony_model
    llm = ferrum.load(folder, backend="cpu")
    ask = dict(logit_bias={answer_id: 100}, stop=[END], max_tokens=2, temperature=0)
    assert llm.tokenizer.writes_harmony
    reply = llm.generate("weather?", chat=True, **ask)
    assert reply == ANSWER and read(reply, True) == ("The user wants the weather.", "It is sunny.")
    assert llm.generate([{"role": "user", "content": "weather?"}], **ask) == ANSWER
    assert "".join(llm.stream("weather?", chat=True, **ask)) == ANSWER
    assert llm.generate("weather?", chat=True, skip_special_tokens=True, **ask) == ""
    assert llm.generate("weather?", **ask) == ""  # no template: no harmony reply to read


def _ask(srv, reply_id: int, **extra):
    return srv.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], logit_bias={str(reply_id): 100},
        stop=[END], max_tokens=2, temperature=0, **extra)


def test_the_answer_is_the_content_and_the_analysis_the_reasoning(harmony_server):
    srv, answer_id, *_ = harmony_server
    message = _ask(srv, answer_id).choices[0].message
    assert message.content == "It is sunny."
    assert message.model_extra["reasoning_content"] == "The user wants the weather."
    chunks = list(_ask(srv, answer_id, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "The user wants the weather."
    assert "".join(d.content or "" for d in deltas) == "It is sunny."
    assert chunks[-1].choices[0].finish_reason == "stop"
    # vLLM's default skip_special_tokens=true, which some clients send: the markers are read all the same
    told = _ask(srv, answer_id, extra_body={"skip_special_tokens": True}).choices[0].message
    assert (told.content, told.model_extra["reasoning_content"]) == ("It is sunny.", "The user wants the weather.")


def test_a_message_to_a_function_is_a_tool_call(harmony_server):
    srv, _, call_id, _ = harmony_server
    choice = _ask(srv, call_id, tools=[WEATHER]).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.model_extra["reasoning_content"] == "The user wants the weather."
    chunks = list(_ask(srv, call_id, tools=[WEATHER], stream=True))
    calls = [d.tool_calls[0] for c in chunks if c.choices for d in [c.choices[0].delta] if d.tool_calls]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call goes back into the conversation as the template writes it, and the model answers
    follow = srv.client().chat.completions.create(
        model="tiny", temperature=0, max_tokens=2, stop=[END], logit_bias={str(harmony_server[1]): 100},
        tools=[WEATHER], messages=[{"role": "user", "content": "weather?"}, choice.message.model_dump(),
                                   {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message.content == "It is sunny."


def test_a_returned_message_goes_back_whole_with_its_thinking():
    """``messages.append(reply.message.model_dump())``: the output-only fields come back empty and are accepted,
    the thinking (``reasoning_content``, or vLLM's newer ``reasoning``) reaches the template (which the tokenizer
    hands it under every name templates read it by); a deprecated ``function_call`` is refused."""
    from pydantic import ValidationError

    from ferrum.serve.protocol import ChatMessage, template_messages

    returned = {"role": "assistant", "content": None, "refusal": None, "annotations": None, "audio": None,
                "function_call": None, "reasoning_content": "Look it up.",
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    (entry,) = template_messages([ChatMessage(**returned)])
    assert entry["reasoning_content"] == "Look it up." and entry["content"] == ""
    assert template_messages([ChatMessage(**{**returned, "reasoning_content": None, "reasoning": "Look it up."})]) == \
        [entry]
    with pytest.raises(ValidationError):
        ChatMessage(**{**returned, "function_call": {"name": "get_weather", "arguments": "{}"}})


def test_the_responses_api_gives_a_reasoning_item_and_the_answer(harmony_server):
    srv, answer_id, *_ = harmony_server
    done = srv.client().responses.create(model="tiny", input="weather?", max_output_tokens=1, temperature=0,
                                         extra_body={"logit_bias": {str(answer_id): 100}})
    kinds = [item.type for item in done.output]
    assert kinds == ["reasoning", "message"] and done.output_text == "It is sunny." + END  # no stop strings here
    assert done.output[0].content[0].text == "The user wants the weather."


@pytest.mark.parametrize("many", [False, True])
def test_a_forced_calls_grammar_takes_one_call_message(tmp_path, many):
    """``tool_choice`` named or required: one message to a function, headed as the template writes calls back
    (generation stops at ``<|call|>`` after it, so "required" gets one call too); it reads as that call."""
    from ferrum.serve.tools import FORMATS
    from test_serve_tools import _forced_matcher, _takes

    harmony = next(f for f in FORMATS if f.name == "harmony")
    text = '<|channel|>commentary to=functions.get_time json<|message|>{"tz": "UTC"}'
    tok, matcher = _forced_matcher(tmp_path, harmony, TEMPLATE, ("<|channel|>", "<|message|>"), True, many)
    assert _takes(tok, matcher, text) and matcher.complete
    (call,) = harmony.parse(read(text, True)[1]).calls
    assert call["function"]["name"] == "get_time" and json.loads(call["function"]["arguments"]) == {"tz": "UTC"}


def test_ferrum_generate_prints_the_answer_and_sends_the_thinking_to_stderr(capsys):
    """``ferrum generate`` on a harmony model: the reply as it streams, its thinking on stderr, its answer on
    stdout, no marker on either."""
    from types import SimpleNamespace

    from ferrum.cli import _write_reply

    pieces, text, outputs = _pieces(ANSWER), "", []
    for i, piece in enumerate(pieces):
        text += piece
        outputs.append(SimpleNamespace(text=text, new_text=piece, finished=i == len(pieces) - 1))
    assert _write_reply(outputs, HarmonyThinking()) == (outputs[-1], "It is sunny.")  # what `ferrum chat` keeps
    printed = capsys.readouterr()
    assert printed.out == "It is sunny.\n" and printed.err == "The user wants the weather."
    assert _write_reply(outputs) == (outputs[-1], ANSWER)  # any other model: the text as it decodes
    assert capsys.readouterr().out == ANSWER + "\n"


def test_the_responses_api_gives_a_function_call_item(harmony_server):
    srv, *_, call_id = harmony_server
    done = srv.client().responses.create(
        model="tiny", input="weather?", max_output_tokens=1, temperature=0,
        tools=[{"type": "function", **WEATHER["function"]}], extra_body={"logit_bias": {str(call_id): 100}})
    reasoning, call = done.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "The user wants the weather."
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}


def test_the_answers_tokens_start_after_its_header(harmony_model):
    """The Responses API's output-text logprobs cover the answer's tokens: those after the final message's
    header, none of a reply that only thinks or calls, all of one without headers."""
    import ferrum

    tokenizer = ferrum.load(harmony_model[0], backend="cpu").tokenizer
    harmony = HarmonyThinking()
    call = CALL.replace("Paris", "Oslo")  # not the scripted tokens spelling whole replies
    for reply, answer in [(ANSWER + "<|return|>", "It is sunny."), (call + "<|call|>", None), (THINK, None),
                          ("It is sunny.", "It is sunny."),
                          (call + "<|end|><|start|>assistant<|channel|>commentary<|message|>Checking.", "Checking.")]:
        ids = tokenizer.encode(reply, add_special_tokens=False)
        assert len(ids) > 10
        start = harmony.answer_start(reply, ids, tokenizer)
        if answer is None:
            assert start == len(ids), reply
        else:
            assert tokenizer.decode(ids[start:]) == answer, reply
