"""LlmExecutor: the ModelExecutor contract, its metrics and its error behaviour.

The executor's logic is backend-agnostic, so these run on the numpy backend;
backend parity is covered elsewhere. Logit comparisons between two paths of
the same backend use a tight tolerance (1e-5): the same ops run in a
different batch layout.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ferrum.errors import (
    ExecutorStateError,
    InvalidRequestError,
    PositionMismatchError,
    UnknownSequenceError,
)
from ferrum.executor import LlmExecutor
from ferrum.executor_api import DecodeInput, PrefillInput, UnifiedBatch, UnifiedBatchItem
from ferrum.model import DecoderOnlyLLM

from support import write_text_checkpoint

TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("exec_ckpt"))


@pytest.fixture
def executor(checkpoint):
    return LlmExecutor(DecoderOnlyLLM.from_pretrained(checkpoint, backend="cpu", num_kv_blocks=32, block_size=4))


def test_batch_prefill_matches_single_prefills(executor):
    prompts = {"a": [3, 4, 5, 6, 7, 8], "b": [9, 10], "c": [11, 12, 13, 14, 15, 16, 17, 18, 19]}
    batched = executor.batch_prefill([PrefillInput(k, v) for k, v in prompts.items()])
    for k in prompts:
        executor.release_cache(k)
    for (k, v), out in zip(prompts.items(), batched):
        alone = executor.prefill(PrefillInput(k, v))
        np.testing.assert_allclose(out.logits, alone.logits, atol=TOL)
        assert out.handle.seq_len == len(v)
        assert len(out.handle.block_table) == -(-len(v) // 4)


def test_decode_steps_match_forward_verify_and_truncate_restores(executor):
    tokens = [5, 6, 7, 8, 9, 10, 11]
    first = executor.prefill(PrefillInput("s", tokens[:3])).logits
    stepwise = [first]
    for pos in range(3, len(tokens)):
        stepwise.append(executor.decode(DecodeInput("s", tokens[pos], pos)).logits)
    executor.release_cache("s")
    executor.prefill(PrefillInput("v", tokens[:1]))
    verify = executor.forward_verify("v", tokens[1:])
    # verify row i holds the logits after tokens[: i + 2]; stepwise[j] after tokens[: j + 3]
    np.testing.assert_allclose(verify[1:], np.stack(stepwise), atol=TOL)

    handle = executor.truncate_kv("v", 3)
    assert handle.seq_len == 3 and len(handle.block_table) == 1
    again = executor.decode(DecodeInput("v", tokens[3], 3)).logits
    np.testing.assert_allclose(again, stepwise[1], atol=TOL)


def test_unified_batch_mixes_prefill_chunks_and_decodes(executor):
    executor.prefill(PrefillInput("d", [20, 21, 22]))
    batch = UnifiedBatch(
        (
            UnifiedBatchItem("d", [23], 3, True),
            UnifiedBatchItem("p", [30, 31, 32, 33, 34], 0, False),  # first chunk: no logits
        )
    )
    out = executor.unified_decode(batch)
    assert set(out.logits) == {"d"}
    assert out.handles["p"].seq_len == 5
    final = executor.unified_decode(UnifiedBatch((UnifiedBatchItem("p", [35, 36], 5, True),)))
    executor.release_cache("p")
    one_shot = executor.prefill(PrefillInput("p", [30, 31, 32, 33, 34, 35, 36])).logits
    np.testing.assert_allclose(final.logits["p"], one_shot, atol=TOL)


def test_require_full_logits_returns_every_position(executor):
    executor.prefill(PrefillInput("f", [1, 2]))
    out = executor.unified_decode(
        UnifiedBatch((UnifiedBatchItem("f", [3, 4, 5], 2, True),), require_full_logits=True)
    )
    assert out.logits["f"].shape == (3, executor.model.config.vocab_size)


def test_status_counts_and_memory(executor):
    before = executor.status()
    assert before.state.value == "ready" and before.kv_blocks_used == 0
    executor.prefill(PrefillInput("m", list(range(2, 12))))
    executor.decode(DecodeInput("m", 3, 10))
    executor.decode(DecodeInput("m", 4, 11))
    status = executor.status()
    assert (status.prefill_calls, status.decode_calls) == (1, 2)
    assert (status.prefill_tokens, status.decode_tokens) == (10, 2)
    assert status.avg_prefill_ms > 0 and status.avg_decode_ms > 0
    assert status.kv_blocks_used == 3 and status.active_sequences == 1
    caps = executor.capabilities()
    per_block = caps.memory.kv_bytes_per_token * status.kv_block_size
    assert status.memory_in_use_bytes == caps.memory.weight_bytes + 3 * per_block
    assert status.lock_wait.acquisitions == 3


def test_threads_share_the_model_safely(executor):
    prompts = {f"t{i}": [2 + i, 3 + i, 4 + i] for i in range(4)}
    expected = {}
    for k, v in prompts.items():
        expected[k] = [executor.prefill(PrefillInput(k, v)).logits]
        for pos in range(3, 8):
            expected[k].append(executor.decode(DecodeInput(k, 7, pos)).logits)
        executor.release_cache(k)

    results: dict[str, list[np.ndarray]] = {}

    def run(k: str) -> None:
        got = [executor.prefill(PrefillInput(k, prompts[k])).logits]
        for pos in range(3, 8):
            got.append(executor.decode(DecodeInput(k, 7, pos)).logits)
        results[k] = got

    threads = [threading.Thread(target=run, args=(k,)) for k in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in prompts:
        np.testing.assert_allclose(np.stack(results[k]), np.stack(expected[k]), atol=TOL)
    wait = executor.status().lock_wait
    assert wait.acquisitions >= 2 * 4 * 6 and wait.max_ms >= 0


def test_bad_input_changes_nothing(executor):
    executor.prefill(PrefillInput("x", [5, 6, 7]))
    before = executor.status()
    vocab = executor.model.config.vocab_size
    bad_calls = [
        (InvalidRequestError, lambda: executor.prefill(PrefillInput("x", [1]))),  # id in use
        (InvalidRequestError, lambda: executor.prefill(PrefillInput("y", []))),
        (InvalidRequestError, lambda: executor.prefill(PrefillInput("y", [vocab]))),
        (UnknownSequenceError, lambda: executor.decode(DecodeInput("nope", 1, 0))),
        (PositionMismatchError, lambda: executor.decode(DecodeInput("x", 1, 7))),
        (UnknownSequenceError, lambda: executor.release_cache("nope")),
        (InvalidRequestError, lambda: executor.truncate_kv("x", 9)),
        # one bad item spoils the batch before anything runs
        (UnknownSequenceError, lambda: executor.batch_decode([DecodeInput("x", 1, 3), DecodeInput("zz", 1, 0)])),
    ]
    for error, call in bad_calls:
        with pytest.raises(error):
            call()
    after = executor.status()
    assert after.kv_blocks_used == before.kv_blocks_used
    assert after.active_sequences == before.active_sequences == 1
    assert executor.model.kv.length("x") == 3


def test_warmup_leaves_no_sequence_and_shutdown_refuses_calls(executor):
    executor.warmup()
    assert executor.status().active_sequences == 0
    executor.prefill(PrefillInput("w", [1, 2]))
    executor.shutdown()
    assert executor.status().state.value == "shut_down"
    assert executor.status().kv_blocks_used == 0
    with pytest.raises(ExecutorStateError):
        executor.prefill(PrefillInput("w2", [1, 2]))
