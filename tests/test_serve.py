"""``ferrum serve`` as a client sees it: a real server in a subprocess, driven by the ``openai`` package.

The model is a tiny random Llama with a trained tokenizer on the numpy
backend in float32, so every completion can be compared token for token
with the same request run alone in this process.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package itself uses
import numpy as np
import openai
import pytest

import ferrum
from ferrum.errors import ConfigError
from support import write_text_checkpoint

BACKEND = ["--backend", "cpu", "--dtype", "float32"]
WORDS = "hello world the quick brown fox jumps over lazy dog text spans several byte level tokens".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``ferrum serve`` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = model.parent / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ferrum.cli", "serve", str(model), "--port", str(self.port),
             "--served-model-name", "tiny", "--log-level", "warning", *BACKEND, *args],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferrum serve exited: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"ferrum serve did not start: {self.log.read_text()}")

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def stop(self) -> bool:
        """SIGTERM; True when the server shut down cleanly (uvicorn re-raises the signal after its shutdown)."""
        self.proc.terminate()
        code = self.proc.wait(timeout=60)
        log = self.log.read_text()
        return code in (0, -15) and "Traceback" not in log


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_text_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", seed=3)


@pytest.fixture(scope="module")
def server(model):
    srv = Server(model)
    yield srv
    assert srv.stop(), srv.log.read_text()


@pytest.fixture(scope="module")
def llm(model):
    return ferrum.load(model, backend="cpu", dtype="float32")


def _solo(llm, prompt, chat: bool, max_tokens: int, **options) -> ferrum.RequestOutput:
    return llm.run([prompt], chat=chat, max_tokens=max_tokens, **options)[0]


# ------------------------------------------------------------------- basics
def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")


def test_chat_matches_a_solo_run_with_usage(server, llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    reply = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    solo = _solo(llm, messages, True, 12)
    assert reply.choices[0].message.content == solo.text
    assert reply.choices[0].finish_reason == solo.finish_reason.value
    assert reply.usage.prompt_tokens == len(llm.encode_prompt(messages))
    assert reply.usage.completion_tokens == len(solo.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_stop_token_counts_as_generated(server, llm):
    """The token that ends a reply is not returned, but it was generated: usage counts it, as vLLM's does."""
    whole = _solo(llm, "hello world", False, 12).token_ids
    cut = next(i for i in range(1, len(whole)) if whole[i] not in whole[:i])
    reply = server.client().completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0,
                                               extra_body={"stop_token_ids": [whole[cut]]})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == llm.tokenizer.decode(list(whole[:cut]))
    assert reply.usage.completion_tokens == cut + 1


def test_chat_stream_chunks_in_order_and_usage_last(server, llm):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    chunks = list(server.client().chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _solo(llm, messages, True, 10).text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_text_and_token_prompts_echo(server, llm):
    client = server.client()
    solo = _solo(llm, "hello world the", False, 8)
    reply = client.completions.create(model="tiny", prompt="hello world the", max_tokens=8, temperature=0)
    assert reply.choices[0].text == solo.text
    ids = llm.encode_prompt("hello world the")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert by_ids.choices[0].text == llm.tokenizer.decode(ids) + solo.text
    default = client.completions.create(model="tiny", prompt="hello", temperature=0)
    assert default.usage.completion_tokens == 16  # the legacy API's default max_tokens
    streamed = client.completions.create(model="tiny", prompt="hello world the", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == solo.text


def test_stop_strings_cut_the_text(server, llm):
    full = _solo(llm, "quick brown", False, 24).text
    letters = [c for c in full[1:] if c.isascii() and c.isalnum()]  # the random model emits broken UTF-8 too
    assert letters, full
    stop = letters[len(letters) // 2]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        reply = server.client().completions.create(
            model="tiny", prompt="quick brown", max_tokens=24, temperature=0, stop=[stop, "\x00never"],
            stream=stream,
        )
        if stream:
            chunks = list(reply)
            text = "".join(c.choices[0].text for c in chunks)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            text, reason = reply.choices[0].text, [reply.choices[0].finish_reason]
        assert text == expected and reason == ["stop"]


def test_same_seed_same_choices_and_n_choices_differ(server):
    client = server.client()

    def ask(seed):
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=1.0,
            seed=seed, n=3,
        )
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert 3 <= reply.usage.completion_tokens <= 36
        return [c.message.content for c in reply.choices]

    first = ask(1234)
    assert ask(1234) == first
    assert len(set(first)) > 1
    assert ask(99) != first


def test_a_prompts_seed_does_not_depend_on_its_place_in_a_batch(server):
    """vLLM's rule: each prompt of a batch takes the request's seed; only the n choices of one prompt differ."""
    client = server.client()

    def texts(prompt, n=1):
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, seed=7, n=n)
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

    (alone,) = texts("hello world")
    assert texts(["lazy dog", "hello world"])[1] == alone
    assert texts(["hello world", "hello world"]) == [alone, alone]
    two = texts(["lazy dog", "hello world"], n=2)
    assert two[2:] == texts("hello world", n=2) and two[2] == alone and two[2] != two[3]


def test_chat_logprobs_match_the_models_own_logits(server, llm):
    messages = [{"role": "user", "content": "lazy dog"}]
    reply = server.client().chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 6
    prompt = llm.encode_prompt(messages)
    output = [llm.tokenizer.token_to_id(_token_piece(llm, e)) for e in entries]
    # Independent path: one forward pass over prompt + output, log-softmax in float64 here.
    logits = llm.model.forward_verify("logprob-check", prompt + output[:-1]).astype(np.float64)
    llm.model.release("logprob-check")
    rows = logits[len(prompt) - 1 :]
    logsm = rows - rows.max(-1, keepdims=True)
    logsm -= np.log(np.exp(logsm).sum(-1, keepdims=True))
    for row, token, entry in zip(logsm, output, entries):
        assert entry.logprob == pytest.approx(row[token], abs=1e-4)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
        assert len(entry.top_logprobs) == 3
        best = np.argsort(-row, kind="stable")[:3]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row[best].tolist(), abs=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy took the best


def _token_piece(llm, entry) -> str:
    """The vocabulary entry for a logprob entry's bytes (byte-level BPE spelling)."""
    from ferrum.tokenizer import _unicode_to_byte

    to_char = {b: c for c, b in _unicode_to_byte().items()}
    return "".join(to_char[b] for b in entry.bytes)


def test_completion_logprobs_shape(server):
    reply = server.client().completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)  # see test_text_offsets_index_...
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(value) and 1 <= len(top) <= 3


def test_text_offsets_index_the_text_where_tokens_split_characters(server):
    """Each token starts where its text does in the choice's text: a character split over byte tokens starts where
    the character does, and the BOS (not in the echoed text) adds nothing. A token's own spelling (U+FFFD for a
    byte) used to drift every later offset."""
    text = "héllo 日本 wörld"
    reply = server.client().completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=0)
    lp = reply.choices[0].logprobs
    assert reply.choices[0].text == text and any("\ufffd" in t for t in lp.tokens)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(text)
    for token, offset in zip(lp.tokens[1:], lp.text_offset[1:]):
        assert text[offset:].startswith(token) or token == "\ufffd", (token, offset)
    assert lp.text_offset[0] == 0 and lp.tokens[0] == "<s>"
    # generated bytes (a random model makes split characters): the stream's offsets are the whole reply's
    body = dict(model="tiny", prompt="héllo", max_tokens=24, temperature=1.0, seed=4, logprobs=0)
    whole = server.client().completions.create(**body).choices[0]
    streamed = [c.choices[0].logprobs for c in server.client().completions.create(**body, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [o for piece in streamed for o in piece.text_offset] == whole.logprobs.text_offset
    assert whole.logprobs.text_offset == sorted(whole.logprobs.text_offset)
    assert whole.logprobs.text_offset[-1] <= len(whole.text)


def test_a_token_after_bytes_it_does_not_complete_starts_after_their_replacement_characters(llm):
    """A lone lead byte followed by a token that does not continue it decodes as U+FFFD and that token's text, both
    emitted with the second token: its offset is past the U+FFFD (it was credited the U+FFFD's)."""
    from ferrum.serve.handlers import TextOffsets

    tok = llm.tokenizer
    single = {tok.token_bytes(i): i for i in range(llm.model.config.vocab_size) if len(tok.token_bytes(i)) == 1}
    lead, ascii_ = next(i for b, i in single.items() if 0xC2 <= b[0] <= 0xF4), single[b"&"]
    ids = [ascii_, lead, ascii_, lead, lead, ascii_, ascii_]
    text, offsets = tok.decode(ids), TextOffsets(tok, 0).of(ids)
    assert text.count("\ufffd") == 3 and offsets == sorted(offsets)
    for token, offset in zip(ids, offsets):
        if token == ascii_:
            assert text[offset] == "&", (text, offsets)


def _log_softmax(llm, tokens) -> np.ndarray:
    """Row ``i``: float64 log-probabilities of the token after ``tokens[i]``, from one forward pass."""
    logits = llm.model.forward_verify("logsm-check", list(tokens)).astype(np.float64)
    llm.model.release("logsm-check")
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_the_token_that_ends_a_completion_is_among_its_logprobs(server, llm):
    """The end-of-sequence or stop token that ended a completion is listed in its logprobs (not its text), as
    OpenAI and vLLM list it: lm-eval scores ``echo, max_tokens=1, logprobs=1`` by the last entry, and without it
    a reply that ended at once scored a perfect 0.0."""
    prompt = llm.tokenizer.encode("the lazy dog jumps", add_special_tokens=False)
    rows = _log_softmax(llm, prompt)
    first = int(np.argmax(rows[-1]))  # made the stop token: the reply ends on it at once
    body = dict(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
                extra_body={"stop_token_ids": [first]})
    choice = server.client().completions.create(**body, echo=True).choices[0]
    lp = choice.logprobs
    assert choice.finish_reason == "stop" and choice.text == llm.tokenizer.decode(prompt)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(prompt) + 1
    assert lp.tokens[-1] == llm.tokenizer.decode([first]) and lp.text_offset[-1] == len(choice.text)
    assert lp.token_logprobs[-1] == pytest.approx(rows[-1][first], abs=1e-4)
    streamed = [c.choices[0] for c in server.client().completions.create(**body, stream=True) if c.choices]
    assert [t for c in streamed if c.logprobs for t in c.logprobs.tokens] == [lp.tokens[-1]]
    assert streamed[-1].finish_reason == "stop" and "".join(c.text for c in streamed) == ""
    out = llm.run([prompt], max_tokens=1, logprobs=1, stop_token_ids=[first])[0]
    assert out.token_ids == () and out.stop_reason == first and out.stop_logprobs.token == first


def test_logprobs_zero_lists_each_chosen_token(server):
    """``logprobs: 0`` still gives each position's entry for the token itself (vLLM's and the API's "up to
    logprobs + 1"); it was null."""
    choice = server.client().completions.create(model="tiny", prompt="hello world", max_tokens=2, temperature=0,
                                                echo=True, logprobs=0).choices[0]
    lp = choice.logprobs
    assert lp.top_logprobs[0] is None and len(lp.top_logprobs) == len(lp.tokens)
    assert [list(top) for top in lp.top_logprobs[1:]] == [[token] for token in lp.tokens[1:]]
    assert [top[token] for top, token in zip(lp.top_logprobs[1:], lp.tokens[1:])] == lp.token_logprobs[1:]


def test_a_prompt_filling_the_context_is_scored_not_generated_from(model):
    """``echo, max_tokens=0`` scores a prompt as long as the context (lm-eval's rolling windows are), as vLLM
    does; asking for a token more is still over the context."""
    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    llm = ferrum.load(model, backend="cpu", dtype="float32", max_seq_len=64)
    prompt = [int(t) for t in np.random.default_rng(1).integers(2, 300, size=64)]
    rows = _log_softmax(llm, prompt)
    with TestClient(create_app(llm, ServeConfig(model_names=("tiny",)))) as client:
        def complete(tokens, max_tokens):
            return client.post("/v1/completions", json={"model": "tiny", "prompt": tokens, "echo": True,
                                                        "logprobs": 1, "max_tokens": max_tokens})

        scored = complete(prompt, 0)
        assert scored.status_code == 200, scored.text
        values = scored.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert values[0] is None and len(values) == len(prompt)
        assert values[1:] == pytest.approx([rows[i - 1][prompt[i]] for i in range(1, len(prompt))], abs=1e-4)
        for tokens, max_tokens in ((prompt, 1), (prompt + [5], 0)):
            refused = complete(tokens, max_tokens)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert llm.engine.model.kv.num_free_blocks == llm.engine.model.kv.num_blocks


def test_an_echoed_prompt_ending_inside_a_character_is_not_echoed_twice(server, llm):
    """A token-id prompt that stops part way through a character: the reply carries that character (whole, or
    U+FFFD), so the echo stops before it and echo + reply read as prompt + reply decoded."""
    prompt = llm.tokenizer.encode("日本", add_special_tokens=False)[:-1]
    assert llm.tokenizer.decode(prompt).endswith("\ufffd")
    reply = llm.run([prompt], max_tokens=3, ignore_eos=True)[0]
    choice = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                                echo=True, extra_body={"ignore_eos": True}).choices[0]
    assert choice.text == llm.tokenizer.decode(prompt + list(reply.token_ids)) == "日" + reply.text


def test_echoed_prompt_offsets_index_the_echoed_text(server):
    """A text prompt spelling a special token (which the tokenizer reads as that token) is echoed as written, and
    the offsets point into it; a token-id prompt is echoed as its reply decodes (``skip_special_tokens``)."""
    text = "hello</s> world the"
    lp = server.client().completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=0
                                            ).choices[0].logprobs
    assert "</s>" in lp.tokens and lp.text_offset[lp.tokens.index("</s>")] == text.index("</s>")
    for token, offset in zip(lp.tokens[1:], lp.text_offset[1:]):
        assert text[offset:].startswith(token), (token, offset, lp)
    ids = [5, 1, 6]  # 1 is </s>
    for skip, echoed in ((True, "$%"), (False, "$</s>%")):
        choice = server.client().completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0,
                                                    extra_body={"skip_special_tokens": skip}).choices[0]
        assert choice.text == echoed and choice.logprobs.text_offset == [0, 1, len(echoed) - 1], choice


def test_echo_with_logprobs_scores_the_prompt_with_the_models_own_logits(server, llm):
    """What lm-evaluation-harness's loglikelihood asks (echo, logprobs, max_tokens 1): every prompt token's
    logprob under the positions before it (the first has none), then the generated token's."""
    prompt = llm.tokenizer.encode("the lazy dog jumps over the quick fox", add_special_tokens=False)
    reply = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0,
                                               echo=True, logprobs=2)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # Independent path: one forward pass, log-softmax in float64 here.
    logits = llm.model.forward_verify("echo-check", prompt).astype(np.float64)
    llm.model.release("echo-check")
    logsm = logits - logits.max(-1, keepdims=True)
    logsm -= np.log(np.exp(logsm).sum(-1, keepdims=True))
    for position in range(1, len(prompt)):
        row = logsm[position - 1]
        assert lp.token_logprobs[position] == pytest.approx(row[prompt[position]], abs=1e-4)
        best = np.argsort(-row, kind="stable")[:2]
        assert [lp.top_logprobs[position][llm.tokenizer.decode([t])] for t in best] == pytest.approx(
            row[best].tolist(), abs=1e-4)
    generated = int(np.argmax(logsm[-1]))
    assert lp.token_logprobs[-1] == pytest.approx(logsm[-1][generated], abs=1e-4)
    refused = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 1,
                                                                "stream": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
    # the logits every choice keeps are bounded over the whole request (1 GiB): enough prompts x n to pass it
    per_request = 128 * len(prompt)  # n = 128, the most the API allows
    copies = (1 << 30) // (4 * llm.model.config.vocab_size * per_request) + 1
    too_many = httpx.post(server.url + "/v1/completions", json={"prompt": [prompt] * copies, "n": 128, "echo": True,
                                                                 "logprobs": 1, "max_tokens": 1})
    assert too_many.status_code == 400 and "positions" in too_many.json()["error"]["message"], too_many.text
    # max_tokens 0: the prompt scored and echoed, nothing generated (the legacy API's scoring form)
    scored = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    assert scored.choices[0].text == "".join(lp.tokens[:-1]) and scored.usage.completion_tokens == 0
    for body in ({"prompt": prompt, "max_tokens": 0}, {"prompt": prompt, "max_tokens": 0, "echo": True, "stream": True}):
        refused = httpx.post(server.url + "/v1/completions", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens", body


def test_repeated_prefix_reports_cached_tokens(server):
    long_prompt = " ".join(WORDS * 4)
    client = server.client()
    first = client.completions.create(model="tiny", prompt=long_prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model="tiny", prompt=long_prompt, max_tokens=2, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens > 32
    assert 16 <= cached < first.usage.prompt_tokens and cached % 16 == 0  # whole 16-token blocks


def test_ferrum_extras_are_accepted(server, llm):
    reply = server.client().completions.create(
        model="tiny", prompt="hello", max_tokens=6, temperature=0,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3},
    )
    solo = _solo(llm, "hello", False, 6, repetition_penalty=1.3)
    assert reply.choices[0].text == solo.text


def test_stop_token_ids_and_ignore_eos_extras(server, llm):
    """vLLM's extras: an id of ``stop_token_ids`` ends the reply where the model emits it, and ``ignore_eos``
    keeps going past the model's end token (here made certain by a logit bias)."""
    solo = _solo(llm, "hello", False, 8)
    stop_at = solo.token_ids[3]
    first = solo.token_ids.index(stop_at)  # the earliest step that emits it
    cut = server.client().completions.create(
        model="tiny", prompt="hello", max_tokens=8, temperature=0, extra_body={"stop_token_ids": [stop_at]},
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == llm.tokenizer.decode(solo.token_ids[:first])
    eos = min(llm.tokenizer.eos_token_ids)
    forced = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0, "logit_bias": {str(eos): 100}}
    ended = server.client().completions.create(**forced).choices[0]
    assert ended.finish_reason == "stop" and ended.text == ""
    kept = server.client().completions.create(**forced, extra_body={"ignore_eos": True})
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 5
    bad = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "stop_token_ids": [10**7]})
    assert bad.status_code == 400 and "stop_token_ids" in bad.json()["error"]["message"]


def test_text_parts_of_a_message_are_its_lines(server):
    """As vLLM joins them: ["Hello", "world"] is "Hello\nworld" (they ran together as "Helloworld")."""
    def ids(content):
        reply = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": content}]})
        assert reply.status_code == 200, reply.text
        return reply.json()["tokens"]

    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert ids(parts) == ids("Hello\nworld") != ids("Helloworld")


def test_tokenize_and_detokenize(server, llm):
    """vLLM's extras: a prompt's ids (with BOS unless asked not to), chat messages as the chat endpoint encodes
    them, and ids back to text; an id outside the vocabulary is a 400 naming ``tokens``."""
    text = "hello world the quick brown fox"
    done = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": text}).json()
    assert done["tokens"] == llm.tokenizer.encode(text) and done["count"] == len(done["tokens"])
    assert done["max_model_len"] == llm.model.config.max_seq_len
    bare = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == llm.tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": text}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == llm.encode_prompt(messages)
    # false is the messages' default (vLLM's); true would add the tokenizer's BOS to the template's, which is refused
    assert httpx.post(server.url + "/tokenize", json={"messages": messages, "add_special_tokens": False}).json() == chat
    back = httpx.post(server.url + "/detokenize", json={"tokens": bare["tokens"]}).json()
    assert back == {"prompt": text}
    # special tokens are kept, as vLLM's (Hugging Face's decode) keeps them: a chat's ids come back as its text
    rendered = httpx.post(server.url + "/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert rendered == llm.tokenizer.decode(chat["tokens"], skip_special_tokens=False)
    assert llm.tokenizer.encode(rendered, add_special_tokens=False) == chat["tokens"]
    for path, body, param in [("/detokenize", {"tokens": [10**6]}, "tokens"), ("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
                              ("/tokenize", {"messages": messages, "add_special_tokens": True}, "add_special_tokens")]:
        response = httpx.post(server.url + path, json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "temprature": 0}, "temprature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1_0": 1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"\u0661\u0669": 1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
         "stream_options"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools.0"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": 5}]}]}, "messages.0.content"),  # no union branch fits
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]},
         "messages.0.content.1"),
        ({"messages": [{"role": "user", "content": "hi"}], "metadata": {"int": 5}}, "metadata.int"),  # a key, no branch
        ({"messages": [{"role": "user", "content": " ".join(WORDS * 40)}]}, "messages"),
        ({"model": "tiny"}, "messages"),
    ],
)
def test_bad_chat_requests_get_400_naming_the_parameter(server, body, param):
    response = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": [5, 10**6]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"999999": 1}},
     "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                         "schema": {"$ref": "#"}}}},
     "response_format"),
])
def test_what_the_engine_refuses_names_the_request_field(server, path, body, param):
    response = httpx.post(server.url + path, json={"model": "tiny", "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_malformed_and_odd_bodies(server):
    post = lambda data, **kw: httpx.post(server.url + "/v1/chat/completions", content=data, **kw)  # noqa: E731
    for data in (b"{bad", b"", b"[]", b'"text"', b"\xff\xfe", json.dumps({"messages": "hi"}).encode()):
        response = post(data)
        assert response.status_code == 400, (data, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    deep = {"type": "object"}
    for _ in range(300):
        deep = {"type": "array", "items": deep}
    nested = post(json.dumps({"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": deep}}}).encode()).json()["error"]
    assert "deeper than" in nested["message"] and "not valid JSON" not in nested["message"]  # it is valid
    over = httpx.post(server.url + "/v1/completions", json={"prompt": " ".join(WORDS * 40), "max_tokens": 1})
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
    bad_ids = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 2, 10**6]})
    assert bad_ids.status_code == 400 and "vocabulary" in bad_ids.json()["error"]["message"]
    float_ids = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 2.5]}).json()["error"]
    assert float_ids["param"] == "prompt" and "list[int]" in float_ids["message"], float_ids
    for field, value in (("temperature", b"NaN"), ("top_p", b"Infinity"), ("frequency_penalty", b"-Infinity")):
        data = b'{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field.encode(), value)
        error = post(data).json()["error"]  # JSON has no NaN, but parsers take it: a bound check must not
        assert error["param"] == field and "finite" in error["message"], error
    unknown = httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": []})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert unknown.json()["error"]["type"] == "invalid_request_error"  # OpenAI's type, the code says which
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                top_p=0)
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


@pytest.fixture(scope="module")
def long_context_model(model, tmp_path_factory) -> Path:
    """The same weights with room for thousands of tokens, so one request can hold the server busy."""
    folder = tmp_path_factory.mktemp("long") / "tiny-long"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return folder


def test_api_key_and_queue_limit(long_context_model):
    srv = Server(long_context_model, "--api-key", "sekret", "--max-num-seqs", "1", "--max-queue", "1")
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert srv.client(api_key="sekret").models.list().data[0].id == "tiny"
        headers = {"Authorization": "Bearer sekret"}
        body = {"prompt": "hello", "max_tokens": 8000, "stream": True, "logit_bias": {"1": -100}, "n": 2}
        never = httpx.post(srv.url + "/v1/completions", json={**body, "n": 3}, headers=headers)
        assert never.status_code == 400 and never.json()["error"]["param"] == "n"
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=headers, timeout=60) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: dropping the iterator closes the connection
            next(lines)  # both slots (one running, one queued) are now taken
            busy = httpx.post(srv.url + "/v1/completions", json={**body, "n": 1}, headers=headers)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_exceeded"
        # Leaving the stream aborted both choices: the server takes requests again.
        deadline = time.time() + 30
        while srv.metrics()["ferrum_requests_running"] and time.time() < deadline:
            time.sleep(0.05)
        after = httpx.post(srv.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, headers=headers)
        assert after.status_code == 200
        assert srv.metrics()['ferrum_requests_rejected_total{status="429"}'] == 1
    finally:
        assert srv.stop(), srv.log.read_text()


# ------------------------------------------------------ many clients at once
def test_64_streaming_clients_a_third_disconnecting(server, llm):
    rng = random.Random(7)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(64)]
    leaving = set(rng.sample(range(64), 21))
    before = server.metrics()

    async def client_run(i: int) -> str | None:
        async with server.async_client() as client:
            # a leaver asks for far more than it reads, so it is still generating when it leaves, however busy
            # the machine (with 24 tokens, every request could finish before its client closed)
            length = {"max_tokens": 160, "extra_body": {"ignore_eos": True}} if i in leaving else {"max_tokens": 24}
            stream = await client.completions.create(model="tiny", prompt=prompts[i], **length,
                                                     temperature=0, stream=True)
            text, cut = "", rng.randint(1, 6)
            async for n, chunk in _enumerate(stream):
                text += chunk.choices[0].text
                if i in leaving and n == cut:
                    await stream.close()
                    return None
            return text

    async def main():
        return await asyncio.gather(*(client_run(i) for i in range(64)))

    texts = asyncio.run(main())
    for i, text in enumerate(texts):
        if i not in leaving:
            assert text == _solo(llm, prompts[i], False, 24).text, prompts[i]

    deadline = time.time() + 30
    while True:  # aborts are applied by the engine thread; give it a moment
        after = server.metrics()
        if after["ferrum_kv_blocks_used"] == 0 and after["ferrum_requests_running"] == 0 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert after["ferrum_kv_blocks_used"] == 0
    assert after["ferrum_kv_blocks_free"] == after["ferrum_kv_blocks_total"]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    ended = {reason: delta(f'ferrum_requests_total{{endpoint="completions",finish_reason="{reason}"}}')
             for reason in ("stop", "length", "abort")}
    assert ended["stop"] + ended["length"] == 64 - len(leaving)
    assert ended["abort"] == len(leaving)
    assert delta("ferrum_time_to_first_token_seconds_count") == ended["stop"] + ended["length"]


def test_a_request_refused_at_submission_counts_as_rejected_not_as_aborted_choices(server):
    """The engine refuses the request (a token id outside the vocabulary) before any choice runs: one 400 among
    the rejected, none of its five choices among the ended requests."""
    before = server.metrics()
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model="tiny", prompt="hi", max_tokens=2, n=5, logit_bias={"99999": 1})
    assert caught.value.param == "logit_bias"
    after = server.metrics()
    ended = [name for name in after if name.startswith("ferrum_requests_total")]
    assert [after[name] - before.get(name, 0.0) for name in ended] == [0.0] * len(ended)
    status = 'ferrum_requests_rejected_total{status="400"}'
    assert after[status] - before.get(status, 0.0) == 1


async def _enumerate(stream):
    n = 0
    async for item in stream:
        n += 1
        yield n, item


def test_a_client_that_does_not_read_stalls_nobody(long_context_model):
    srv = Server(long_context_model)
    try:
        body = {"prompt": "hello", "max_tokens": 6000, "stream": True, "logit_bias": {"1": -100}}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as slow:
            lines = slow.iter_lines()
            next(lines)  # then stop reading: its socket buffers fill while it keeps generating
            for _ in range(3):
                started = time.time()
                quick = srv.client().completions.create(model="tiny", prompt="hi", max_tokens=8, timeout=30,
                                                        logit_bias={"1": -100})  # sampled: never end early
                assert quick.usage.completion_tokens == 8 and time.time() - started < 10
        huge = httpx.post(srv.url + "/v1/completions", content=b"{" + b" " * (33 * 2**20) + b"}")
        assert huge.status_code == 413 and huge.json()["error"]["message"]
        chunked = httpx.post(srv.url + "/v1/completions", content=(b" " * 2**20 for _ in range(40)))  # no length
        assert chunked.status_code == 413 and chunked.json()["error"]["message"]
    finally:
        assert srv.stop(), srv.log.read_text()


def test_sigterm_stops_cleanly_mid_stream(long_context_model):
    srv = Server(long_context_model, "--shutdown-timeout", "1")
    body = {"prompt": "hello", "max_tokens": 8000, "stream": True, "logit_bias": {"1": -100}}
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json=body) as response:
        lines = response.iter_lines()
        next(lines)
        started = time.time()
        assert srv.stop(), srv.log.read_text()  # no traceback, exits by itself
        assert time.time() - started < 20
        rest = [line for line in lines if line]  # ended at the shutdown timeout, not left hanging
    assert len(rest) < 8000
    assert json.loads(rest[-2][len("data: "):])["error"]["code"] == "aborted"
    assert rest[-1] == "data: [DONE]"


def test_model_names_a_lora_adapter(model, llm, tmp_path):
    peft = pytest.importorskip("peft")
    import torch
    import transformers

    torch.manual_seed(5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "style")
    srv = Server(model, "--lora", f"style={tmp_path / 'style'}")
    try:
        client = srv.client()
        assert {m.id for m in client.models.list().data} == {"tiny", "style"}
        both = {}
        for name in ("tiny", "style"):
            reply = client.completions.create(model=name, prompt="hello world", max_tokens=8, temperature=0)
            both[name] = reply.choices[0].text
        llm.load_adapter("style", tmp_path / "style")
        try:
            assert both["style"] == _solo(llm, "hello world", False, 8, lora="style").text
            # an adapter named like the served model could never be reached: refused before serving
            from ferrum.serve.app import ServeConfig, create_app

            with pytest.raises(ConfigError, match="'style' names both the served model and a LoRA adapter"):
                create_app(llm, ServeConfig(model_names=("style",)))
        finally:
            llm.unload_adapter("style")
        assert both["tiny"] == _solo(llm, "hello world", False, 8).text
        assert both["style"] != both["tiny"]  # the adapter changed the output
    finally:
        assert srv.stop(), srv.log.read_text()


# ------------------------------------------------------------ structured outputs
SHAPE = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "tag": {"enum": ["a", "bb"]}},
    "required": ["n", "tag"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False},
}


def test_response_format_json_schema(server):
    reply = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE, "strict": True}},
    )
    assert reply.choices[0].finish_reason == "stop"
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"n", "tag"} and 0 <= value["n"] <= 9 and value["tag"] in ("a", "bb")


def test_response_format_json_object_streams_an_object(server):
    chunks = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12, stream=True,
        response_format={"type": "json_object"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.lstrip().startswith("{"), text


@pytest.mark.parametrize("fmt, words", [
    ({"type": "xml"}, ["response_format", "xml"]),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, ["nope"]),
    ({"type": "json_schema", "json_schema": "not an object"}, ["json_schema"]),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}, ["cannot be followed"]),
])
def test_bad_response_formats_are_400(server, fmt, words):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, response_format=fmt)
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_a_refused_request_of_several_prompts_leaves_no_capacity_taken(model):
    """The first prompt is queued, the second refused (outside the vocabulary): a 400, the first aborted, and the
    server's count of running choices back where it was."""
    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    llm = ferrum.load(model, backend="cpu", dtype="float32")
    app = create_app(llm, ServeConfig(model_names=("tiny",)))
    state = app.state.ferrum
    with TestClient(app) as client:
        for _ in range(3):
            reply = client.post("/v1/completions", json={"model": "tiny", "prompt": [[5, 6], [10**6]], "max_tokens": 4})
            assert reply.status_code == 400 and "vocabulary" in reply.text, reply.text
        assert state.pending == 0
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": [[5, 6], [7]], "max_tokens": 4})
        assert ok.status_code == 200 and state.pending == 0
    assert not llm.engine.has_unfinished() and llm.model.kv.num_used_blocks == 0


def test_a_request_reaching_a_stopped_engine_is_a_503(model):
    """Past the shutdown's grace period the engine is gone; a request that reaches it then (its body or its
    prompt was still on the way) is aborted as the others were, not a 500."""
    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    llm = ferrum.load(model, backend="cpu", dtype="float32")
    app = create_app(llm, ServeConfig(model_names=("tiny",)))
    with TestClient(app) as client:
        app.state.ferrum.engine.shutdown()
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "aborted", reply.text


def test_a_pool_smaller_than_the_context_is_the_served_context(model):
    """With fewer KV blocks than the context needs, the longest sequence is the pool's: ``/v1/models`` says so
    and a request past it is ``context_length_exceeded`` (as vLLM would not start with a context it cannot hold).
    A ``max_seq_len`` past the model's context is warned of, and the context stays."""
    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    with pytest.warns(UserWarning, match="past .* context of"):
        llm = ferrum.load(model, backend="cpu", dtype="float32", num_kv_blocks=2, max_seq_len=10**6)
    pool = llm.model.kv_capacity()
    assert pool < llm.model.config.max_seq_len
    with TestClient(create_app(llm, ServeConfig(model_names=("tiny",)))) as client:
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] == pool
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": [5] * pool, "max_tokens": 1})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded", reply.text
        assert client.post("/v1/completions", json={"model": "tiny", "prompt": [3, 4], "max_tokens": 4}).is_success


def test_a_client_gone_before_its_body_is_whole_ends_quietly(model):
    """A disconnect while the body arrives is answered 499 (to no one) and counted, not an application error
    with a traceback in the server's log."""
    from ferrum.serve.app import ServeConfig, create_app

    app = create_app(ferrum.load(model, backend="cpu", dtype="float32"), ServeConfig(model_names=("tiny",)))
    messages = iter([{"type": "http.request", "body": b'{"model": "tiny", "prom', "more_body": True},
                     {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("t", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    from prometheus_client import generate_latest

    assert 'status="499"' in generate_latest(app.state.ferrum.metrics.registry).decode()


def test_prompts_are_encoded_off_the_event_loop(model, monkeypatch):
    """A long prompt's template and tokenizing (0.3 s for 100,000 tokens), /tokenize's too, run in a worker
    thread, where no event loop runs, so other streams go on meanwhile."""
    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    llm = ferrum.load(model, backend="cpu", dtype="float32")
    loops = []

    def recorded(function):
        def call(*args, **kwargs):
            try:
                loops.append(asyncio.get_running_loop())
            except RuntimeError:
                loops.append(None)
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(llm, "encode_prompt", recorded(llm.encode_prompt))
    monkeypatch.setattr(llm.tokenizer, "encode", recorded(llm.tokenizer.encode))
    with TestClient(create_app(llm, ServeConfig(model_names=("tiny",)))) as client:
        chat = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "hi"}]})
        text = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a b", "c"], "max_tokens": 2})
        before = len(loops)
        tokens = client.post("/tokenize", json={"model": "tiny", "prompt": "a b"})  # it blocked the loop 7 s
    assert chat.status_code == text.status_code == tokens.status_code == 200
    assert len(loops) > before and set(loops) == {None}


def test_reasoning_effort_is_a_chat_template_variable(model, monkeypatch):
    """As in vLLM: chat's ``reasoning_effort`` and the Responses API's ``reasoning.effort`` reach the chat template
    as ``reasoning_effort`` (gpt-oss's templates read it), beside the request's own ``chat_template_kwargs``."""
    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    llm = ferrum.load(model, backend="cpu", dtype="float32")
    encode, seen = llm.encode_prompt, []
    monkeypatch.setattr(llm, "encode_prompt",
                        lambda *a, **k: seen.append(k.get("chat_template_kwargs")) or encode(*a, **k))
    hi = [{"role": "user", "content": "hi"}]
    with TestClient(create_app(llm, ServeConfig(model_names=("tiny",)))) as client:
        for body in ({"reasoning_effort": "high"}, {"reasoning_effort": "low", "chat_template_kwargs": {"x": 1}}, {}):
            assert client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "messages": hi,
                                                             **body}).status_code == 200
        assert client.post("/v1/responses", json={"model": "tiny", "max_output_tokens": 1, "input": "hi",
                                                  "reasoning": {"effort": "medium"}}).status_code == 200
    assert seen == [{"reasoning_effort": "high"}, {"reasoning_effort": "low", "x": 1}, None,
                    {"reasoning_effort": "medium"}]


def test_null_is_the_default_and_a_parsed_reply_goes_back_in(server, llm):
    """The ``openai`` client sends an argument passed as None as null, which the API reads as its default; a
    message from the client's ``.parse()`` carries ``parsed``, and the tool loop sends it back whole."""
    client, messages = server.client(), [{"role": "user", "content": "hello"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    nulls = dict.fromkeys(("n", "stream", "logprobs", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                           "repetition_penalty", "ignore_eos", "stream_options"))
    reply = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, **nulls})
    assert reply.status_code == 200, reply.text
    (choice,) = reply.json()["choices"]
    assert choice["message"]["content"] == plain.choices[0].message.content
    completion = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "hello", "max_tokens": None, "echo": None, "n": None, "stream": None,
        "ignore_eos": True})
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] == 16  # the API's default max_tokens
    missing = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": None}).json()
    assert missing["error"]["param"] == "messages"  # a required field stays required
    from openai.types.chat import ParsedChatCompletionMessage

    turn = ParsedChatCompletionMessage(role="assistant", content=plain.choices[0].message.content, parsed=None)
    again = client.chat.completions.create(model="tiny", messages=[*messages, turn, {"role": "user", "content": "ok"}],
                                           max_tokens=4, temperature=0)
    expected = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        *messages, {"role": "assistant", "content": turn.content}, {"role": "user", "content": "ok"}])
    assert again.choices[0].message.content == expected.choices[0].message.content


def test_unset_sampling_takes_the_checkpoints_generation_config(model, tmp_path):
    """As vLLM reads generation_config.json: what a request leaves unset (top_k, repetition_penalty...) is the
    checkpoint's; what it sets, 0 included, is its own."""
    import shutil

    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    folder = shutil.copytree(model, tmp_path / "tiny")
    config = json.loads((folder / "generation_config.json").read_text()) if (
        folder / "generation_config.json").exists() else {}
    config.update(temperature=1.0, top_k=1, repetition_penalty=1.8)
    (folder / "generation_config.json").write_text(json.dumps(config))
    llm = ferrum.load(folder, backend="cpu", dtype="float32")
    greedy = llm.generate("hello world", max_tokens=8, ignore_eos=True, repetition_penalty=1.8)
    with TestClient(create_app(llm, ServeConfig(model_names=("tiny",)))) as client:
        def texts(**fields) -> set[str]:
            return {client.post("/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 8,
                                                         "ignore_eos": True, "seed": seed, **fields}).json()
                    ["choices"][0]["text"] for seed in range(6)}

        assert texts() == {greedy}  # top_k 1 from the config: greedy under its repetition penalty
        assert len(texts(top_k=0)) > 1 and len(texts(top_k=-1)) > 1  # off, as the request says
        assert texts(top_k=0, temperature=0, repetition_penalty=1.0) == {
            llm.generate("hello world", max_tokens=8, ignore_eos=True)}


def test_a_chat_template_given_at_launch_renders_the_chats(model, tmp_path):
    """``ferrum serve --chat-template FILE`` (vLLM's, mlx-lm's and llama.cpp's flag): a base model without a
    template chats through it; a template that does not compile stops the launch."""
    import shutil

    from starlette.testclient import TestClient

    from ferrum.errors import ConfigError
    from ferrum.serve.server import ServeOptions, load_for_serving

    bare = shutil.copytree(model, tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    llm, app = load_for_serving(ServeOptions(model=str(bare), backend="cpu", dtype="float32", chat_template=template,
                                             served_model_names=("tiny",)))
    messages = [{"role": "user", "content": "hello world"}]
    expected = llm.generate(llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), False), max_tokens=5)
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 5,
                                                          "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected
    with pytest.raises(ConfigError, match="does not compile"):
        load_for_serving(ServeOptions(model=str(bare), backend="cpu", chat_template="{% for m in messages %}"))


def test_hostile_bodies_are_400s_and_leave_no_slot_held(model, monkeypatch):
    """NaN/Infinity inside a free-form field (a 500, and streaming a slot held for good: 320 of them and every
    request was a 429), a logit_bias key of 5,000 digits (int() refuses it: a 500), a reasoning item whose text
    is no string; a grammar found impossible after submission is the client's 400; a bug in a stream ends it
    with an error event, its slot released; any other bug is an OpenAI-shaped 500."""
    from starlette.testclient import TestClient

    import ferrum.serve.responses as responses
    from ferrum.serve.app import ServeConfig, create_app

    app = create_app(ferrum.load(model, backend="cpu", dtype="float32"), ServeConfig(model_names=("tiny",)))
    state = app.state.ferrum
    hi = [{"role": "user", "content": "hi"}]
    with TestClient(app, raise_server_exceptions=False) as client:
        for stream in (False, True):
            body = '{"model": "tiny", "input": "hi", "max_output_tokens": 2, "stream": %s, "reasoning": {"x": NaN}}'
            reply = client.post("/v1/responses", content=body % str(stream).lower(),
                                headers={"content-type": "application/json"})
            assert reply.status_code == 400 and "NaN, which is not a JSON number" in reply.json()["error"]["message"]
        bias = client.post("/v1/chat/completions", json={"model": "tiny", "messages": hi, "max_tokens": 1,
                                                         "logit_bias": {"9" * 5000: 1}})
        assert bias.status_code == 400 and bias.json()["error"]["param"] == "logit_bias"
        item = client.post("/v1/responses", json={"model": "tiny", "max_output_tokens": 1, "input": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": 5}]},
            {"role": "user", "content": "hi"}]})
        assert item.status_code == 400 and item.json()["error"]["param"] == "input.0.content"
        pattern = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
            "type": "string", "pattern": "^(a{1000}){1000}$"}}}  # too large for llguidance's lexer
        shaped = client.post("/v1/chat/completions", json={"model": "tiny", "messages": hi, "max_tokens": 8,
                                                           "response_format": pattern})
        assert shaped.status_code == 400, shaped.text

        def broken(*args, **kwargs):
            raise ValueError("a bug")

        monkeypatch.setattr(responses._Reply, "entries", broken)
        streamed = client.post("/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 4,
                                                      "stream": True, "include": ["message.output_text.logprobs"]})
        assert streamed.status_code == 200 and "ValueError: a bug" in streamed.text
        plain = client.post("/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 4,
                                                   "include": ["message.output_text.logprobs"]})
        assert plain.status_code == 500 and plain.json()["error"]["message"] == "ValueError: a bug"
        assert state.pending == 0
        assert client.post("/v1/chat/completions", json={"model": "tiny", "messages": hi,
                                                         "max_tokens": 2}).status_code == 200


def test_speculative_decoding_given_at_launch_serves_the_same_greedy_replies(model):
    """``ferrum serve --speculative lookup`` / ``--draft-model``: requests are verified drafts, with the replies
    plain decoding gives."""
    from starlette.testclient import TestClient

    import ferrum
    from ferrum.serve.server import ServeOptions, load_for_serving
    from ferrum.spec import SpeculativeConfig

    prompt = "one two one two one two one two"
    expected = ferrum.load(model, backend="cpu").generate(prompt, max_tokens=12, ignore_eos=True)
    for speculative, draft in ((SpeculativeConfig("lookup"), None), (SpeculativeConfig("draft"), str(model))):
        llm, app = load_for_serving(ServeOptions(model=str(model), backend="cpu", served_model_names=("tiny",),
                                                 speculative=speculative, draft_model=draft))
        assert llm.engine.config.speculative == speculative
        with TestClient(app) as client:
            reply = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                                         "temperature": 0, "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["text"] == expected
        if draft is not None:  # the same weights drafting: every draft is taken (lookup's depend on the text)
            metrics = llm.engine.metrics()
            assert metrics.spec_accepted_tokens == metrics.spec_drafted_tokens > 0


@pytest.mark.parametrize("bad", [{"temperature": float("nan")}, {"top_p": -1}, {"top_k": 2.7}, {"top_k": 1e400},
                                 {"min_p": 5}, {"repetition_penalty": 0}, {"temperature": "0.7"}])
def test_a_generation_config_value_sampling_refuses_is_left_out_with_a_warning(model, tmp_path, bad):
    """A broken default in generation_config.json is named at start and left out: requests that leave the field
    unset run (each had failed, with a 400 naming a field the client never sent, or a 500 for top_k)."""
    import shutil

    from starlette.testclient import TestClient

    from ferrum.serve.app import ServeConfig, create_app

    folder = shutil.copytree(model, tmp_path / "tiny")
    (folder / "generation_config.json").write_text(json.dumps({**bad, "top_k": 1} if "top_k" not in bad else bad))
    llm = ferrum.load(folder, backend="cpu", dtype="float32")
    with pytest.warns(UserWarning, match=f"generation_config.json: {next(iter(bad))} .* is left out"):
        app = create_app(llm, ServeConfig(model_names=("tiny",)))
    with TestClient(app) as client:
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
