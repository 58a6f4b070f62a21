"""Request shapes real clients send (a bug hunt drove the server with them): each once refused or mishandled.

The app runs in process (Starlette's test client) over test_serve_tools' model: a Hermes tool template, an API key.
"""

from __future__ import annotations

import json

import pytest

import ferrum
from support import write_scripted_checkpoint
from test_serve_tools import CALL, CITY, END, TOOL_TEMPLATE, _forced_matcher, _takes

KEY = {"Authorization": "Bearer sekret"}
HI = [{"role": "user", "content": "hello"}]
GREEDY = {"model": "tiny", "temperature": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_scripted_checkpoint(tmp_path_factory.mktemp("clients") / "tiny", CALL + END, TOOL_TEMPLATE,
                                     context=1024)[0]


@pytest.fixture(scope="module")
def llm(folder):
    return ferrum.load(folder, backend="cpu", dtype="float32")


@pytest.fixture(scope="module")
def client(llm):
    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    with TestClient(create_app(llm, ServeConfig(model_names=("tiny",), api_key="sekret")), headers=KEY) as c:
        yield c


def _chat(client, **body):
    return client.post("/v1/chat/completions", json={**GREEDY, "messages": HI, "max_tokens": 3, **body})


def _prompt_text(client, messages, tools=None) -> str:
    ids = client.post("/tokenize", json={"messages": messages, **({"tools": tools} if tools else {})}).json()["tokens"]
    return client.post("/detokenize", json={"tokens": ids}).json()["prompt"]


# ---------------------------------------------------------------- chat
@pytest.mark.parametrize("header, status", [
    ("Bearer sekret", 200), ("bearer sekret", 200), ("BEARER sekret", 200), ("Bearer  sekret", 200),
    ("Bearer wrong", 401), ("Basic sekret", 401), ("sekret", 401), ("bearer", 401), ("", 401),
])
def test_the_authorization_scheme_is_case_insensitive(client, header, status):
    """RFC 9110: the scheme is a case-insensitive token (``bearer KEY`` got a 401); the key itself must match."""
    assert client.get("/v1/models", headers={"Authorization": header}).status_code == status


@pytest.mark.parametrize("arguments", ["{'q': 'x'}", '{"city": "Par', "[1, 2]", "7"])
def test_a_call_whose_arguments_are_not_a_json_object_goes_back_as_its_text(client, arguments):
    """OpenAI takes any arguments text back in the history: a call ``max_tokens`` cut, a small model's Python dict.
    The template gets the text as it is (here ``| tojson``: a JSON string of it); every later turn was a 400."""
    history = HI + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "error: not JSON"}]
    reply = _chat(client, messages=history, tools=[CITY])
    assert reply.status_code == 200, reply.text
    assert f'"arguments": {json.dumps(arguments)}' in _prompt_text(client, history, [CITY])
    good = json.loads(json.dumps(history))
    good[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Oslo"}'  # still an object to the template
    assert '"arguments": {"city": "Oslo"}' in _prompt_text(client, good, [CITY])


def test_a_template_that_reads_arguments_as_an_object_names_the_call_it_cannot_render(folder):
    """A template iterating ``arguments.items()`` (GLM's) or ``arguments | items`` (Qwen3-Coder's) cannot render
    text: a 400 naming the call, not a 500."""
    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    history = HI + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{'q': 'x'}"}}]}]
    for loop in ("call.function.arguments.items()", "call.function.arguments | items"):
        llm = ferrum.load(folder, backend="cpu", dtype="float32")
        llm.use_chat_template("{{ tools | length }} <tool_call>{% for m in messages %}{{ m.content }}"
                              "{% for call in m.tool_calls or [] %}{% for k, v in " + loop + " %}{{ k }}={{ v }}"
                              "{% endfor %}{% endfor %}{% endfor %}")
        with TestClient(create_app(llm, ServeConfig(model_names=("tiny",)))) as plain:
            reply = plain.post("/v1/chat/completions", json={**GREEDY, "messages": history, "max_tokens": 1,
                                                             "tools": [CITY]})
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["param"] == "messages.1.tool_calls.0" and "not a JSON object" in error["message"], error
            history[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Oslo"}'
            assert plain.post("/v1/chat/completions", json={**GREEDY, "messages": history, "max_tokens": 1,
                                                             "tools": [CITY]}).status_code == 200
            history[1]["tool_calls"][0]["function"]["arguments"] = "{'q': 'x'}"


def test_a_lone_surrogate_escape_is_read_as_the_replacement_character(client):
    """``"\\ud83d"`` (a string cut inside an emoji by ``JSON.stringify`` or ``json.dumps``) is valid JSON: read,
    wherever text enters, as U+FFFD (the tokenizer takes no surrogate); it was a 400 "not valid JSON"."""
    cut = "tool output \ud83d"
    body = {**GREEDY, "messages": [{"role": "user", "content": cut}], "max_tokens": 3, "stop": ["\udc00"],
            "tools": [{"type": "function", "function": {**CITY["function"], "description": "a city \ud83d"}}]}
    reply = client.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert reply.status_code == 200, reply.text
    mended = json.loads(json.dumps(body).replace("\\ud83d", "\\ufffd").replace("\\udc00", "\\ufffd"))
    assert reply.json()["choices"][0]["message"] == _chat(client, **mended).json()["choices"][0]["message"]
    pair = client.post("/v1/chat/completions", content=json.dumps({**body, "messages": [
        {"role": "user", "content": "\ud83d\ude00"}]}), headers={"content-type": "application/json"})
    assert pair.status_code == 200  # a pair is the character it spells, as before
    broken = client.post("/v1/chat/completions", content=b'{"messages": "\\ud83d')
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_predicted_outputs_are_accepted_and_change_nothing(client):
    """``prediction`` (Continue, Zed) only makes OpenAI's reply faster; the reply is the one without it."""
    alone = _chat(client, max_tokens=6).json()["choices"][0]["message"]
    for content in ("def add(a, b):", [{"type": "text", "text": "def add"}]):
        reply = _chat(client, max_tokens=6, prediction={"type": "content", "content": content})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"] == alone
    for bad, param in (({"type": "content"}, "prediction.content"), ({"type": "x", "content": "y"}, "prediction.type"),
                       ({"type": "content", "content": [{"type": "image_url"}]}, "prediction.content")):
        error = _chat(client, prediction=bad).json()["error"]
        assert error["param"] is not None and error["param"].startswith(param), error


@pytest.mark.parametrize("extra, status, param, words", [
    ({"stream": True, "stream_options": {"include_obfuscation": False}}, 200, None, []),
    ({"stream": True, "stream_options": {"include_obfuscation": True, "include_usage": True}}, 200, None, []),
    ({"verbosity": "medium"}, 200, None, []),
    ({"prompt_cache_retention": "24h", "prompt_cache_key": "k"}, 200, None, []),
    ({"prompt_cache_retention": "in_memory"}, 200, None, []),
    ({"verbosity": "low"}, 400, "verbosity", ["verbosity"]),
    ({"web_search_options": {}}, 400, "web_search_options", ["web search"]),
    ({"moderation": {"model": "omni-moderation-latest"}}, 400, "moderation", ["moderation model"]),
    ({"prompt_cache_retention": "1h"}, 400, "prompt_cache_retention", []),
    ({"stream": True, "stream_options": {"include_obfuscations": False}}, 400, "stream_options.include_obfuscations",
     ["unknown field"]),
])
def test_openai_chat_fields_are_accepted_at_no_op_values_or_refused_by_name(client, extra, status, param, words):
    reply = _chat(client, **extra)
    assert reply.status_code == status, reply.text
    if status != 200:
        error = reply.json()["error"]
        assert error["param"] == param and all(w in error["message"] for w in words), error


WEATHER_ANSWER = {"type": "json_schema", "json_schema": {"name": "final_output", "strict": True, "schema": {
    "type": "object", "properties": {"answer": {"type": "string", "maxLength": 5}}, "required": ["answer"],
    "additionalProperties": False}}}


def test_response_format_beside_tools_leaves_the_model_free_to_call(client, llm):
    """The Agents SDK's request: tools (auto) and the agent's output type as ``response_format``. The reply is a call
    or the answer in the schema (the schema held the whole reply: a call could never be written)."""
    lt = str(llm.tokenizer.encode("<", add_special_tokens=False)[0])
    ask = dict(tools=[CITY], response_format=WEATHER_ANSWER, max_tokens=80, parallel_tool_calls=False)
    called = _chat(client, **ask, logit_bias={lt: 100}).json()["choices"][0]  # the model wants to open <tool_call>
    assert called["finish_reason"] == "tool_calls", called
    (call,) = called["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and set(json.loads(call["function"]["arguments"])) == {"city"}
    spaces = {str(t): -100 for t in range(llm.tokenizer.vocab_size) if not llm.tokenizer.decode([t]).strip()}
    answered = _chat(client, **ask, logit_bias={lt: -100, **spaces}).json()["choices"][0]  # JSON's free whitespace
    assert not answered["message"].get("tool_calls") and set(json.loads(answered["message"]["content"])) == {"answer"}


def test_a_call_or_answer_grammar_takes_either_and_nothing_else(tmp_path):
    from ferrum.sampling import SamplingParams
    from ferrum.serve.tools import FORMATS, call_or_answer_grammar
    from ferrum.structured import matcher_for
    from ferrum.tokenizer import Tokenizer
    from support import write_tokenizer

    pytest.importorskip("llguidance")
    write_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    hermes = next(f for f in FORMATS if f.name == "hermes")
    schema = WEATHER_ANSWER["json_schema"]["schema"]

    def takes(text: str, many: bool = False) -> bool:
        grammar = call_or_answer_grammar(hermes, [CITY], tok, TOOL_TEMPLATE, schema, many)
        return _takes(tok, matcher_for(SamplingParams(grammar=grammar), tok, 300, frozenset({1})), text)

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert takes(call) and takes(call + "\n" + call, many=True) and not takes(call + "\n" + call)
    assert takes('{"answer": "sun"}') and not takes('{"answer": "sunny days"}') and not takes("sunny")
    harmony = next(f for f in FORMATS if f.name == "harmony")
    with pytest.raises(Exception, match="response_format beside tools"):
        call_or_answer_grammar(harmony, [CITY], tok, "", schema, False)


@pytest.mark.parametrize("parameters", [{"type": "object", "properties": {}}, {"type": "object"}])
def test_a_forced_call_to_a_tool_of_empty_properties_takes_no_arguments(tmp_path, parameters):
    """OpenAI's documented form of a function of no arguments (LangChain writes it): its arguments are ``{}``, as
    xgrammar's strict mode (vLLM's default) holds an object that does not say ``additionalProperties``."""
    from test_serve_tools import FORCED_ROWS

    fmt, template, _, _, markers = FORCED_ROWS[0]
    now = {"type": "function", "function": {"name": "now", "parameters": parameters}}
    call = '<tool_call>\n{"name": "now", "arguments": %s}\n</tool_call>'
    tok, matcher = _forced_matcher(tmp_path / "empty", fmt, template, markers, True, many=False, tools=[now])
    assert _takes(tok, matcher, call % "{}") and matcher.complete
    tok, matcher = _forced_matcher(tmp_path / "keys", fmt, template, markers, True, many=False, tools=[now])
    assert not _takes(tok, matcher, call % '{"x": 1}')


# ------------------------------------------------------------ responses
def test_an_item_reference_stands_for_the_stored_item_it_names(client):
    """The Vercel AI SDK sends an earlier turn's output as ``{"type": "item_reference", "id": ...}``: the stored item
    it names, so the reply is the one to the item sent whole; an id no stored response holds is a 404 naming it."""
    ask = {"model": "tiny", "max_output_tokens": 4, "temperature": 0}
    first = client.post("/v1/responses", json={**ask, "input": "hello"}).json()
    (item,) = first["output"]

    def turn(earlier: dict) -> dict:
        return {**ask, "input": [{"role": "user", "content": "hello"}, earlier,
                                 {"role": "user", "content": "and then?"}]}

    whole = client.post("/v1/responses", json={**turn(item), "store": False}).json()
    referred = client.post("/v1/responses", json=turn({"type": "item_reference", "id": item["id"]}))
    assert referred.status_code == 200, referred.text
    assert referred.json()["output"][0]["content"][0]["text"] == whole["output"][0]["content"][0]["text"]
    assert referred.json()["usage"]["input_tokens"] == whole["usage"]["input_tokens"]
    listed = client.get(f"/v1/responses/{referred.json()['id']}/input_items", params={"order": "asc"}).json()
    assert listed["data"][1]["type"] == "message" and listed["data"][1]["id"] == item["id"]
    user_item = listed["data"][0]["id"]  # input items are stored too
    assert client.post("/v1/responses", json=turn({"type": "item_reference", "id": user_item})).status_code == 200
    unknown = client.post("/v1/responses", json=turn({"type": "item_reference", "id": "msg_nope"}))
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "input.1.id"
    assert "msg_nope" in unknown.json()["error"]["message"]
    client.delete(f"/v1/responses/{first['id']}")
    client.delete(f"/v1/responses/{referred.json()['id']}")
    gone = client.post("/v1/responses", json=turn({"type": "item_reference", "id": item["id"]}))
    assert gone.status_code == 404  # its responses deleted, the item is gone with them


@pytest.mark.parametrize("extra, status, param", [
    ({"include": ["reasoning.encrypted_content"], "store": False}, 200, None),
    ({"include": ["web_search_call.action.sources", "file_search_call.results"]}, 200, None),
    ({"prompt_cache_retention": "24h"}, 200, None),
    ({"stream": True, "stream_options": {"include_obfuscation": False}}, 200, None),
    ({"include": ["reasoning.encrypted"]}, 400, "include"),
    ({"moderation": {"model": "omni-moderation-latest"}}, 400, "moderation"),
])
def test_openai_responses_fields_are_accepted_at_no_op_values_or_refused_by_name(client, extra, status, param):
    reply = client.post("/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 2, **extra})
    assert reply.status_code == status, reply.text
    if status != 200:
        assert reply.json()["error"]["param"] == param, reply.text
