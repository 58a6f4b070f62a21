"""Structured outputs: every token a grammar forbids is never sampled, on every backend, in a mixed
batch, under logit bias and asynchronous stepping; a finished output parses and matches its schema."""

from __future__ import annotations

import json
import time

import pytest

import ferrum
from ferrum.errors import InvalidRequestError, RequestFailedError
from ferrum.sampling import SamplingParams
from ferrum.structured import matcher_for
from support import runnable_backends, write_text_checkpoint

pytest.importorskip("llguidance")

#: A schema whose every output is short: bounded integer, an enum, a capped string, no free whitespace
#: (llguidance's ``x-guidance`` options), so even a random model finishes it within a few dozen tokens.
PERSON = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["cat", "dog"]},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["age", "kind", "name"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
PROMPTS = [[5, 9, 14, 3], [7, 21, 2, 30, 11, 4, 8], [40, 41]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("structured"))


def check_person(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"age", "kind", "name"}, value
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 99
    assert value["kind"] in ("cat", "dog")
    assert isinstance(value["name"], str) and len(value["name"]) <= 6


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 5}])
def test_random_weights_still_give_the_schema(checkpoint, backend, sampling):
    llm = ferrum.load(checkpoint, backend=backend, dtype="float32")
    outs = llm.run(PROMPTS, max_tokens=80, json_schema=PERSON, **sampling)
    for out in outs:
        assert out.finish_reason == ferrum.engine.FinishReason.STOP, out.text
        check_person(out.text)


def test_the_grammar_beats_logit_bias(checkpoint):
    """A forbidden token has one -inf entry, even where logit_bias pushes it up."""
    llm = ferrum.load(checkpoint, backend="cpu", dtype="float32")
    pushed = {t: 100.0 for t in llm.tokenizer.encode("zzz qq", add_special_tokens=False)}
    for out in llm.run(PROMPTS, max_tokens=80, json_schema=PERSON, logit_bias=pushed):
        check_person(out.text)


def test_each_logit_is_adjusted_once(checkpoint):
    """Backends may scatter the sparse entries in any order (CUDA's index_put_ does): a biased token the
    grammar forbids must carry only its -inf entry."""
    from ferrum.sampling import RequestSampler, build_sampling_batch

    llm = ferrum.load(checkpoint, backend="cpu", dtype="float32")
    vocab = llm.model.config.vocab_size
    matcher = matcher_for(SamplingParams(json_schema=PERSON), llm.tokenizer, vocab, frozenset({1}))
    forbidden = matcher.forbidden()
    params = SamplingParams(logit_bias={int(t): 5.0 for t in forbidden[:10]}, repetition_penalty=1.3)
    batch = build_sampling_batch([RequestSampler(params, [3, 4, int(forbidden[0])], matcher)])
    pairs = list(zip(batch.adjust_rows.tolist(), batch.adjust_tokens.tolist()))
    assert len(pairs) == len(set(pairs))
    shift = dict(zip(batch.adjust_tokens.tolist(), batch.adjust_shift.tolist()))
    assert all(shift[int(t)] == float("-inf") for t in forbidden)


def test_json_object_mode_starts_an_object_and_every_token_is_allowed(checkpoint):
    llm = ferrum.load(checkpoint, backend="cpu", dtype="float32")
    out = llm.run([PROMPTS[0]], max_tokens=24, json_schema=True)[0]
    assert out.text.lstrip().startswith("{"), out.text
    # Replayed through a fresh matcher, each token was allowed where it was sampled.
    replay = matcher_for(SamplingParams(json_schema=True), llm.tokenizer, llm.model.config.vocab_size, frozenset({1}))
    for token in out.token_ids:
        assert token not in set(replay.forbidden().tolist())
        replay.consume(token)


@pytest.mark.parametrize("backend", [b for b in runnable_backends() if b in ("mlx", "cuda")] or ["cpu"])
def test_a_constrained_request_leaves_the_batch_it_joins_unchanged(checkpoint, backend):
    """With asynchronous stepping on, the plain requests of a mixed batch get the tokens they get alone,
    and the constrained one the output it gets alone."""
    llm = ferrum.load(checkpoint, backend=backend, dtype="float32")
    plain = SamplingParams(max_tokens=12, ignore_eos=True)
    shaped = SamplingParams(max_tokens=80, json_schema=PERSON)
    alone = [llm.run([p], plain)[0].token_ids for p in PROMPTS]
    shaped_alone = llm.run([PROMPTS[1]], shaped)[0].token_ids
    engine = llm.engine
    ids = [engine.add_request(p, plain) for p in PROMPTS] + [engine.add_request(PROMPTS[1], shaped)]
    finals = {out.request_id: out for out in engine.run_until_done() if out.finished}
    assert [finals[i].token_ids for i in ids[:3]] == alone
    assert finals[ids[3]].token_ids == shaped_alone


@pytest.mark.parametrize("speculative", ["lookup", "draft"])
def test_constrained_requests_are_not_drafted(checkpoint, speculative):
    """A grammar decides each next token on the host; drafts it never saw would be verified unmasked."""
    extra = {"draft_model": checkpoint} if speculative == "draft" else {}
    llm = ferrum.load(checkpoint, backend="cpu", dtype="float32", speculative=speculative, **extra)
    outs = llm.run(PROMPTS, max_tokens=80, json_schema=PERSON)
    for out in outs:
        check_person(out.text)
        assert out.metrics.num_drafted_tokens == 0


def nested_objects(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize("schema, words", [
    ({"type": "nope"}, ["json_schema", "nope"]),
    ({"$ref": "#/definitions/missing"}, ["json_schema", "missing"]),
    ({"$ref": "#"}, ["structure cannot be followed"]),  # compiles, but no output satisfies it
    (nested_objects(1000), ["json_schema", "nests too deeply", "$defs"]),  # raised a raw RecursionError
])
def test_a_schema_that_does_not_compile_is_refused_before_queueing(checkpoint, schema, words):
    llm = ferrum.load(checkpoint, backend="cpu", dtype="float32")
    with pytest.raises(InvalidRequestError) as caught:
        llm.generate(PROMPTS[0], max_tokens=5, json_schema=schema)
    assert all(w in str(caught.value) for w in words)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("value", [False, "json", 1])
def test_json_schema_takes_true_or_a_schema(value):
    with pytest.raises(InvalidRequestError, match="json_schema"):
        SamplingParams(json_schema=value)


def test_a_model_without_a_tokenizer_says_so(checkpoint, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    (bare / "tokenizer.json").unlink()
    llm = ferrum.load(bare, backend="cpu", dtype="float32")
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        llm.generate([5, 6], max_tokens=3, json_schema=True)


def _wide(properties: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(properties)}}


def test_a_wide_object_is_followed(checkpoint):
    """600 optional properties: past llguidance's default row of 2,000 Earley items (vLLM's limit), within
    Ferrum's 10,000."""
    llm = ferrum.load(checkpoint, backend="cpu", dtype="float32")
    out = llm.run([PROMPTS[0]], max_tokens=12, json_schema=_wide(600))[0]
    assert out.error is None and out.text.startswith("{")


def test_a_schema_past_the_parsers_limits_fails_its_request_in_a_line(checkpoint):
    """llguidance finds some limits only while generating; its error is one line, without the parser state
    and the grammar."""
    llm = ferrum.load(checkpoint, backend="cpu", dtype="float32")
    with pytest.raises(RequestFailedError) as caught:
        llm.generate(PROMPTS[0], max_tokens=20, json_schema=_wide(3000))
    assert "items" in str(caught.value) and "\n" not in str(caught.value) and len(str(caught.value)) < 800
    assert llm.generate(PROMPTS[0], max_tokens=3, json_schema=PERSON) is not None


def test_a_lark_grammar(checkpoint):
    """``grammar``: llguidance's Lark, here a choice of words then a JSON schema inline."""
    lark = 'start: ("yes" | "no") " " num\nnum: %json {"type": "integer", "minimum": 10, "maximum": 99}'
    llm = ferrum.load(checkpoint, backend="cpu", dtype="float32")
    for out in llm.run(PROMPTS, max_tokens=20, grammar=lark, temperature=1.0, seed=2):
        word, number = out.text.split(" ")
        assert word in ("yes", "no") and 10 <= int(number) <= 99, out.text
    with pytest.raises(InvalidRequestError, match="grammar"):
        llm.generate(PROMPTS[0], max_tokens=5, grammar="start: undefined_rule")
    with pytest.raises(InvalidRequestError, match="not both"):
        SamplingParams(grammar=lark, json_schema=True)


def test_a_pydantic_model_is_its_schema(checkpoint):
    pydantic = pytest.importorskip("pydantic")

    class Pet(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(
            extra="forbid", json_schema_extra={"x-guidance": {"whitespace_flexible": False}})
        kind: str = pydantic.Field(pattern="^(cat|dog)$")
        age: int = pydantic.Field(ge=0, le=9)

    params = SamplingParams(json_schema=Pet)
    assert params.json_schema == Pet.model_json_schema()
    llm = ferrum.load(checkpoint, backend="cpu", dtype="float32")
    for out in llm.run(PROMPTS, params=None, max_tokens=60, json_schema=Pet, temperature=1.0, seed=1):
        pet = Pet.model_validate_json(out.text)
        assert pet.kind in ("cat", "dog") and 0 <= pet.age <= 9


def test_formats_llguidance_cannot_enforce_are_annotations(checkpoint):
    """OpenAPI's int32 and pydantic's bytes or Path write formats llguidance does not know; JSON Schema makes a
    format an annotation, so the schema is followed without it (it was refused whole). A known format is still
    enforced, and a property, enum value or const that happens to be called "format" is left alone."""
    pydantic = pytest.importorskip("pydantic")
    import datetime
    import pathlib

    class Upload(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(json_schema_extra={"x-guidance": {"whitespace_flexible": False}})
        count: int = pydantic.Field(ge=0, le=99, json_schema_extra={"format": "int32"})
        path: pathlib.Path
        when: datetime.date
        format: str = pydantic.Field(json_schema_extra={"enum": ["png", "jpg"]})

    assert Upload.model_json_schema()["properties"]["path"]["format"] == "path"
    llm = ferrum.load(checkpoint, backend="cpu", dtype="float32")
    outs = llm.run(PROMPTS, max_tokens=160, json_schema=Upload, temperature=1.0, seed=2)
    finished = [out for out in outs if out.finish_reason.value == "stop"]
    assert finished
    for out in finished:
        upload = Upload.model_validate_json(out.text)
        assert upload.format in ("png", "jpg") and isinstance(upload.when, datetime.date)
    with pytest.raises(InvalidRequestError, match="uniqueItems"):  # a constraint, not an annotation: refused
        llm.generate(PROMPTS[0], max_tokens=5, json_schema={"type": "array", "uniqueItems": True})


def _count_tokenizer_builds(monkeypatch) -> list[int]:
    import llguidance

    builds = [0]
    real = llguidance.LLTokenizer

    def counted(*args, **kwargs):
        builds[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(llguidance, "LLTokenizer", counted)
    return builds


def test_an_engine_builds_the_grammar_view_of_its_tokenizer_once_ahead_of_requests(checkpoint, monkeypatch):
    builds = _count_tokenizer_builds(monkeypatch)
    llm = ferrum.load(checkpoint, backend="cpu")
    assert llm.engine.prepare_structured_outputs() and builds == [1]
    llm.run([PROMPTS[0]], SamplingParams(max_tokens=40, json_schema=PERSON))
    assert builds == [1]


def test_a_server_readies_structured_outputs_off_its_event_loop_at_startup(checkpoint, monkeypatch):
    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    builds = _count_tokenizer_builds(monkeypatch)
    app = create_app(ferrum.load(checkpoint, backend="cpu"), ServeConfig(model_names=("tiny",)))
    with TestClient(app) as client:
        ready, deadline = app.state.ferrum.structured_ready, time.monotonic() + 60  # an asyncio future
        while not ready.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.result() is True and builds == [1]
        reply = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        })
        assert reply.status_code == 200, reply.text
        check_person(reply.json()["choices"][0]["message"]["content"])
    assert builds == [1]


def test_a_server_compiles_grammars_off_its_event_loop(checkpoint, monkeypatch):
    """``AsyncEngine.submit_off_loop``: a structured request is queued (its grammar compiled) from a worker thread;
    a plain one at once, on the loop's thread."""
    import asyncio
    import threading

    llm = ferrum.load(checkpoint, backend="cpu")
    engine, threads = llm.async_engine, []
    add = llm.engine.add_request
    monkeypatch.setattr(llm.engine, "add_request",
                        lambda *a, **k: threads.append(threading.current_thread()) or add(*a, **k))

    async def run() -> list[str]:
        texts = []
        for params in (SamplingParams(max_tokens=40, json_schema=PERSON), SamplingParams(max_tokens=3)):
            out = None
            async for out in await engine.submit_off_loop(PROMPTS[0], params):
                pass
            texts.append(out.text)
        return texts

    texts = asyncio.run(run())
    check_person(texts[0])
    assert threads[0] is not threading.main_thread() and threads[1] is threading.main_thread()
    engine.shutdown()


def test_a_request_cancelled_while_its_grammar_compiles_is_aborted(checkpoint):
    import asyncio

    llm = ferrum.load(checkpoint, backend="cpu")
    engine = llm.async_engine

    async def cancel_during_compile() -> None:
        every = {**_wide(600), "required": [f"p{i}" for i in range(600)]}  # slow to compile, long to write
        task = asyncio.ensure_future(engine.submit_off_loop(PROMPTS[0], SamplingParams(max_tokens=200,
                                                                                       json_schema=every)))
        await asyncio.sleep(0)  # the compile has started in its worker
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 60  # the loop lives on (a closed loop would end the request anyway)
        while (llm.engine.has_unfinished() or not llm.engine.metrics().num_finished) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    asyncio.run(cancel_during_compile())
    assert not llm.engine.has_unfinished() and llm.model.kv.num_used_blocks == 0
    assert llm.engine.metrics().generated_tokens < 100  # aborted, not run to its 200 tokens
    engine.shutdown()


def test_a_tokenizer_llguidance_cannot_take_is_refused_not_crashed_on(tmp_path):
    """A token of thousands of characters overflows llguidance's token trie, which panics (pyo3's PanicException,
    a BaseException that passed every handler and made the server answer 500): structured requests are refused
    as unsupported for that tokenizer instead."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    from ferrum.errors import UnsupportedFeatureError
    from ferrum.tokenizer import Tokenizer
    from support import write_tokenizer

    pytest.importorskip("llguidance")
    write_tokenizer(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf.add_tokens([AddedToken("x" * 4000, normalized=False)])
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UnsupportedFeatureError, match="structured outputs cannot use this model's tokenizer: Panic"):
        matcher_for(SamplingParams(json_schema={"type": "object"}), Tokenizer(tmp_path), hf.get_vocab_size(),
                    frozenset({1}))


def test_a_schema_whose_objects_do_not_say_additional_properties_holds_them_closed(checkpoint):
    """xgrammar's strict mode (vLLM's default): an object schema that does not say ``additionalProperties`` takes
    no keys beyond its ``properties`` (a reply ran on with invented keys); one that says so keeps what it says, and
    the parts of an ``allOf`` (whose keys are spread over them) are left open."""
    from ferrum.structured import closed_objects
    from ferrum.tokenizer import Tokenizer

    tok = Tokenizer(checkpoint)

    def takes(text: str, schema: dict) -> bool:
        matcher = matcher_for(SamplingParams(json_schema=schema), tok, 300, frozenset({1}))
        for token in tok.encode(text, add_special_tokens=False):
            if token in set(matcher.forbidden().tolist()):
                return False
            matcher.consume(token)
        return True

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}}
    assert takes('{"a": {"b": 1}}', schema)
    assert not takes('{"a": {"b": 1}, "c": 2}', schema) and not takes('{"a": {"b": 1, "c": 2}}', schema)
    assert takes('{"a": {"b": 1, "c": 2}}', {**schema, "properties": {"a": {
        **schema["properties"]["a"], "additionalProperties": True}}})
    assert takes('{"x": 1}', True)  # json_object mode: any object
    spread = {"allOf": [{"type": "object", "properties": {"x": {}}}, {"properties": {"y": {}}}],
              "properties": {"properties": {"type": "string"}}, "$defs": {"D": {"type": "object"}}}
    assert closed_objects(spread) == {**spread, "$defs": {"D": {"type": "object", "additionalProperties": False}}}
