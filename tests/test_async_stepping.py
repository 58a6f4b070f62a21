"""Asynchronous stepping: step N+1 is issued before the host reads step N's tokens.

Every test runs the same requests with ``async_stepping`` on and off and wants
the same outputs token for token (greedy and seeded sampling, every stop
condition, aborts, preemption, prefix-cache hits), the KV pool empty at the
end and nothing streamed twice or dropped. Backends: each built-in one that
leaves sampled ids on the device (MLX, torch), and ``lagging``, the numpy ops
plus a ``sample_on_device`` that holds its result back until read, so the
engine's side is checked exactly on any machine.
"""

from __future__ import annotations

import dataclasses

import random

import numpy as np
import pytest

from ferrum import backends
from ferrum.capabilities import ExecutorCapabilities
from ferrum.engine import Engine, EngineConfig, FinishReason
from ferrum.errors import RequestFailedError
from ferrum.executor import LlmExecutor
from ferrum.hookspec import hookimpl
from ferrum.model import DecoderOnlyLLM
from ferrum.sampling import DeviceSample, SamplingParams, sample_numpy
from ferrum.tokenizer import Tokenizer

from support import cpu_like_plugin, flaky, runnable_backends, write_text_checkpoint


class _Reads:
    """What the ``lagging`` plugin saw: sampling calls issued, and results read, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.issued = 0
        self.fail_read_of: set[int] = set()  # call numbers whose read raises


READS = _Reads()


def _lagging_sample_on_device(logits, batch):
    READS.issued += 1
    call = READS.issued
    READS.log.append(("issue", call))
    result = sample_numpy(logits, batch)

    def read():
        READS.log.append(("read", call))
        if call in READS.fail_read_of:
            raise RuntimeError("injected device fault")
        return result

    return DeviceSample(result.tokens.astype(np.int32), read)


@pytest.fixture(scope="module", autouse=True)
def lagging_backend():
    backends.register_plugin("lagging", cpu_like_plugin("lagging", extra={
        "sample_on_device": hookimpl(_lagging_sample_on_device),
    }))
    yield
    backends.unregister_plugin("lagging")


BACKENDS = ["lagging"] + [b for b in runnable_backends() if b in ("mlx", "cuda")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("async_ckpt"))


def make_engine(checkpoint, backend, overlap, num_kv_blocks=256, **config) -> Engine:
    model = DecoderOnlyLLM.from_pretrained(checkpoint, backend=backend, num_kv_blocks=num_kv_blocks, block_size=4)
    return Engine(LlmExecutor(model), Tokenizer(checkpoint), EngineConfig(async_stepping=overlap, **config))


def _params(i: int, **extra) -> SamplingParams:
    """Greedy for even ``i``, seeded top-k/top-p for odd, with logprobs now and then."""
    sampled = dict(temperature=0.9, top_k=40, top_p=0.95, seed=i) if i % 2 else {}
    return SamplingParams(max_tokens=4 + (7 * i) % 11, logprobs=2 if i % 3 == 0 else 0, **sampled, **extra)


RNG = np.random.RandomState(3)
#: (prompt, arrival step, params): lengths 2..40, staggered, EOS honoured for some.
WORKLOAD = [
    ([int(t) for t in RNG.randint(2, 300, size=int(RNG.randint(2, 41)))], int(RNG.randint(0, 10)),
     _params(i, ignore_eos=i % 4 != 1))
    for i in range(16)
]


def run(engine: Engine, workload, abort_after: dict[int, int] | None = None) -> dict[int, dict]:
    """Add requests at their arrival steps, abort some after that many streamed tokens; per request:
    the final output and every token and character streamed."""
    abort_after = abort_after or {}
    got: dict[int, dict] = {}

    def on_output(index, out):
        entry = got[index]
        entry["streamed"] += out.new_token_ids
        entry["text"] += out.new_text
        assert "final" not in entry, "an output after the final one"
        if out.finished:
            entry["final"] = out
        elif len(out.token_ids) >= abort_after.get(index, 1 << 30):
            engine.abort(out.request_id)

    step = 0
    while len(got) < len(workload) or engine.has_unfinished():
        for index, (prompt, arrival, params) in enumerate(workload):
            if arrival == step:
                got[index] = {"streamed": [], "text": ""}
                engine.add_request(prompt, params, on_output=lambda out, index=index: on_output(index, out))
        engine.step()
        step += 1
        assert step < 500
    kv = engine.model.kv
    assert kv.num_used_blocks == 0 and not engine.has_unfinished()
    for entry in got.values():  # nothing streamed twice or dropped
        assert tuple(entry["streamed"]) == entry["final"].token_ids
        assert entry["text"] == entry["final"].text
    return got


def summary(got: dict[int, dict]) -> dict[int, tuple]:
    def picks(out):
        if out.logprobs is None:
            return None
        return [(p.token, round(p.logprob, 3), [(t, round(lp, 3)) for t, lp in p.top_logprobs]) for p in out.logprobs]

    return {
        i: (e["final"].token_ids, e["final"].text, e["final"].finish_reason, e["final"].stop_reason,
            picks(e["final"]))
        for i, e in got.items()
    }


def test_the_backend_decides_whether_steps_overlap(checkpoint):
    caps = {name: ExecutorCapabilities.from_backend(backends.load_backend(name)).async_stepping
            for name in ("cpu", "lagging")}
    assert caps == {"cpu": False, "lagging": True}
    for name in runnable_backends():
        if name in ("mlx", "cuda"):
            assert ExecutorCapabilities.from_backend(backends.load_backend(name)).async_stepping


@pytest.mark.parametrize("computes_apart, device, overlaps", [
    (None, "cpu", False),  # numpy, torch on a CPU: a step computes while it is issued
    (None, "cuda:0", True),
    (True, "cpu", True),  # MLX on a CPU evaluates on its own thread
    (False, "gpu", False),
])
def test_by_default_steps_overlap_where_the_backend_computes_apart(checkpoint, computes_apart, device, overlaps):
    model = DecoderOnlyLLM.from_pretrained(checkpoint, backend="lagging", num_kv_blocks=64, block_size=4)
    model.backend = dataclasses.replace(
        model.backend, info=dataclasses.replace(model.backend.info, device=device, computes_apart=computes_apart))
    engine = Engine(LlmExecutor(model), Tokenizer(checkpoint), EngineConfig())
    assert engine.overlaps_steps == overlaps
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    first_step = sum(len(o.new_token_ids) for o in engine.step())
    assert first_step == (0 if overlaps else 1)  # an overlapped prefill's token arrives with the next step
    engine.run_until_done()


def test_mlx_reports_that_it_computes_apart():
    if "mlx" not in runnable_backends():
        pytest.skip("MLX cannot run here")
    assert backends.load_backend("mlx").info.computes_apart


@pytest.mark.parametrize("overlap", [True, False])
def test_the_host_reads_a_step_after_the_next_is_issued(checkpoint, overlap):
    engine = make_engine(checkpoint, "lagging", overlap)
    READS.log.clear()
    first = READS.issued + 1
    request_id = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    tokens_per_step = [sum(len(o.new_token_ids) for o in engine.step()) for _ in range(4)]
    assert not engine.has_unfinished()
    assert [o for o in engine.run_until_done() if o.request_id == request_id] == []
    if overlap:  # the prefill's token arrives with step 2; step 4 only reads the last one (max_tokens known)
        assert tokens_per_step == [0, 1, 1, 1]
        assert READS.log == [("issue", first), ("issue", first + 1), ("read", first), ("issue", first + 2),
                             ("read", first + 1), ("read", first + 2)]
    else:
        assert tokens_per_step == [1, 1, 1, 0]
        assert READS.log == [e for c in range(first, first + 3) for e in (("issue", c), ("read", c))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapped_steps_give_the_synchronous_outputs(checkpoint, backend):
    config = dict(max_num_batched_tokens=32, max_num_seqs=16)  # batching and chunked prefills
    sync = summary(run(make_engine(checkpoint, backend, False, **config), WORKLOAD))
    engine = make_engine(checkpoint, backend, True, **config)
    assert summary(run(engine, WORKLOAD)) == sync
    reasons = {v[2] for v in sync.values()}
    assert FinishReason.LENGTH in reasons
    assert engine.metrics().num_finished == len(WORKLOAD)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_stop_condition_drops_the_extra_token(checkpoint, backend):
    base = [([9, 8, 7 + i, 6], i, _params(i, ignore_eos=True)) for i in range(6)]
    free = summary(run(make_engine(checkpoint, backend, False), base))
    workload = []
    for i, (prompt, arrival, params) in enumerate(base):
        tokens, text = free[i][0], free[i][1]
        cut = len(tokens) // 2
        stops = [
            dict(stop_token_ids=[tokens[cut]]),
            dict(stop=[text[len(text) // 2 : len(text) // 2 + 2]] if len(text) > 3 else []),
            dict(max_tokens=max(1, cut)),
        ][i % 3]
        fields = {f: getattr(params, f) for f in ("max_tokens", "temperature", "top_k", "top_p", "seed", "logprobs")}
        workload.append((prompt, arrival, SamplingParams(**{**fields, "ignore_eos": True, **stops})))
    sync = summary(run(make_engine(checkpoint, backend, False), workload))
    assert summary(run(make_engine(checkpoint, backend, True), workload)) == sync
    assert FinishReason.STOP in {v[2] for v in sync.values()}
    assert any(len(sync[i][0]) < len(free[i][0]) for i in sync)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aborts_mid_stream(checkpoint, backend):
    """An abort right after an output ends the request with exactly the tokens that output showed;
    the token its next step computed meanwhile is dropped."""
    abort_after = {1: 2, 4: 1, 7: 3}
    sync = summary(run(make_engine(checkpoint, backend, False), WORKLOAD, abort_after))
    assert summary(run(make_engine(checkpoint, backend, True), WORKLOAD, abort_after)) == sync
    assert [(sync[i][2], len(sync[i][0])) for i in abort_after] == [(FinishReason.ABORT, n)
                                                                    for n in abort_after.values()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_preemption_under_a_tiny_pool(checkpoint, backend):
    sync = make_engine(checkpoint, backend, False, num_kv_blocks=24, max_num_batched_tokens=64)
    want = summary(run(sync, WORKLOAD))
    engine = make_engine(checkpoint, backend, True, num_kv_blocks=24, max_num_batched_tokens=64)
    assert summary(run(engine, WORKLOAD)) == want
    assert engine.scheduler.stats.preemptions > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cache_hits_and_keys_stay_right(checkpoint, backend):
    """Blocks completed by a token still on the device join the cache only once its id is known,
    under the right key: later prompts that match them get the uncached outputs."""
    shared = [int(t) for t in RNG.randint(2, 300, size=13)]
    workload = [(shared + [20 + i], 2 * i, _params(i, ignore_eos=True)) for i in range(5)]
    uncached = summary(run(make_engine(checkpoint, backend, False, enable_prefix_caching=False), workload))
    engine = make_engine(checkpoint, backend, True)
    assert summary(run(engine, workload)) == uncached
    assert engine.scheduler.stats.prefix_hit_tokens > 0
    # prompts that continue the finished requests' outputs match blocks keyed while their tokens lagged
    again = [(list(workload[i][0]) + list(uncached[i][0]), 0, _params(i, ignore_eos=True)) for i in range(5)]
    fresh = summary(run(make_engine(checkpoint, backend, False, enable_prefix_caching=False), again))
    hits = engine.scheduler.stats.prefix_hit_tokens
    assert summary(run(engine, again)) == fresh
    assert engine.scheduler.stats.prefix_hit_tokens - hits > sum(len(p) for p, _, _ in workload)


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalties_and_full_logits_run_synchronous_steps_beside_the_rest(checkpoint, backend):
    workload = list(WORKLOAD[:6]) + [
        ([4, 5, 6, 7], 1, SamplingParams(max_tokens=8, repetition_penalty=1.3, ignore_eos=True)),
        ([8, 9], 3, SamplingParams(max_tokens=6, frequency_penalty=0.5, temperature=0.8, seed=5, ignore_eos=True)),
    ]
    sync = summary(run(make_engine(checkpoint, backend, False), workload))
    assert summary(run(make_engine(checkpoint, backend, True), workload)) == sync


@pytest.mark.parametrize("where", ["forward", "sampling"])
def test_a_fault_in_an_overlapped_step_ends_only_its_requests(checkpoint, where):
    workload = [(prompt, arrival, _params(i, ignore_eos=True)) for i, (prompt, arrival, _) in enumerate(WORKLOAD)]
    config = dict(max_num_batched_tokens=32, max_num_seqs=16)  # batching and chunked prefills
    sync = summary(run(make_engine(checkpoint, "lagging", False, **config), workload))
    engine = make_engine(checkpoint, "lagging", True, **config)
    ops = engine.model.ops
    if where == "forward":
        engine.model._forward = injected = flaky(engine.model._forward, random.Random(1), 40, 4)
    else:
        ops.sample_on_device = injected = flaky(ops.sample_on_device, random.Random(1), 30, 3)
    got = run(engine, workload)
    assert injected.faults > 0
    failed = [i for i, e in got.items() if e["final"].finish_reason is FinishReason.ERROR]
    assert len(failed) < len(workload)  # a failed batched call is retried row by row: often nobody fails
    for i, entry in got.items():
        if i in failed:
            assert isinstance(entry["final"].error, RequestFailedError)
        else:
            assert summary({i: entry}) == {i: sync[i]}


def test_a_failed_read_ends_the_requests_that_call_sampled(checkpoint):
    engine = make_engine(checkpoint, "lagging", True)
    workload = [([3, 4, 5], 0, SamplingParams(max_tokens=6, ignore_eos=True)),
                ([6, 7, 8, 9], 0, SamplingParams(max_tokens=6, ignore_eos=True)),
                ([10, 11], 4, SamplingParams(max_tokens=3, ignore_eos=True))]
    READS.fail_read_of = {READS.issued + 2}  # the first decode step of the first two
    try:
        got = run(engine, workload)
    finally:
        READS.fail_read_of = set()
    assert [got[i]["final"].finish_reason for i in range(3)] == [FinishReason.ERROR] * 2 + [FinishReason.LENGTH]
    assert [len(got[i]["final"].token_ids) for i in range(2)] == [1, 1]


def test_a_block_completed_by_a_token_not_read_yet_is_keyed_when_it_is_filled_in():
    from ferrum.paged_kv import PagedKVManager

    def grown(tokens_in_steps):
        kv = PagedKVManager(num_blocks=8, block_size=4)
        for tokens in tokens_in_steps:
            kv.commit(kv.reserve([("s", tokens)]))
        return kv

    known = grown([[5, 6, 7], [8], [9]])
    lagging = grown([[5, 6, 7], [None], [None]])  # two decode steps whose inputs were on the device
    assert lagging.num_cached_blocks == 0 and lagging.match_prefix([5, 6, 7, 8, 9]).num_tokens == 0
    lagging.fill("s", 4, 9)  # out of order: the first block still waits for position 3
    assert lagging.num_cached_blocks == 0
    lagging.fill("s", 3, 8)
    assert lagging.match_prefix([5, 6, 7, 8, 9]) == known.match_prefix([5, 6, 7, 8, 9])
    assert lagging.match_prefix([5, 6, 7, 8, 9]).num_tokens == 4
    assert lagging.match_prefix([5, 6, 7, 1, 9]).num_tokens == 0
    lagging.fill("s", 4, 3)  # a position already known is left alone
    assert lagging.match_prefix([5, 6, 7, 8, 9]).num_tokens == 4
    lagging.release("s")
    lagging.fill("s", 5, 1)  # a released sequence's late token is dropped
    assert lagging.num_used_blocks == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_asyncio_streams_get_every_token_once(checkpoint, backend):
    """The asyncio front end's stepping thread keeps going while a read is owed, and streams deliver it."""
    import asyncio

    from ferrum.engine import AsyncEngine

    workload = [(prompt, _params(i, ignore_eos=True)) for i, (prompt, _, _) in enumerate(WORKLOAD[:6])]
    want = [summary(run(make_engine(checkpoint, backend, False), [(p, 0, params)]))[0][:3] for p, params in workload]
    engine = AsyncEngine(make_engine(checkpoint, backend, True))

    async def consume(prompt, params):
        streamed, final = [], None
        async for final in engine.stream(prompt, params):
            streamed += final.new_token_ids
        assert tuple(streamed) == final.token_ids
        return final.token_ids, final.text, final.finish_reason

    async def main():
        return await asyncio.gather(*(consume(p, params) for p, params in workload))

    try:
        assert asyncio.run(main()) == want
    finally:
        engine.shutdown()
    assert engine.engine.model.kv.num_used_blocks == 0 and not engine.engine.has_unfinished()


def test_token_ids_gather_device_tokens_between_host_tokens():
    from ferrum.backends import load_backend
    from ferrum.device_tokens import DeviceToken, token_ids

    ops = load_backend("cpu").ops
    first, second = np.array([70, 71, 72], np.int32), np.array([80, 81], np.int32)
    lists = [[1, 2, DeviceToken(first, 2, 3)], [DeviceToken(second, 0, 2)], [3], [DeviceToken(first, 0, 3)]]
    assert np.asarray(token_ids(ops, lists)).tolist() == [1, 2, 72, 80, 3, 70]
    steady = [[DeviceToken(first, i, 3)] for i in range(3)]
    assert token_ids(ops, steady) is first  # decodes in the previous step's row order take its ids as they are
    assert np.asarray(token_ids(ops, steady[::-1])).tolist() == [72, 71, 70]
    assert np.asarray(token_ids(ops, [[4, 5], [6]])).tolist() == [4, 5, 6]
