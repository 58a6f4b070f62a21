"""Request metadata: ``ferrum_*`` keys checked against one table, others passed through;
``ferrum_require_full_logits`` gives one request every position's logits and changes nothing else."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import ferrum
from ferrum.engine import AsyncEngine, Engine, EngineConfig
from ferrum.engine.request import LogitRows
from ferrum.errors import InvalidRequestError
from ferrum.executor import LlmExecutor
from ferrum.executor_api import PrefillInput, UnifiedBatch, UnifiedBatchItem
from ferrum.metadata import KNOWN_KEYS
from ferrum.model import DecoderOnlyLLM
from ferrum.sampling import SamplingParams

from support import runnable_backends, write_text_checkpoint

BACKENDS = runnable_backends()
FULL = {"ferrum_require_full_logits": True, "user": "alice"}
PROMPTS = [list(range(2, 40)), [7, 8, 9], list(range(100, 123))]
PARAMS = [SamplingParams(max_tokens=6, ignore_eos=True),
          SamplingParams(max_tokens=5, temperature=0.9, seed=3, ignore_eos=True),
          SamplingParams(max_tokens=7, ignore_eos=True)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("metadata_ckpt"))


def load(checkpoint, backend) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(checkpoint, backend=backend, num_kv_blocks=128, block_size=4)


def run(engine: Engine, metadata: list) -> dict[str, object]:
    ids = [engine.add_request(p, s, metadata=m) for p, s, m in zip(PROMPTS, PARAMS, metadata)]
    finals = {o.request_id: o for o in engine.run_until_done() if o.finished}
    return [finals[i] for i in ids]


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_logits_for_one_request_in_a_batch(checkpoint, backend):
    # 16-token budget: the 38-token prompt is prefilled in chunks, next to the others' decodes
    engine = Engine(LlmExecutor(load(checkpoint, backend)), None, EngineConfig(max_num_batched_tokens=16,
                                                                               max_num_seqs=4))
    plain = run(engine, [None, None, None])
    mixed = run(engine, [FULL, None, {"trace": 1}])
    assert [o.token_ids for o in mixed] == [o.token_ids for o in plain]
    assert mixed[0].metadata == FULL and mixed[2].metadata == {"trace": 1}
    assert [o.full_logits is None for o in mixed] == [False, True, True]
    out = mixed[0]
    reference = load(checkpoint, backend).forward_verify("ref", list(out.prompt_token_ids) + list(out.token_ids[:-1]))
    assert out.full_logits.shape == reference.shape == (len(PROMPTS[0]) + 5, 300)
    np.testing.assert_allclose(out.full_logits, reference, rtol=1e-4, atol=1e-4)
    assert engine.model.kv.num_free_blocks == engine.model.kv.num_blocks


def test_full_logits_survive_preemption(checkpoint):
    engine = Engine(LlmExecutor(DecoderOnlyLLM.from_pretrained(checkpoint, backend=BACKENDS[0], num_kv_blocks=16,
                                                               block_size=4)),
                    None, EngineConfig(max_num_batched_tokens=16, max_num_seqs=4))
    out = run(engine, [FULL, FULL, None])
    assert engine.metrics().preemptions > 0
    for o in out[:2]:
        reference = load(checkpoint, BACKENDS[0]).forward_verify("r", list(o.prompt_token_ids) + list(o.token_ids[:-1]))
        np.testing.assert_allclose(o.full_logits, reference, rtol=1e-4, atol=1e-4)


def test_each_output_holds_its_own_logits_without_copying_the_earlier_ones(checkpoint):
    """Every step's output carries all rows so far: as read-only views of one growing buffer (not a
    fresh concatenation per step, which costs positions x vocab a step), none of which a later step,
    nor a preemption's recompute, changes."""
    engine = Engine(LlmExecutor(DecoderOnlyLLM.from_pretrained(checkpoint, backend=BACKENDS[0], num_kv_blocks=16,
                                                               block_size=4)),
                    None, EngineConfig(max_num_batched_tokens=16, max_num_seqs=4))
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ids = [engine.add_request(p, params, metadata=FULL) for p in (PROMPTS[0], PROMPTS[2])]
    outputs = {i: [] for i in ids}
    for out in engine.run_until_done():
        outputs[out.request_id].append((out, out.full_logits.copy()))
    assert engine.metrics().preemptions > 0
    for steps in outputs.values():
        final = steps[-1][0].full_logits
        assert len(final) == len(steps[-1][0].prompt_token_ids) + 24 - 1
        for out, at_the_time in steps:
            np.testing.assert_array_equal(out.full_logits, at_the_time)
            assert not out.full_logits.flags.writeable
        views = [out.full_logits for out, _ in steps]
        copies = sum(not np.shares_memory(a, b) for a, b in zip(views, views[1:]))
        assert copies <= 6, f"{copies} of {len(views) - 1} steps copied the rows"  # doublings and recomputes


def test_logit_rows_replace_recomputed_positions_and_refuse_gaps():
    rows = LogitRows()
    block = np.arange(12, dtype=np.float32).reshape(4, 3)
    rows.put(block, 0)
    before = rows.view()
    rows.put(block[:2] + 100, 3)  # positions 3 and 4 recomputed from 3 on
    np.testing.assert_array_equal(rows.view(), np.concatenate([block[:3], block[:2] + 100]))
    np.testing.assert_array_equal(before, block)  # the view handed out earlier is untouched
    rows.truncate(1)
    np.testing.assert_array_equal(rows.view(), block[:1])
    with pytest.raises(ValueError, match="gap"):
        rows.put(block, 3)


def test_executor_items_carry_metadata(checkpoint):
    executor = LlmExecutor(load(checkpoint, BACKENDS[0]))
    items = (UnifiedBatchItem("a", [5, 6, 7], 0, metadata=FULL), UnifiedBatchItem("b", [8, 9], 0))
    out = executor.unified_decode(UnifiedBatch(items))
    assert out.logits["a"].shape == (3, 300) and out.logits["b"].shape == (300,)
    reference = load(checkpoint, BACKENDS[0])
    np.testing.assert_allclose(out.logits["a"], reference.forward_verify("a", [5, 6, 7]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.logits["b"], reference.forward_verify("b", [8, 9])[-1], rtol=1e-5, atol=1e-5)
    prefill = executor.prefill(PrefillInput("c", [1, 2], metadata={"ferrum_require_full_logits": True}))
    assert prefill.logits.shape == (2, 300)


def test_unknown_ferrum_keys_are_refused_everywhere(checkpoint):
    llm = ferrum.load(checkpoint, backend=BACKENDS[0])
    with pytest.raises(InvalidRequestError, match="'ferrum_lora_adaptr'.*ferrum_require_full_logits"):
        llm.generate("hello", max_tokens=2, metadata={"ferrum_lora_adaptr": "x"})
    assert not llm.engine.has_unfinished()
    with pytest.raises(InvalidRequestError, match="must be True or False"):
        llm.engine.add_request([5, 6], metadata={"ferrum_require_full_logits": "yes"})
    with pytest.raises(InvalidRequestError, match="ferrum_nope"):
        llm.executor.prefill(PrefillInput("x", [5, 6], metadata={"ferrum_nope": 1}))
    assert "x" not in llm.model.kv
    with pytest.raises(InvalidRequestError, match="mapping"):
        llm.run(["hi"], max_tokens=1, metadata=["ferrum_require_full_logits"])
    assert all(name.startswith("ferrum_") for name in KNOWN_KEYS)
    assert llm.generate("hello", max_tokens=2, metadata={"client": {"any": "thing"}})  # other keys pass through
    text = list(llm.stream("hello", max_tokens=2, metadata=FULL))
    assert text


def test_async_submit_takes_metadata(checkpoint):
    engine = AsyncEngine(Engine(LlmExecutor(load(checkpoint, BACKENDS[0]))))

    async def go():
        return await engine.generate([5, 6, 7], SamplingParams(max_tokens=3), metadata=FULL)

    try:
        out = asyncio.run(go())
    finally:
        engine.shutdown()
    assert out.full_logits.shape == (5, 300)
