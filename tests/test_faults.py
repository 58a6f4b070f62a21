"""Fault injection: an op, the sampler, the detokenizer, a callback or a consumer's event loop failing at
random steps ends only the requests it must; the rest finish with their solo outputs, the KV pool
returns to its free count, and the engine keeps serving."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
import weakref

import pytest

import ferrum
from ferrum.engine import AsyncEngine, Engine, EngineConfig, FinishReason
from ferrum.errors import ExecutorStateError, InvalidRequestError, RequestFailedError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM
from ferrum.sampling import SamplingParams
from ferrum.tokenizer import Tokenizer
from support import flaky, write_text_checkpoint

WORKLOAD = [
    ([5 + i, 17, 3 * i + 2, 40, 41][: 2 + i % 4] * (1 + i % 3),
     SamplingParams(max_tokens=10 + i % 5, ignore_eos=True, temperature=0.0 if i % 2 else 0.9, seed=i))
    for i in range(12)
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("faults"))


def make_engine(checkpoint, **config) -> Engine:
    model = DecoderOnlyLLM.from_pretrained(checkpoint, backend="cpu", num_kv_blocks=64, block_size=4)
    return Engine(LlmExecutor(model), Tokenizer(checkpoint), EngineConfig(**config))


@pytest.fixture(scope="module")
def solo(checkpoint):
    engine = make_engine(checkpoint)
    outputs = []
    for prompt, params in WORKLOAD:
        request_id = engine.add_request(prompt, params)
        outputs.append(next(o for o in engine.run_until_done() if o.request_id == request_id and o.finished))
    return [(o.token_ids, o.text) for o in outputs]


def run_all(engine: Engine) -> dict[int, object]:
    ids = {engine.add_request(prompt, params): i for i, (prompt, params) in enumerate(WORKLOAD)}
    finals = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                finals[ids[out.request_id]] = out
    return finals


def check_survivors(engine: Engine, finals: dict, solo) -> int:
    """Every request ended; the ones that did not fail equal their solo run. Returns how many failed."""
    assert sorted(finals) == list(range(len(WORKLOAD)))
    failed = 0
    for i, out in finals.items():
        if out.finish_reason is FinishReason.ERROR:
            assert isinstance(out.error, RequestFailedError) and out.error.__cause__ is not None
            failed += 1
        else:
            assert (out.token_ids, out.text) == solo[i], i
    kv = engine.model.kv
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == kv.num_blocks
    # Still serving, and correctly.
    fresh = engine.add_request(*WORKLOAD[3])
    again = next(o for o in engine.run_until_done() if o.request_id == fresh and o.finished)
    assert (again.token_ids, again.text) == solo[3]
    return failed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_pass_failures(checkpoint, solo, seed):
    engine = make_engine(checkpoint, max_num_seqs=6, max_num_batched_tokens=16)  # batching + preemption
    model = engine.model
    model._forward = injected = flaky(model._forward, random.Random(seed))
    finals = run_all(engine)
    del model._forward  # the fault is gone; the engine must serve normally again
    failed = check_survivors(engine, finals, solo)
    assert injected.faults > 0 and failed < len(WORKLOAD)


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_failures(checkpoint, solo, seed):
    engine = make_engine(checkpoint)
    ops = engine.model.ops
    real = ops.sample
    ops.sample = injected = flaky(real, random.Random(seed), calls=15, faults=3)
    finals = run_all(engine)
    ops.sample = real
    failed = check_survivors(engine, finals, solo)
    assert injected.faults > 0 and failed < len(WORKLOAD)


def test_detokenizer_and_callback_failures(checkpoint, solo):
    engine = make_engine(checkpoint)
    ids = {}
    for i, (prompt, params) in enumerate(WORKLOAD):
        calls = {"n": 0}

        def callback(out, calls=calls, i=i):
            calls["n"] += 1
            if i == 4 and calls["n"] == 3:
                raise ValueError("consumer bug")

        ids[engine.add_request(prompt, params, on_output=callback)] = i
    engine.step()
    victim = next(r for r in engine._requests.values() if ids[r.request_id] == 7)
    victim.detokenizer.push = lambda token: (_ for _ in ()).throw(UnicodeError("broken detokenizer"))
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[ids[out.request_id]] = out
    for i in range(len(WORKLOAD)):
        finals.setdefault(i, None)
    assert finals[4].finish_reason is FinishReason.ERROR and "callback" in str(finals[4].error)
    assert finals[7].finish_reason is FinishReason.ERROR and "UnicodeError" in str(finals[7].error)
    rest = {i: o for i, o in finals.items() if i not in (4, 7)}
    assert all((o.token_ids, o.text) == solo[i] for i, o in rest.items())
    assert engine.model.kv.num_used_blocks == 0


def test_a_failure_decoding_the_end_of_a_reply_fails_that_request_whole(checkpoint, solo):
    """The detokenizer's last flush, as a request finishes, failing: the request ends as an error that its
    callback hears and leaves the engine (it was left half finished: "length" without an error, its id taken
    for good, its consumer waiting forever, ``LLM.run`` spinning)."""
    engine = make_engine(checkpoint)
    heard = []
    ids = {engine.add_request(prompt, params, on_output=heard.append): i for i, (prompt, params) in enumerate(WORKLOAD)}
    engine.step()
    victim = next(r for r in engine._requests.values() if ids[r.request_id] == 3)
    victim.detokenizer.flush = lambda: (_ for _ in ()).throw(UnicodeError("broken at the end"))
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[ids[out.request_id]] = out
    assert finals[3].finish_reason is FinishReason.ERROR and "decoding the end of its text" in str(finals[3].error)
    assert [o.finish_reason for o in heard if ids[o.request_id] == 3 and o.finished] == [FinishReason.ERROR]
    assert all((finals[i].token_ids, finals[i].text) == solo[i] for i in range(len(WORKLOAD)) if i != 3)
    assert not engine._requests and engine.model.kv.num_used_blocks == 0
    engine.add_request(WORKLOAD[3][0], WORKLOAD[3][1], request_id=victim.request_id)  # its id is free again


def test_llm_run_raises_the_failure_and_keeps_serving(checkpoint):
    llm = ferrum.load(checkpoint, backend="cpu")
    expected = llm.generate("hello world", max_tokens=5)
    real = llm.model.ops.sample
    llm.model.ops.sample = lambda *a: (_ for _ in ()).throw(RuntimeError("sampler down"))
    with pytest.raises(RequestFailedError, match="sampling failed: RuntimeError: sampler down"):
        llm.generate(["hello world", "quick brown"], max_tokens=5)
    llm.model.ops.sample = real
    assert llm.generate("hello world", max_tokens=5) == expected
    assert llm.model.kv.num_used_blocks == 0


def test_a_bad_prompt_in_a_batch_queues_nothing(checkpoint):
    llm = ferrum.load(checkpoint, backend="cpu")
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.run([[5, 6], [7, 10**6]], max_tokens=3)
    assert not llm.engine.scheduler.has_unfinished() and llm.model.kv.num_used_blocks == 0
    # the prompt queued before the bad one was aborted at once; the next step hands out its output, then nothing
    assert [o.finish_reason.value for o in llm.engine.step()] == ["abort"]
    assert not llm.engine.has_unfinished()


# ------------------------------------------------------------------ asyncio
def test_async_consumers_get_the_error_and_the_thread_survives(checkpoint, solo):
    llm = ferrum.load(checkpoint, backend="cpu")
    engine = AsyncEngine(Engine(llm.executor, llm.tokenizer))
    real = llm.model._forward
    state = {"calls": 0}

    def interrupting(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == 3:
            raise KeyboardInterrupt  # a BaseException inside an op
        return real(*args, **kwargs)

    async def consume(i):
        prompt, params = WORKLOAD[i]
        out = None
        async for out in engine.stream(prompt, params):
            pass
        return out

    async def main():
        return await asyncio.gather(*(consume(i) for i in range(4)), return_exceptions=True)

    llm.model._forward = interrupting
    results = asyncio.run(main())
    assert all(isinstance(r, RequestFailedError) for r in results), results
    assert "KeyboardInterrupt" in str(results[0])
    llm.model._forward = real
    assert llm.model.kv.num_used_blocks == 0
    # the stopped engine says why (it said "shut down", which no one did); LLM.async_engine starts another
    with pytest.raises(ExecutorStateError, match="stopped: KeyboardInterrupt in its stepping thread"):
        asyncio.run(consume(0))
    llm._async_engine = engine
    assert llm.async_engine is not engine and asyncio.run(_collect(llm.astream("hello", max_tokens=3)))


async def _collect(pieces) -> str:
    return "".join([piece async for piece in pieces])


def test_a_consumer_whose_loop_died_is_dropped(checkpoint, solo):
    llm = ferrum.load(checkpoint, backend="cpu")
    engine = llm.async_engine
    started = threading.Event()

    def doomed():
        loop = asyncio.new_event_loop()

        async def start():
            handle = engine.submit(WORKLOAD[0][0], SamplingParams(max_tokens=200, ignore_eos=True))
            started.set()
            return handle

        loop.run_until_complete(start())
        loop.close()  # the consumer's loop is gone while its request still runs

    thread = threading.Thread(target=doomed)
    thread.start()
    thread.join()
    assert started.is_set()

    async def survivor():
        prompt, params = WORKLOAD[1]
        return await engine.generate(prompt, params)

    out = asyncio.run(survivor())
    assert (out.token_ids, out.text) == solo[1]
    deadline = time.time() + 10
    while llm.model.kv.num_used_blocks and time.time() < deadline:
        time.sleep(0.05)
    assert llm.model.kv.num_used_blocks == 0


def test_a_dropped_llm_frees_its_thread_and_model(checkpoint):
    llm = ferrum.load(checkpoint, backend="cpu")

    async def once(model):
        return [piece async for piece in model.astream("hello world", max_tokens=3)]

    asyncio.run(once(llm))
    thread = llm.async_engine._thread
    model = weakref.ref(llm.model)
    del llm
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
    gc.collect()
    assert model() is None
