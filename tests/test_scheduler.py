"""Scheduler unit tests: budgets, chunking, decode-first order, preemption, prefix sharing.

The model is simulated by the KV manager alone: a "forward pass" reserves and
commits the scheduled tokens, and a sampled chunk appends a made-up token.
"""

from __future__ import annotations

import pytest

from ferrum.engine.request import Request, RequestStatus
from ferrum.engine.scheduler import EngineConfig, Scheduler
from ferrum.errors import InvalidRequestError
from ferrum.paged_kv import PagedKVManager
from ferrum.sampling import SamplingParams


def make_scheduler(num_blocks=64, block_size=4, **config) -> Scheduler:
    return Scheduler(PagedKVManager(num_blocks, block_size), EngineConfig(**config))


def request(name: str, prompt_len: int, first_token: int = 1) -> Request:
    return Request(name, tuple(range(first_token, first_token + prompt_len)), SamplingParams(), 10_000)


def run_step(s: Scheduler):
    """Schedule, 'run' the pass, sample token 7 for final chunks; returns [(id, start, n, sample)]."""
    chunks = s.schedule()
    s.kv.commit(s.kv.reserve([(c.request.request_id, c.tokens) for c in chunks]))
    s.mark_computed(chunks)
    for c in chunks:
        if c.sample:
            c.request.output_token_ids.append(7)
    return [(c.request.request_id, c.start, len(c.tokens), c.sample) for c in chunks]


def test_long_prompt_is_chunked_under_the_budget_and_sampled_once():
    s = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    s.add(request("a", 20))
    assert run_step(s) == [("a", 0, 8, False)]
    assert run_step(s) == [("a", 8, 8, False)]
    assert run_step(s) == [("a", 16, 4, True)]
    assert run_step(s) == [("a", 20, 1, True)]  # now decoding the sampled token


def test_decodes_go_first_and_new_prompts_fill_the_rest_of_the_budget():
    s = make_scheduler(max_num_batched_tokens=8, max_num_seqs=8)
    for name in "abc":
        s.add(request(name, 2))
    assert run_step(s) == [("a", 0, 2, True), ("b", 0, 2, True), ("c", 0, 2, True)]
    s.add(request("long", 30))
    assert run_step(s) == [("a", 2, 1, True), ("b", 2, 1, True), ("c", 2, 1, True), ("long", 0, 5, False)]
    assert run_step(s) == [("a", 3, 1, True), ("b", 3, 1, True), ("c", 3, 1, True), ("long", 5, 5, False)]


def test_max_num_seqs_caps_admission():
    s = make_scheduler(max_num_batched_tokens=64, max_num_seqs=2)
    for name in "abc":
        s.add(request(name, 3))
    assert [c[0] for c in run_step(s)] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]
    s.finish(s.running[0])
    assert [c[0] for c in run_step(s)] == ["b", "c"]


def test_head_of_queue_is_not_overtaken_when_it_does_not_fit():
    s = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    s.add(request("a", 8))
    run_step(s)  # a holds 2 blocks (8 tokens), 2 free
    s.add(request("big", 12, first_token=50))  # needs 3 blocks
    s.add(request("small", 1, first_token=80))  # would fit, but must wait its turn
    assert [c[0] for c in run_step(s)] == ["a"]
    assert [r.request_id for r in s.waiting] == ["big", "small"]


def test_the_most_recently_admitted_request_is_preempted_and_requeued_first():
    s = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    s.add(request("old", 4))
    s.add(request("new", 4, first_token=40))
    s.add(request("queued", 2, first_token=60))
    run_step(s)  # old, new and queued each hold one full-or-partial block
    assert s.kv.num_free_blocks == 1
    # old and new each need a second block now; only one is free -> "queued" (newest) goes
    assert run_step(s) == [("old", 4, 1, True), ("new", 4, 1, True)]
    assert [r.request_id for r in s.waiting] == ["queued"]
    queued = s.waiting[0]
    assert queued.status is RequestStatus.WAITING and queued.num_computed_tokens == 0
    assert queued.metrics.num_preemptions == 1 and s.stats.preemptions == 1
    assert queued.output_token_ids == [7]  # sampled tokens survive preemption
    assert "queued" not in s.kv


def test_a_preempted_request_resumes_with_its_whole_token_history():
    s = make_scheduler(num_blocks=3, block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                       enable_prefix_caching=False)
    s.add(request("a", 4))
    s.add(request("b", 3, first_token=40))
    run_step(s)
    run_step(s)  # a needs a 2nd block (1 free); b still fits in its first
    assert s.kv.num_free_blocks == 0
    run_step(s)  # b needs a second block: nothing free, so b (newest) is preempted
    assert [r.request_id for r in s.waiting] == ["b"]
    s.finish(s.running[0])
    steps = run_step(s)
    b = s.running[0]
    assert steps == [("b", 0, 5, True)]  # prompt (3) + its two sampled tokens, recomputed in one chunk
    assert b.all_token_ids() == [40, 41, 42, 7, 7, 7]


def test_a_request_that_cannot_fit_beside_itself_preempts_itself():
    s = make_scheduler(num_blocks=3, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    s.add(request("a", 5))
    assert run_step(s) == [("a", 0, 5, True)]
    s.kv.commit(s.kv.reserve([("other", [1, 1, 1])]))  # someone else takes the last block
    for position in (5, 6, 7):  # still room in a's own second block
        assert run_step(s) == [("a", position, 1, True)]
    assert run_step(s) == []  # position 8 needs a third block: a preempts itself and waits
    assert [r.request_id for r in s.waiting] == ["a"] and "a" not in s.kv


def test_shared_prefix_is_adopted_not_recomputed():
    s = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=64)
    first = request("first", 10)
    s.add(first)
    run_step(s)
    s.finish(first)
    second = Request("second", tuple(range(1, 9)) + (99, 98, 97), SamplingParams(), 10_000)
    s.add(second)
    assert run_step(s) == [("second", 8, 3, True)]
    assert second.metrics.num_cached_tokens == 8
    assert s.stats.prefix_hit_tokens == 8 and s.stats.prefix_queried_tokens == 10 + 11
    assert s.stats.prefix_cache_hit_rate == pytest.approx(8 / 21)


def test_prefix_caching_can_be_turned_off():
    s = make_scheduler(enable_prefix_caching=False)
    s.add(request("a", 9))
    run_step(s)
    s.add(request("b", 9))
    assert run_step(s)[-1] == ("b", 0, 9, True)


def test_finish_frees_blocks_at_once():
    s = make_scheduler(num_blocks=8, block_size=4)
    a = request("a", 10)
    s.add(a)
    run_step(s)
    assert s.kv.num_used_blocks == 3
    s.finish(a)
    assert s.kv.num_used_blocks == 0 and not s.has_unfinished() and a.finished


def test_config_is_validated():
    with pytest.raises(InvalidRequestError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=4, max_num_seqs=8)
    with pytest.raises(InvalidRequestError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
