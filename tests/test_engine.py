"""Engine behaviour on every backend that runs here, on tiny random checkpoints.

The key property: a request's output does not depend on what else runs with
it — alone, among 32 others arriving at different times, after preemption,
or next to a cancelled request.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import ferrum
from ferrum.engine import Engine, EngineConfig, FinishReason
from ferrum.errors import ContextLengthExceededError, InvalidRequestError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM
from ferrum.sampling import SamplingParams
from ferrum.tokenizer import Tokenizer

from support import run_staggered, runnable_backends, write_text_checkpoint

BACKENDS = runnable_backends()
RNG = np.random.RandomState(1)
#: 32 requests: prompt lengths 2..60, arrival step, sampling.
WORKLOAD = [
    (
        [int(t) for t in RNG.randint(2, 300, size=int(RNG.randint(2, 61)))],
        int(RNG.randint(0, 12)),
        SamplingParams(max_tokens=int(RNG.randint(4, 13)), ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(max_tokens=int(RNG.randint(4, 13)), temperature=0.9, top_k=40, top_p=0.95, seed=i,
                            ignore_eos=True),
    )
    for i in range(32)
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("engine_ckpt"))


def make_engine(checkpoint, backend, num_kv_blocks=256, tokenizer=False, **config) -> Engine:
    model = DecoderOnlyLLM.from_pretrained(checkpoint, backend=backend, num_kv_blocks=num_kv_blocks, block_size=4)
    return Engine(LlmExecutor(model), Tokenizer(checkpoint) if tokenizer else None, EngineConfig(**config))


def run_alone(engine: Engine, prompt, params) -> tuple[int, ...]:
    request_id = engine.add_request(prompt, params)
    final = [o for o in engine.run_until_done() if o.request_id == request_id and o.finished]
    return final[0].token_ids


@pytest.fixture(scope="module", params=BACKENDS)
def solo_outputs(request, checkpoint):
    engine = make_engine(checkpoint, request.param)
    return request.param, [run_alone(engine, prompt, params) for prompt, _, params in WORKLOAD]


def test_outputs_are_the_same_alone_or_among_32_staggered_requests(checkpoint, solo_outputs):
    backend, solo = solo_outputs
    engine = make_engine(checkpoint, backend, max_num_batched_tokens=64, max_num_seqs=32)
    batched = run_staggered(engine, WORKLOAD)
    assert [batched[i] for i in range(len(WORKLOAD))] == solo
    assert all(len(out) == params.max_tokens for out, (_, _, params) in zip(solo, WORKLOAD))
    metrics = engine.metrics()
    assert metrics.num_finished == 32 and metrics.kv_blocks_used == 0
    assert metrics.executor.prefill_calls + metrics.executor.decode_calls == metrics.num_steps


def test_preempted_requests_resume_with_the_same_output(checkpoint, solo_outputs):
    backend, solo = solo_outputs
    engine = make_engine(checkpoint, backend, num_kv_blocks=40, max_num_batched_tokens=64, max_num_seqs=32)
    batched = run_staggered(engine, WORKLOAD)
    assert engine.metrics().preemptions > 0
    assert [batched[i] for i in range(len(WORKLOAD))] == solo


def test_prefix_cache_hits_give_the_same_tokens_and_logprobs(checkpoint):
    backend = BACKENDS[-1]
    shared = [int(t) for t in RNG.randint(2, 300, size=37)]
    params = SamplingParams(max_tokens=6, logprobs=3, ignore_eos=True)
    results = {}
    for caching in (True, False):
        engine = make_engine(checkpoint, backend, enable_prefix_caching=caching)
        run_alone(engine, shared + [5, 6], params)
        engine.add_request(shared + [7, 8, 9], params)
        results[caching] = [o for o in engine.run_until_done() if o.finished][0]
        hits = engine.metrics().prefix_cache_hit_tokens
        assert hits == (36 if caching else 0)  # 9 full blocks of 4 tokens
    assert results[True].metrics.num_cached_tokens == 36
    assert results[True].token_ids == results[False].token_ids
    for a, b in zip(results[True].logprobs, results[False].logprobs):
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
        np.testing.assert_allclose([lp for _, lp in a.top_logprobs], [lp for _, lp in b.top_logprobs], atol=2e-5)


def test_abort_frees_blocks_at_once_and_leaves_others_untouched(checkpoint):
    backend = BACKENDS[0]
    engine = make_engine(checkpoint, backend)
    keep = [(WORKLOAD[i][0], WORKLOAD[i][2]) for i in range(3)]
    expected = [run_alone(engine, p, s) for p, s in keep]
    ids = [engine.add_request(p, s) for p, s in keep]
    victim = engine.add_request(WORKLOAD[5][0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    used = engine.metrics().kv_blocks_used
    engine.abort(victim)
    assert engine.metrics().kv_blocks_used < used
    assert victim not in engine.model.kv
    finals = {o.request_id: o for o in engine.run_until_done() if o.finished}
    assert [finals[i].token_ids for i in ids] == expected
    engine.abort(victim)  # aborting twice, or an unknown id, is harmless
    engine.abort("no-such-request")
    engine.step()


def test_aborted_request_reports_abort(checkpoint):
    engine = make_engine(checkpoint, BACKENDS[0])
    outputs = []
    request_id = engine.add_request([5, 6, 7], SamplingParams(max_tokens=40), on_output=outputs.append)
    engine.step()
    engine.abort(request_id)
    assert outputs[-1].finished and outputs[-1].finish_reason is FinishReason.ABORT
    # a caller reading step() sees it too (an abort applied between steps used to reach callbacks only)
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [(request_id, FinishReason.ABORT)]
    assert not engine.has_unfinished()


def test_bad_requests_are_refused_before_they_reach_a_batch(checkpoint):
    engine = make_engine(checkpoint, BACKENDS[0], num_kv_blocks=8)
    good = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3))
    for prompt, params, error, words in [
        ([], SamplingParams(), InvalidRequestError, "empty"),
        ([5, 300], SamplingParams(), InvalidRequestError, "vocabulary"),
        ([5] * 257, SamplingParams(), ContextLengthExceededError, "context length"),
        ([5], SamplingParams(max_tokens=100), InvalidRequestError, "lower max_tokens"),  # more than the 32-token pool
        ([5] * 40, SamplingParams(max_tokens=3), InvalidRequestError, "shorten the prompt"),  # the prompt alone too
        ([5], SamplingParams(max_tokens=3, logit_bias={999: 1.0}), InvalidRequestError, "logit_bias"),
        ([5], SamplingParams(max_tokens=3, stop=["x"]), InvalidRequestError, "tokenizer"),
        ([5.9, 6.2], SamplingParams(), InvalidRequestError, "integers, got 5.9"),  # was read as [5, 6]
        (np.array([2.7]), SamplingParams(), InvalidRequestError, "integers"),
        ([True, 7], SamplingParams(), InvalidRequestError, "integers, got True"),
        (["12"], SamplingParams(), InvalidRequestError, "integers, got '12'"),
    ]:
        with pytest.raises(error, match=words):
            engine.add_request(prompt, params)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request([1], SamplingParams(max_tokens=3), request_id=good)
    for arguments, words in [(dict(params={"max_tokens": 3}), "must be a ferrum.SamplingParams, not dict"),
                             (dict(request_id=["a"]), "request_id must be a string, not list"),
                             (dict(request_id=5), "request_id must be a string, not int"),
                             (dict(on_output=5), "on_output must be a function")]:
        with pytest.raises(InvalidRequestError, match=words):
            engine.add_request([5, 6], **arguments)
    finals = [o for o in engine.run_until_done() if o.finished]
    assert [o.request_id for o in finals] == [good] and len(finals[0].token_ids) <= 3
    for bad, words in [({"max_num_batched_tokens": 2.5}, "an integer, got 2.5"),
                       ({"max_num_seqs": float("nan")}, "an integer"),
                       ({"enable_prefix_caching": "no"}, "True or False, got 'no'")]:
        with pytest.raises(InvalidRequestError, match=words):
            EngineConfig(**bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overlap", [False, True], ids=["synchronous", "asynchronous stepping"])
def test_a_prompt_filling_the_context_gives_one_token(checkpoint, backend, overlap):
    """As vLLM's: its last position's logits pick a token that is never fed back, so it needs no room in the
    cache; the request ends at the context. Chunked over several steps, it is not mistaken for one whose
    tokens are all sampled (the scheduler would wait on it for good)."""
    model = DecoderOnlyLLM.from_pretrained(checkpoint, backend=backend, num_kv_blocks=64, block_size=4, max_seq_len=32)
    config = EngineConfig(max_num_batched_tokens=12, max_num_seqs=4, async_stepping=overlap)
    engine = Engine(LlmExecutor(model), None, config)
    prompt = [int(t) for t in RNG.randint(2, 300, size=32)]
    expected = int(np.argmax(model.forward_verify("reference", prompt)[-1]))
    model.release("reference")
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=5))
    finals = [o for o in engine.run_until_done() if o.request_id == request_id and o.finished]
    assert finals[0].token_ids == (expected,) and finals[0].finish_reason is FinishReason.LENGTH
    assert request_id not in model.kv


def test_ids_chosen_by_the_caller_and_by_the_engine_never_collide(checkpoint):
    """A caller's id equal to the next automatic one: the engine skips it (two requests shared one KV
    sequence, and the engine broke for both)."""
    engine = make_engine(checkpoint, BACKENDS[0])
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    prompts = ([5, 6, 7], [8, 9], [10, 11, 12])
    expected = [run_alone(engine, p, params) for p in prompts]
    first = engine.add_request(prompts[0], params)
    taken = engine.add_request(prompts[1], params, request_id=f"req-{int(first.removeprefix('req-')) + 1}")
    automatic = engine.add_request(prompts[2], params)
    assert len({first, taken, automatic}) == 3
    finals = {o.request_id: o.token_ids for o in engine.run_until_done() if o.finished}
    assert [finals[i] for i in (first, taken, automatic)] == expected


def test_generated_tokens_count_what_requests_took_with_or_without_overlap(checkpoint):
    """With overlapping steps the step after a request stopped (on a stop token the host sees late) computes one
    more token for it, dropped at the read: it is not counted (it was)."""
    if "mlx" not in BACKENDS:
        pytest.skip("needs a backend that overlaps steps (MLX)")
    greedy = run_alone(make_engine(checkpoint, "mlx"), [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    stop = next(t for t in greedy if greedy.index(t) >= 2)  # the request takes tokens up to its first one
    taken = greedy.index(stop) + 1  # the stop token counts
    for overlap in (False, True):
        engine = make_engine(checkpoint, "mlx", async_stepping=overlap)
        assert engine.overlaps_steps == overlap
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=8, stop_token_ids=[stop]))
        list(engine.run_until_done())
        assert engine.metrics().generated_tokens == taken


def test_stop_token_ids_and_eos(checkpoint):
    engine = make_engine(checkpoint, BACKENDS[0])
    free = run_alone(engine, [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    stop_at = free[3]
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=8, stop_token_ids=[stop_at], ignore_eos=True))
    final = [o for o in engine.run_until_done() if o.finished][0]
    assert final.token_ids == free[: free.index(stop_at)]
    assert final.finish_reason is FinishReason.STOP and final.stop_reason == stop_at


def test_context_length_ends_generation(checkpoint):
    engine = make_engine(checkpoint, BACKENDS[0])
    prompt = [5] * 250  # context length 256
    engine.add_request(prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    final = [o for o in engine.run_until_done() if o.finished][0]
    assert len(final.token_ids) == 6 and final.finish_reason is FinishReason.LENGTH


@pytest.fixture(scope="module")
def llm(checkpoint):
    return ferrum.load(checkpoint, backend=BACKENDS[0])


def test_stop_string_spanning_a_token_boundary(llm):
    params = dict(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)
    pieces = list(llm.stream("hello", **params))
    text = "".join(pieces)
    boundary = len(pieces[0]) + len(pieces[1])
    stop = text[boundary - 1 : boundary + 1]  # last char of one piece + first char of the next
    assert len(stop) == 2
    out = llm.run(["hello"], stop=[stop], **params)[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == stop


def test_a_stop_string_the_last_flush_completes_ends_as_a_stop(llm):
    """At max_tokens a last token part way through a character flushes as U+FFFD; a stop string ending in it
    is cut from the text, and then the request stopped on it (it said 'length', with no stop_reason)."""
    flushed = 0
    for max_tokens in range(2, 48):
        plain = llm.run(["the quick brown"], max_tokens=max_tokens, ignore_eos=True)[0]
        stop = plain.text[-2:]
        out = llm.run(["the quick brown"], max_tokens=max_tokens, ignore_eos=True, stop=[stop])[0]
        if out.text != plain.text:
            assert out.finish_reason is FinishReason.STOP and out.stop_reason == stop, (max_tokens, out)
        flushed += stop.endswith("\ufffd") and out.text == plain.text[:-2] and plain.text.count(stop) == 1
    assert flushed, "the test needs a reply whose last token stops part way through a character"


def test_multibyte_characters_split_across_tokens_are_streamed_whole(llm):
    tok = llm.tokenizer
    e_bytes = tok.encode("é", add_special_tokens=False)
    assert len(e_bytes) == 2  # "é" is two byte-level tokens in this vocabulary
    bias = {t: 6.0 for t in e_bytes}
    outputs = list(llm.stream_outputs("hello", max_tokens=40, temperature=1.0, seed=5, logit_bias=bias,
                                      ignore_eos=True))
    final = outputs[-1]
    tokens = list(final.token_ids)
    split = [i for i in range(len(tokens) - 1) if tokens[i : i + 2] == e_bytes]
    assert split, "the test needs an 'é' assembled from two tokens"
    # a piece sent before its character's last byte came would show as U+FFFD here and never become the "é"
    # (a U+FFFD for a byte that is not UTF-8, which random weights write too, goes out at once and stays)
    assert "".join(o.new_text for o in outputs) == final.text == tok.decode(tokens)
    assert "é" in final.text


def test_generate_many_prompts_is_batched_and_equals_one_by_one(llm):
    prompts = ["hello world", "the quick brown fox", "lazy dog"]
    params = SamplingParams(max_tokens=10, temperature=0.7, seed=3)
    together = llm.generate(prompts, params)
    assert together == [llm.generate(p, params) for p in prompts]
    assert llm.engine.metrics().executor.prefill_calls >= 1


def test_asyncio_streams_share_the_engine(llm):
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=9, ignore_eos=True)
    prompts = ["hello world", "lazy dog", "quick brown"]
    expected = [llm.generate(p, params) for p in prompts]

    async def collect(prompt):
        return "".join([piece async for piece in llm.astream(prompt, params)])

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    assert asyncio.run(main()) == expected


def test_asyncio_cancellation_aborts_the_request(llm):
    async def main():
        stream = llm.async_engine.stream(llm.encode_prompt("hello"), SamplingParams(max_tokens=200, ignore_eos=True))
        first = await stream.__anext__()
        await stream.aclose()
        return first

    first = asyncio.run(main())
    assert not first.finished
    for _ in range(100):  # the engine thread applies the abort before its next pass
        if not llm.engine.has_unfinished():
            break
        asyncio.run(asyncio.sleep(0.01))
    assert not llm.engine.has_unfinished() and llm.model.kv.num_used_blocks == 0


def test_finished_requests_leave_the_async_engine_whether_read_or_not(llm):
    """A handle never iterated holds its outputs, not the engine: once the request finishes nothing of it stays
    routed. A caller's id taken again after it finished belongs to the new request: reading (or leaving) the
    old handle neither unroutes nor aborts the new one."""
    engine = llm.async_engine
    params = SamplingParams(max_tokens=20, ignore_eos=True)

    async def dropped():
        for _ in range(5):
            engine.submit(llm.encode_prompt("hello"), params)
        while llm.engine.has_unfinished():
            await asyncio.sleep(0.01)

    asyncio.run(dropped())
    assert not engine._streams

    async def left():  # its event loop closes with requests unfinished: they fail, and are unrouted too
        for _ in range(3):
            engine.submit(llm.encode_prompt("hello"), SamplingParams(max_tokens=200, ignore_eos=True))

    asyncio.run(left())
    for _ in range(200):
        if not llm.engine.has_unfinished():
            break
        time.sleep(0.01)
    assert not engine._streams and llm.model.kv.num_used_blocks == 0

    async def reused():
        first = engine.submit(llm.encode_prompt("hello"), params, request_id="job")
        while llm.engine.has_unfinished():
            await asyncio.sleep(0.01)
        second = engine.submit(llm.encode_prompt("lazy dog"), SamplingParams(max_tokens=200, ignore_eos=True),
                               request_id="job")
        assert [out async for out in first][-1].finished
        first.abort()
        assert engine._streams.get("job") is second._stream
        outs = [out async for out in second]
        return outs[-1]

    last = asyncio.run(reused())
    assert last.finished and len(last.token_ids) == 200 and last.finish_reason.value == "length"
    assert not engine._streams


@pytest.mark.parametrize("backend", BACKENDS)
def test_asyncio_engine_thread_runs_every_backend(checkpoint, backend):
    """The stepping thread is not the thread that loaded the weights (MLX streams are per thread)."""
    llm = ferrum.load(checkpoint, backend=backend)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = llm.generate("hello world", params)

    async def main():
        return "".join([piece async for piece in llm.astream("hello world", params)])

    assert asyncio.run(main()) == expected
    llm.async_engine.shutdown()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["after the forward pass", "before the previous step is read"])
def test_ctrl_c_inside_a_step_leaves_every_request_whole(checkpoint, backend, where):
    """A KeyboardInterrupt landing inside ``Engine.step`` (Ctrl-C in a caller stepping a shared engine): the
    requests of that step go on, from another thread as the asyncio engine's would, to their solo outputs, and
    every KV block comes back. Before, one was left with KV counted as computed and no token to feed ("empty
    token list"), or waiting forever on a step nobody would read, or (MLX) met the interrupted thread's lazy
    KV writes on the other thread ("There is no Stream(cpu, 0) in current thread")."""
    from concurrent.futures import ThreadPoolExecutor

    engine = make_engine(checkpoint, backend, async_stepping=True)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    expected = [run_alone(engine, prompt, params) for prompt in prompts]
    free = engine.model.kv.num_free_blocks
    armed = [True]
    if where == "after the forward pass":
        wrapped, hooked = engine.scheduler, "mark_computed"
    else:
        wrapped, hooked = engine, "_read"
    real = getattr(wrapped, hooked)

    def interrupted(*args):
        if armed[0] and len(args[0] if hooked == "mark_computed" else args[0].pending) > 1:
            armed[0] = False
            raise KeyboardInterrupt
        return real(*args)

    setattr(wrapped, hooked, interrupted)
    finals = {}
    with ThreadPoolExecutor(1) as other_thread:
        first = engine.add_request(prompts[0], params)
        for out in other_thread.submit(lambda: engine.step() + engine.step()).result():  # it has stepped before
            finals[out.request_id] = out
        second = engine.add_request(prompts[1], params)
        with pytest.raises(KeyboardInterrupt):
            for _ in range(8):
                for out in engine.step():
                    finals[out.request_id] = out
        assert not armed[0]
        for out in other_thread.submit(engine.run_until_done).result():
            finals[out.request_id] = out
    assert [finals[first].token_ids, finals[second].token_ids] == expected
    assert finals[first].finished and finals[second].finished
    assert engine.model.kv.num_free_blocks == free


def test_a_preempted_requests_own_blocks_are_not_counted_as_its_prompts_cache_hits(checkpoint):
    """Readmitted after a preemption, a request matches its own prompt and output blocks still cached: recompute
    saved, not prompt tokens served by the cache, which usage reports (it reported 48 cached of a 20-token
    prompt that no other request shared)."""
    engine = make_engine(checkpoint, BACKENDS[0], num_kv_blocks=24)  # 96 slots of the 130 both reach
    first = engine.add_request(list(range(2, 22)), SamplingParams(max_tokens=30, ignore_eos=True))
    second = engine.add_request(list(range(30, 50)), SamplingParams(max_tokens=60, ignore_eos=True))
    finals = {o.request_id: o for o in engine.run_until_done() if o.finished}
    assert engine.metrics().preemptions > 0 and finals[second].metrics.num_preemptions > 0
    assert [finals[r].metrics.num_cached_tokens for r in (first, second)] == [0, 0]
    assert engine.metrics().prefix_cache_queried_tokens == 40 and engine.metrics().prefix_cache_hit_tokens == 0
