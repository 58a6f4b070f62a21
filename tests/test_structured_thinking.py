"""Structured outputs after a reasoning model's thinking (``reasoning_tags``): free while it thinks, the grammar
from the answer on; whether the reply starts inside its thinking is read from the prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ferrum
from ferrum.errors import InvalidRequestError
from ferrum.sampling import SamplingParams
from ferrum.structured import matcher_for
from support import add_tokens, runnable_backends, write_text_checkpoint
from test_structured import PERSON, check_person

pytest.importorskip("llguidance")
TAGS = ("<think>", "</think>")
R1_TEMPLATE = (  # DeepSeek-R1's way: the assistant turn opens its thinking in the prompt
    "{%- for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|><think>{%- endif %}"
)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A tiny checkpoint whose tokenizer has ``<think>`` and ``</think>`` as tokens (as Qwen 3's has); the
    loaded model and the two ids."""
    folder = write_text_checkpoint(tmp_path_factory.mktemp("thinker") / "tiny", seed=3)
    open_id, close_id = add_tokens(folder, list(TAGS))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": R1_TEMPLATE}))
    return folder, ferrum.load(folder, backend="cpu"), open_id, close_id


def _matcher(llm, prompt, **params):
    params = SamplingParams(json_schema=PERSON, reasoning_tags=TAGS, **params)
    return matcher_for(params, llm.tokenizer, llm.model.config.vocab_size, frozenset({1}), prompt)


def _allowed(matcher, token: int) -> bool:
    return token not in set(matcher.forbidden().tolist())


def test_the_grammar_waits_until_the_thinking_is_closed(thinker):
    _, llm, open_id, close_id = thinker
    tok = llm.tokenizer
    (letter,), (newline,) = tok.encode("x", add_special_tokens=False), tok.encode("\n", add_special_tokens=False)
    matcher = _matcher(llm, [5, 9])  # the reply may open its thinking, or answer at once
    assert _allowed(matcher, open_id) and _allowed(matcher, newline) and not _allowed(matcher, letter)
    matcher.consume(open_id)
    assert matcher.forbidden().tolist() == [1]  # thinking: anything but the end of sequence
    for token in (letter, open_id, letter):
        matcher.consume(token)
        assert matcher.forbidden().tolist() == [1] and not matcher.complete
    matcher.consume(close_id)
    assert not _allowed(matcher, open_id) and not _allowed(matcher, letter) and _allowed(matcher, newline)
    for _ in range(2):  # "</think>\n\n{...}"
        matcher.consume(newline)
    answer = '{"age":7,"kind":"dog","name":"rex"}'
    for token in tok.encode(answer, add_special_tokens=False):
        assert not matcher.complete and _allowed(matcher, token)
        matcher.consume(token)
    assert matcher.complete
    with pytest.raises(InvalidRequestError):
        _matcher(llm, [5]).consume(letter)  # outside the thinking, the grammar holds


@pytest.mark.parametrize("prompt_tags, inside", [((), False), ((0,), True), ((0, 1), False), ((0, 1, 0), True)])
def test_the_prompt_says_whether_the_reply_starts_inside_its_thinking(thinker, prompt_tags, inside):
    _, llm, open_id, close_id = thinker
    prompt = [5] + [(open_id, close_id)[i] for i in prompt_tags] + [7]
    (letter,) = llm.tokenizer.encode("x", add_special_tokens=False)
    assert _allowed(_matcher(llm, prompt), letter) is inside


@pytest.mark.parametrize("backend", runnable_backends())
def test_a_reply_thinks_then_answers_in_the_schema(thinker, backend):
    folder, _, open_id, close_id = thinker
    llm = ferrum.load(folder, backend=backend, dtype="float32")
    prompt = llm.encode_prompt([{"role": "user", "content": "who?"}])
    assert prompt[-1] == open_id
    params = dict(max_tokens=60, json_schema=PERSON, logit_bias={close_id: 50.0})
    thought = llm.run([prompt], SamplingParams(**params, reasoning_tags=TAGS))[0]
    assert thought.token_ids[0] == close_id  # free to close its thinking, which the bias asks for
    check_person(thought.text.split("</think>", 1)[1])
    assert thought.finish_reason == "stop"
    forced = llm.run([prompt], SamplingParams(**params))[0]  # without the tags the schema starts at once
    assert close_id not in forced.token_ids
    check_person(forced.text)


def test_bad_reasoning_tags_are_refused(thinker, tmp_path):
    for tags in ("<think>", ("<think>",), ("<think>", ""), ("<t>", "<t>"), (1, 2)):
        with pytest.raises(InvalidRequestError, match="reasoning_tags"):
            SamplingParams(json_schema=True, reasoning_tags=tags)
    with pytest.raises(InvalidRequestError, match="json_schema or grammar"):
        SamplingParams(reasoning_tags=TAGS)
    plain = ferrum.load(write_text_checkpoint(tmp_path / "plain"), backend="cpu")
    with pytest.raises(InvalidRequestError, match="not one token"):
        plain.run([[5, 9]], SamplingParams(json_schema=True, reasoning_tags=TAGS))
    assert not plain.engine.has_unfinished()


def test_a_reasoning_server_shapes_the_answer_and_returns_the_thinking_apart(thinker):
    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    folder, llm, _, close_id = thinker
    app = create_app(ferrum.load(folder, backend="cpu"), ServeConfig(model_names=("tiny",), reasoning_parser="qwen3"))
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "who?"}], "max_tokens": 60, "temperature": 0,
            "logit_bias": {str(close_id): 50},
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        })
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    check_person(message["content"])
    assert not message.get("reasoning_content")  # the thinking was closed at once


def test_forking_keeps_the_phase(thinker):
    _, llm, open_id, close_id = thinker
    matcher = _matcher(llm, [5])
    matcher.consume(open_id)
    twin = matcher.fork()
    twin.consume(close_id)
    assert matcher.forbidden().tolist() == [1] and twin.forbidden().size > 1
    assert np.array_equal(twin.forbidden(), twin.fork().forbidden())
