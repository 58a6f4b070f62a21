"""``/v1/responses`` as the ``openai`` client's ``responses`` API sees it: every reply is the chat endpoint's reply
to the same conversation (greedy, so token for token), reshaped into output items, whole or as typed events."""

from __future__ import annotations

import json
import re

import httpx2 as httpx
import openai
import pytest

from test_serve import Server
from test_serve_tools import CALL, CITY, CLOCK, END, TOOL_TEMPLATE, _check_call
from test_structured import PERSON, check_person

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """test_serve_tools' model: a Hermes tool template (and a token spelling a whole call, unused here)."""
    from support import write_scripted_checkpoint

    folder, _ = write_scripted_checkpoint(tmp_path_factory.mktemp("tools") / "tiny", CALL + END, TOOL_TEMPLATE,
                                          context=1024)
    srv = Server(folder)
    yield srv
    assert srv.stop(), srv.log.read_text()


def _chat(srv: Server, messages: list[dict], **extra) -> str:
    done = srv.client().chat.completions.create(model="tiny", messages=messages, **GREEDY, **extra)
    return done.choices[0].message.content


def _flat(tool: dict) -> dict:
    """A chat tool in the Responses API's flat form."""
    return {"type": "function", **tool["function"]}


def test_a_response_is_the_chat_reply_as_a_message_item(server):
    client = server.client()
    done = client.responses.create(model="tiny", input="hello there", max_output_tokens=12, **GREEDY)
    assert done.object == "response" and done.id.startswith("resp_")
    assert done.output_text == _chat(server, [{"role": "user", "content": "hello there"}], max_completion_tokens=12)
    (item,) = done.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                          max_completion_tokens=12, **GREEDY)
    assert done.usage.input_tokens == chat.usage.prompt_tokens
    assert done.usage.output_tokens == chat.usage.completion_tokens
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    expected = "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    assert done.status == expected
    if expected == "incomplete":
        assert done.incomplete_details.reason == "max_output_tokens"


def test_the_output_texts_logprobs_are_the_chat_replys(server):
    """``include`` of the text's logprobs: the message's entries equal chat's for the same conversation (tokens,
    bytes, values and alternatives), and a stream's deltas carry them, adding up to its done event's."""
    client, conversation = server.client(), [{"role": "user", "content": "hello there"}]
    asked = {"model": "tiny", "input": "hello there", "max_output_tokens": 10, "top_logprobs": 3,
             "include": ["message.output_text.logprobs"], **GREEDY}
    chat = client.chat.completions.create(model="tiny", messages=conversation, max_completion_tokens=10,
                                          logprobs=True, top_logprobs=3, **GREEDY)
    expected = [entry.model_dump() for entry in chat.choices[0].logprobs.content]
    done = client.responses.create(**asked)
    (part,) = done.output[0].content
    assert [entry.model_dump() for entry in part.logprobs] == expected
    assert len(expected) == done.usage.output_tokens and all(len(e["top_logprobs"]) == 3 for e in expected)
    events = list(client.responses.create(**asked, stream=True))
    streamed = [entry for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    (finished,) = [e for e in events if e.type == "response.output_text.done"]
    assert [entry.model_dump() for entry in streamed] == [entry.model_dump() for entry in finished.logprobs]
    assert [entry.model_dump() for entry in finished.logprobs] == expected
    plain = client.responses.create(model="tiny", input="hello there", max_output_tokens=10, **GREEDY)
    assert plain.output[0].content[0].logprobs == []  # not asked for: none


def test_instructions_are_the_system_message_and_input_items_the_messages(server):
    items = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "sec"},
                                                              {"type": "input_text", "text": "ond"}]}]
    done = server.client().responses.create(model="tiny", instructions="be brief", input=items,
                                            max_output_tokens=10, **GREEDY)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "sec\nond"}]  # parts: lines
    assert done.output_text == _chat(server, messages, max_completion_tokens=10)


def test_a_stream_sends_numbered_events_that_add_up_to_the_response(server):
    events = list(server.client().responses.create(model="tiny", input="hello there", max_output_tokens=12,
                                                    stream=True, **GREEDY))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text == events[-2].item.content[0].text
    assert text == _chat(server, [{"role": "user", "content": "hello there"}], max_completion_tokens=12)
    person = {"format": {"type": "json_schema", "name": "person", "schema": PERSON}}  # a reply that completes
    whole = server.client().responses.create(model="tiny", input="who?", max_output_tokens=60, text=person, **GREEDY)
    with server.client().responses.stream(model="tiny", input="who?", max_output_tokens=60, text=person,
                                          **GREEDY) as stream:
        final = stream.get_final_response()  # the client's own accumulation of the events
    assert whole.status == final.status == "completed" and final.output_text == whole.output_text


def test_previous_response_id_continues_the_conversation(server):
    client = server.client()
    first = client.responses.create(model="tiny", input="hello", instructions="sys", max_output_tokens=6, **GREEDY)
    second = client.responses.create(model="tiny", input="and then?", previous_response_id=first.id,
                                     max_output_tokens=6, **GREEDY)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "and then?"}]  # a continuation does not inherit the instructions
    assert second.output_text == _chat(server, messages, max_completion_tokens=6)
    assert client.responses.retrieve(second.id).output_text == second.output_text
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    unstored = client.responses.create(model="tiny", input="hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="more", previous_response_id=unstored.id)


def test_a_json_schema_text_format_shapes_the_output(server):
    done = server.client().responses.create(
        model="tiny", input="who?", max_output_tokens=60, **GREEDY,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    check_person(done.output_text)


def test_a_forced_call_is_a_function_call_item_and_its_result_goes_back_in(tool_server):
    client = tool_server.client()
    done = client.responses.create(model="tiny", input="weather?", tools=[_flat(CITY), _flat(CLOCK)],
                                   tool_choice="required", max_output_tokens=160, temperature=1.0,
                                   extra_body={"seed": 0})  # a call whose every character takes 3 tokens fits
    calls = [item for item in done.output if item.type == "function_call"]
    assert calls and calls[0].call_id.startswith("call_") and done.status == "completed"
    call = calls[0]
    _check_call(type("Call", (), {"function": call})())
    follow = client.responses.create(
        model="tiny", tools=[_flat(CITY), _flat(CLOCK)], max_output_tokens=5, **GREEDY,
        input=[{"role": "user", "content": "weather?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    chat_tools = [CITY, CLOCK]
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": call.call_id, "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    assert follow.output_text == _chat(tool_server, messages, tools=chat_tools, max_completion_tokens=5)
    streamed = list(client.responses.create(model="tiny", input="weather?", tools=[_flat(CITY)], stream=True,
                                            tool_choice={"type": "function", "name": "get_weather"},
                                            max_output_tokens=160, **GREEDY))
    added = [e.item for e in streamed if e.type == "response.output_item.done" and e.item.type == "function_call"]
    arguments = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert [a.name for a in added] == ["get_weather"] and json.loads(arguments) == json.loads(added[0].arguments)


@pytest.mark.parametrize("extra, status, words", [
    ({"temprature": 0.5}, 400, ["temprature"]),
    ({"tools": [{"type": "web_search"}]}, 400, ["web_search"]),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, ["input_image"]),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 404, ["'x'"]),
    ({"input": [{"type": "item_reference"}]}, 400, ["item_reference", "'id' string"]),
    ({"input": [{"type": "computer_call"}]}, 400, ["computer_call", "item_reference"]),
    ({"previous_response_id": "resp_nope"}, 404, ["resp_nope", "latest 1024"]),
    ({"background": True}, 400, ["background"]),
    ({"text": {"format": {"type": "grammar"}}}, 400, ["text.format"]),
    ({"max_output_tokens": 0}, 400, ["max_output_tokens"]),
    ({"text": {"format": "json"}}, 400, ["text.format"]),
    ({"text": {"verbosity": "low"}}, 400, ["text.verbosity"]),
    ({"input": [{"type": "function_call", "call_id": 1, "name": "f", "arguments": "{}"}]}, 400, ["call_id"]),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, 400, ["'text' string"]),
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, ["no message"]),
    ({"reasoning": {"effort": 5}}, 400, ["reasoning.effort"]),
    ({"include": ["reasoning.encrypted_contents"]}, 400, ["reasoning.encrypted_contents", "not one of"]),
    ({"top_logprobs": 2}, 400, ["top_logprobs", "message.output_text.logprobs"]),
    ({"top_logprobs": 21, "include": ["message.output_text.logprobs"]}, 400, ["top_logprobs"]),
    ({"include": ["message.output_text.logprobs"], "tools": [{"type": "function", "name": "f"}]}, 400,
     ["logprobs", "tools"]),
    ({"stream_options": {"include_obfuscation": False}}, 400, ["stream_options", "stream is true"]),
    ({"stream": True, "stream_options": {"x": 1}}, 400, ["stream_options.x"]),
    ({"max_tool_calls": -1}, 400, ["max_tool_calls"]),
])
def test_what_cannot_be_honoured_is_refused_by_name(server, extra, status, words):
    body = {"model": "tiny", "input": "hi", **extra}
    reply = httpx.post(server.url + "/v1/responses", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    message = reply.json()["error"]["message"]
    assert all(w in message for w in words), message


@pytest.mark.parametrize("extra, param", [
    ({"input": "hello " * 5000}, "input"),
    ({"max_output_tokens": 10**6}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"$ref": "#"}}}}, "text.format"),
])
def test_errors_name_the_responses_parameters(server, extra, param):
    """The request runs as a chat request; its errors still name the Responses API's fields, in the message too."""
    reply = httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": "hi", **extra}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param
    assert not re.search(r"\bmax_tokens\b|\bmax_completion_tokens\b|\bmessages\b", error["message"]), error


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from support import write_text_checkpoint

    srv = Server(write_text_checkpoint(tmp_path_factory.mktemp("responses") / "tiny", seed=3))
    yield srv
    assert srv.stop(), srv.log.read_text()


def test_thinking_is_a_reasoning_item(tmp_path):
    from support import write_scripted_checkpoint
    from test_serve_reasoning import END as REPLY_END, R1_TEMPLATE, REPLY

    folder, reply_id = write_scripted_checkpoint(tmp_path / "tiny", REPLY + REPLY_END, R1_TEMPLATE)
    srv = Server(folder, "--reasoning-parser", "deepseek_r1")
    try:
        done = srv.client().responses.create(model="tiny", input="weather?", max_output_tokens=1, **GREEDY,
                                             extra_body={"logit_bias": {str(reply_id): 100}})
        thought, message = done.output
        assert thought.type == "reasoning" and thought.content[0].text == "plan it"
        assert message.type == "message" and done.output_text == "It is sunny." + REPLY_END
        assert 0 < done.usage.output_tokens_details.reasoning_tokens <= done.usage.output_tokens
        events = list(srv.client().responses.create(model="tiny", input="weather?", max_output_tokens=1, stream=True,
                                                    extra_body={"logit_bias": {str(reply_id): 100}}, **GREEDY))
        kinds = [e.type for e in events]
        assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
        assert [i.type for i in events[-1].response.output] == ["reasoning", "message"]
        # the thinking ended before the cut: complete either way, as the stream closes it when the answer starts
        assert thought.status == events[-1].response.output[0].status == "completed"
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "plan it"
        with pytest.raises(openai.BadRequestError, match="not single tokens"):  # its tags are inside one token
            srv.client().responses.create(model="tiny", input="weather?", include=["message.output_text.logprobs"])
    finally:
        assert srv.stop(), srv.log.read_text()


def test_the_stores_memory_is_the_bytes_it_counts():
    """A response with logprobs (many small dicts and floats) held as Python objects took ~5x the JSON bytes the
    budget counts; what the store holds must be what it counts, and a ``get`` must not hand out its own state."""
    import tracemalloc

    from ferrum.serve.responses import ResponseStore

    def response(i: int) -> dict:
        entries = [{"token": f"t{j}", "logprob": -0.5 * j, "bytes": [116, 48 + j % 10],
                    "top_logprobs": [{"token": f"u{k}", "logprob": -1.0 * k, "bytes": [117]} for k in range(5)]}
                   for j in range(200)]
        return {"id": f"resp_{i}", "output": [{"type": "message", "content": [{"logprobs": entries}]}]}

    store = ResponseStore(size=100, max_bytes=1 << 30)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20):
        store.put(response(i), [{"role": "user", "content": "hi"}])
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert held < 1.3 * store.bytes, (held, store.bytes)
    got, _ = store.get("resp_3")
    got["output"].clear()
    assert store.get("resp_3")[0]["output"], "a get handed out the stored object"


def test_the_store_drops_the_oldest_past_its_count_or_its_bytes():
    """A chain of turns stores its history once per turn, so the store is bounded in bytes as well as in count;
    the least recently used go first, and one response over the whole budget is not kept."""
    from ferrum.serve.errors import APIError
    from ferrum.serve.responses import ResponseStore

    def turn(i: int, words: int) -> tuple[dict, list[dict], list[dict]]:
        return {"id": f"resp_{i}"}, [{"role": "user", "content": "word " * words}], []

    small = len(json.dumps(list(turn(0, 10))).encode())
    budget = 10_000
    store = ResponseStore(size=3, max_bytes=budget)
    for i in range(4):
        store.put(*turn(i, 10))
    with pytest.raises(APIError, match="resp_0"):
        store.get("resp_0")  # over the count
    assert store.bytes == 3 * small
    store.get("resp_1")  # now the most recently used
    big = turn(4, (budget - small) // 5 - 20)  # fits beside one small response, not beside two
    store.put(*big)  # the count drops resp_2, the bytes resp_3
    assert small + len(json.dumps(list(big)).encode()) <= budget < 2 * small + len(json.dumps(list(big)).encode())
    assert [store.get(f"resp_{i}")[0]["id"] for i in (1, 4)] == ["resp_1", "resp_4"]
    for gone in ("resp_2", "resp_3"):
        with pytest.raises(APIError):
            store.get(gone)
    assert store.bytes <= budget
    store.put(*turn(5, 5000))  # larger than the whole budget: not kept, nothing else dropped for it
    with pytest.raises(APIError, match="MiB"):
        store.get("resp_5")
    kept = store.bytes
    store.delete("resp_4")
    assert 0 < store.bytes < kept


def _r1_app(tmp_path):
    """A server with ``--reasoning-parser deepseek_r1`` over the test model whose template opens ``<think>`` in
    the prompt (DeepSeek-R1's), both tags single tokens: the app and the id of ``</think>``."""
    import ferrum
    from ferrum.serve.app import ServeConfig, create_app
    from support import add_tokens, write_text_checkpoint
    from test_structured_thinking import R1_TEMPLATE, TAGS

    folder = write_text_checkpoint(tmp_path / "tiny", seed=3)
    _, close_id = add_tokens(folder, list(TAGS))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": R1_TEMPLATE}))
    return create_app(ferrum.load(folder, backend="cpu"),
                      ServeConfig(model_names=("tiny",), reasoning_parser="deepseek_r1")), close_id


def test_a_thinking_replys_logprobs_are_those_of_its_answer(tmp_path):
    """With ``--reasoning-parser`` and ``<think>`` / ``</think>`` single tokens, the message's logprob entries are
    those of the tokens after ``</think>``: chat's entries (which cover every token) past the first one, whole and
    streamed. A logit bias on ``</think>`` is searched for that makes the reply think a while, then answer."""
    from starlette.testclient import TestClient

    from test_structured_thinking import TAGS

    app, close_id = _r1_app(tmp_path)
    with TestClient(app) as client:
        for bias in (2.0, 2.2, 2.4, 2.6, 2.8, 3.0):
            chat = client.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "who?"}], "max_tokens": 24,
                "temperature": 0, "logprobs": True, "top_logprobs": 2, "logit_bias": {str(close_id): bias}}).json()
            every = chat["choices"][0]["logprobs"]["content"]
            tokens = [entry["token"] for entry in every]
            if TAGS[1] in tokens and 0 < tokens.index(TAGS[1]) < len(tokens) - 2:
                break
        else:
            pytest.fail("no bias made the reply think, then answer")
        expected = every[tokens.index(TAGS[1]) + 1:]
        asked = {"model": "tiny", "input": "who?", "max_output_tokens": 24, "temperature": 0, "top_logprobs": 2,
                 "include": ["message.output_text.logprobs"], "logit_bias": {str(close_id): bias}}
        done = client.post("/v1/responses", json=asked).json()
        thought, message = done["output"]
        assert thought["type"] == "reasoning" and message["content"][0]["logprobs"] == expected
        with client.stream("POST", "/v1/responses", json={**asked, "stream": True}) as stream:
            events = [json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: ")]
    deltas = [entry for e in events if e["type"] == "response.output_text.delta" for entry in e["logprobs"]]
    (finished,) = [e for e in events if e["type"] == "response.output_text.done"]
    assert deltas == finished["logprobs"] == expected


def test_a_replayed_turn_with_text_and_calls_is_one_assistant_message():
    """``response.output`` sent back as input (the stateless way): the reply's text and its calls are one
    assistant turn, as the model wrote them, not two."""
    from ferrum.serve.responses import _messages

    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    messages = _messages([
        {"role": "user", "content": "weather?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        call, {**call, "call_id": "c2"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ])
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["content"] == "Let me check." and [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]


def test_a_streamed_reply_keeps_the_text_after_its_calls(tmp_path):
    """A reply that goes on after its call: streamed, its message holds that text, as the whole reply's does."""
    from starlette.testclient import TestClient

    import ferrum
    from ferrum.serve.app import ServeConfig, create_app
    from support import write_scripted_checkpoint

    folder, token = write_scripted_checkpoint(tmp_path / "m", CALL + " and more", TOOL_TEMPLATE, context=1024)
    body = {"model": "tiny", "input": "weather?", "tools": [_flat(CITY)], "logit_bias": {str(token): 100},
            "max_output_tokens": 1, **GREEDY}
    app = create_app(ferrum.load(folder, backend="cpu"), ServeConfig(model_names=("tiny",)))

    def texts(output: list) -> list[str]:
        return [part["text"].strip() for item in output if item["type"] == "message" for part in item["content"]]

    with TestClient(app) as client:
        whole = client.post("/v1/responses", json=body).json()["output"]
        stream = client.post("/v1/responses", json={**body, "stream": True}).text
    events = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: ")]
    streamed = events[-1]["response"]["output"]
    assert texts(whole) == texts(streamed) == ["and more"]
    assert [item["type"] for item in streamed].count("function_call") == 1


def test_input_items_list_a_responses_input_in_pages(server):
    """``client.responses.input_items.list``: the request's own input (not its history), each item with an id,
    newest first unless asked, in pages the client follows."""
    client = server.client()
    first = client.responses.create(model="tiny", input="hello", max_output_tokens=2, **GREEDY)
    listed = client.responses.input_items.list(first.id)
    (item,) = listed.data
    assert item.type == "message" and item.role == "user" and item.id.startswith("msg_")
    assert [part.text for part in item.content] == ["hello"] and listed.has_more is False
    turns = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    second = client.responses.create(model="tiny", input=turns, previous_response_id=first.id, max_output_tokens=2,
                                     **GREEDY)
    page = client.responses.input_items.list(second.id, limit=2)
    assert [i.content[0].text for i in page.data] == ["turn 4", "turn 3"] and page.has_more
    every = [i.content[0].text for i in client.responses.input_items.list(second.id, limit=2, order="asc")]
    assert every == [f"turn {i}" for i in range(5)]  # the client follows has_more / after through the pages
    for query, param in (({"limit": 0}, "limit"), ({"order": "up"}, "order"), ({"after": "msg_x"}, "after"),
                         ({"limit": "many"}, "limit")):
        reply = httpx.get(f"{server.url}/v1/responses/{second.id}/input_items", params=query, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")


def test_function_tools_with_null_parameters_take_no_arguments(tool_server):
    """The Responses API's function tool has ``parameters`` nullable: a function of no arguments."""
    server, tool = tool_server, {"type": "function", "name": "ping", "parameters": None, "strict": None}
    done = server.client().responses.create(model="tiny", input="hi", tools=[tool], max_output_tokens=2,
                                            stream=None, **GREEDY)
    assert done.status in ("completed", "incomplete")
    chat = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "tools": [{"type": "function", "function": {"name": "ping", "parameters": None}}]})
    assert chat.status_code == 200, chat.text


def test_a_reasoning_item_sent_back_is_the_next_assistant_turns_thinking():
    """OpenAI asks clients to send reasoning items back through a tool loop; chat templates (Qwen 3's, gpt-oss's)
    write that thinking into the turn of the calls, as chat's replayed reasoning_content does (it was dropped)."""
    from ferrum.serve.responses import ResponsesRequest, to_chat

    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    items = [{"role": "user", "content": "weather?"},
             {"type": "reasoning", "id": "rs_1", "summary": [],
              "content": [{"type": "reasoning_text", "text": "I should call it"}]},
             call, {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    _, conversation = to_chat(ResponsesRequest(input=items), [])
    turn = conversation[1]
    assert turn["role"] == "assistant" and turn["reasoning_content"] == "I should call it"
    assert turn["tool_calls"][0]["function"]["name"] == "get_weather"
    _, plain = to_chat(ResponsesRequest(input=[items[0], call, items[3]]), [])
    assert "reasoning_content" not in plain[1]


def test_a_reply_cut_inside_its_thinking_is_the_reasoning_item_alone(tmp_path):
    """As OpenAI returns a reasoning model that ``max_output_tokens`` stopped while it thought: ``incomplete``,
    the reasoning item and no (empty) message, whole and streamed."""
    from starlette.testclient import TestClient

    app, close_id = _r1_app(tmp_path)
    asked = {"model": "tiny", "input": "who?", "max_output_tokens": 4, "temperature": 0,
             "logit_bias": {str(close_id): -100}}
    with TestClient(app) as client:
        done = client.post("/v1/responses", json=asked).json()
        with client.stream("POST", "/v1/responses", json={**asked, "stream": True}) as stream:
            events = [json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert done["status"] == "incomplete" and done["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["type"] for item in done["output"]] == ["reasoning"] and done["output"][0]["content"][0]["text"]
    assert [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"] == ["reasoning"]
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["reasoning"]
    assert events[-1]["type"] == "response.incomplete"
