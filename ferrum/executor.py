"""``LlmExecutor``: the ``ModelExecutor`` contract over a ``DecoderOnlyLLM``."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Hashable, Iterator, Sequence

import numpy as np

from ferrum.capabilities import ExecutorCapabilities
from ferrum.errors import ExecutorStateError, InvalidRequestError
from ferrum.executor_api import (
    DecodeInput,
    DecodeOutput,
    ExecutorState,
    ExecutorStatus,
    KvCacheHandle,
    LockWaitStats,
    ModelExecutor,
    PrefillInput,
    PrefillOutput,
    UnifiedBatch,
    UnifiedBatchItem,
    UnifiedBatchOutput,
)
from ferrum.metadata import check_metadata, require_full_logits
from ferrum.model import DecoderOnlyLLM, ForwardItem, ForwardOutput


def _with_metadata_flags(item: ForwardItem) -> ForwardItem:
    """Check the item's metadata and turn the ``ferrum_*`` keys the model acts on into its flags."""
    if not item.metadata:
        return item
    metadata = check_metadata(item.metadata)
    if require_full_logits(metadata) and not item.full_logits:
        return replace(item, full_logits=True)
    return item


class _Timings:
    """Call counts and cumulative milliseconds of prefill and decode passes."""

    def __init__(self) -> None:
        self.calls = {"prefill": 0, "decode": 0}
        self.tokens = {"prefill": 0, "decode": 0}
        self.ms = {"prefill": 0.0, "decode": 0.0}

    def record(self, kind: str, tokens: int, ms: float) -> None:
        self.calls[kind] += 1
        self.tokens[kind] += tokens
        self.ms[kind] += ms

    def avg_ms(self, kind: str) -> float:
        return self.ms[kind] / self.calls[kind] if self.calls[kind] else 0.0


class LlmExecutor(ModelExecutor):
    """Serialises access to one model; every call is one unified forward pass.

    Calls are thread-safe: a lock guards the model and its KV cache, and the
    time spent waiting for it is reported in :meth:`status`.
    """

    def __init__(self, model: DecoderOnlyLLM):
        self.model = model
        self._lock = threading.Lock()
        self._state = ExecutorState.READY
        self._timings = _Timings()
        self._lock_waits = 0
        self._lock_wait_ms = 0.0
        self._lock_wait_max_ms = 0.0
        self._capabilities = ExecutorCapabilities.from_backend(model.backend, model)

    # ------------------------------------------------------------ plumbing
    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        if self._state is ExecutorState.SHUT_DOWN:
            raise ExecutorStateError("this executor was shut down; load the model again")
        start = time.perf_counter()
        with self._lock:
            waited = (time.perf_counter() - start) * 1e3
            self._lock_waits += 1
            self._lock_wait_ms += waited
            self._lock_wait_max_ms = max(self._lock_wait_max_ms, waited)
            if self._state is ExecutorState.SHUT_DOWN:
                raise ExecutorStateError("this executor was shut down; load the model again")
            self._state = ExecutorState.BUSY
            try:
                yield
            finally:
                if self._state is ExecutorState.BUSY:
                    self._state = ExecutorState.READY

    def _handle(self, cache_id: Hashable) -> KvCacheHandle:
        kv = self.model.kv
        return KvCacheHandle(cache_id, tuple(kv.block_table(cache_id)), kv.length(cache_id))

    def _is_decode(self, items: Sequence[UnifiedBatchItem]) -> bool:
        return all(len(it.q_tokens) == 1 and it.pos_offset > 0 for it in items)

    def run(
        self, batch: UnifiedBatch, to_host: bool = True
    ) -> tuple[ForwardOutput, dict[Hashable, KvCacheHandle]]:
        """One timed forward pass under the lock.

        With ``to_host=False`` logits stay on the backend (for on-device
        sampling); the timing then covers only what the backend ran eagerly.
        """
        items = tuple(_with_metadata_flags(it) for it in batch.items)
        with self._exclusive():
            start = time.perf_counter()
            out = self.model.forward(items, all_logits=batch.require_full_logits)
            if to_host and out.logits is not None:
                out = ForwardOutput(self.model.backend.ops.to_numpy(out.logits), out.rows)
            kind = "decode" if self._is_decode(items) else "prefill"
            ms = (time.perf_counter() - start) * 1e3
            self._timings.record(kind, sum(len(it.q_tokens) for it in items), ms)
            handles = {it.seq_id: self._handle(it.seq_id) for it in items}
        return out, handles

    # ------------------------------------------------------------- contract
    def unified_decode(self, batch: UnifiedBatch) -> UnifiedBatchOutput:
        out, handles = self.run(batch)
        full = {it.seq_id for it in batch.items
                if batch.require_full_logits or it.full_logits or require_full_logits(it.metadata)}
        logits: dict[Hashable, np.ndarray] = {}
        for seq_id, (start, count) in out.rows.items():
            logits[seq_id] = out.logits[start : start + count] if seq_id in full else out.logits[start]
        return UnifiedBatchOutput(logits, handles)

    def prefill(self, request: PrefillInput) -> PrefillOutput:
        return self.batch_prefill([request])[0]

    def batch_prefill(self, requests: Sequence[PrefillInput]) -> list[PrefillOutput]:
        """All prompts in one forward pass."""
        for r in requests:
            if r.cache_id in self.model.kv:
                raise InvalidRequestError(
                    f"sequence {r.cache_id!r} already has a KV cache; release it before prefilling again"
                )
        items = tuple(UnifiedBatchItem(r.cache_id, r.tokens, 0, True, metadata=r.metadata) for r in requests)
        out = self.unified_decode(UnifiedBatch(items))
        return [PrefillOutput(out.handles[r.cache_id], out.logits[r.cache_id]) for r in requests]

    def decode(self, step: DecodeInput) -> DecodeOutput:
        return self.batch_decode([step])[0]

    def batch_decode(self, steps: Sequence[DecodeInput]) -> list[DecodeOutput]:
        for s in steps:
            self.model.kv.length(s.cache_id)  # unknown id -> UnknownSequenceError, nothing changed
        items = tuple(UnifiedBatchItem(s.cache_id, [s.token], s.position, True, metadata=s.metadata) for s in steps)
        out = self.unified_decode(UnifiedBatch(items))
        return [DecodeOutput(out.handles[s.cache_id], out.logits[s.cache_id]) for s in steps]

    def forward_verify(self, cache_id: Hashable, tokens: Sequence[int]) -> np.ndarray:
        """Append draft ``tokens``; logits ``[len(tokens), vocab]``, one per token."""
        start = self.model.kv.length(cache_id)
        item = UnifiedBatchItem(cache_id, tokens, start, True)
        return self.unified_decode(UnifiedBatch((item,), require_full_logits=True)).logits[cache_id]

    def truncate_kv(self, cache_id: Hashable, new_len: int) -> KvCacheHandle:
        with self._exclusive():
            self.model.truncate_kv(cache_id, new_len)
            return self._handle(cache_id)

    def release_cache(self, cache_id: Hashable) -> None:
        with self._exclusive():
            self.model.release(cache_id)

    def capabilities(self) -> ExecutorCapabilities:
        return self._capabilities

    def status(self) -> ExecutorStatus:
        model, kv, t = self.model, self.model.kv, self._timings
        per_block = model.kv_bytes() // kv.num_blocks
        snapshots = model.snapshots
        kept, kept_bytes, pending = (0, 0, 0) if snapshots is None else (
            snapshots.count, snapshots.nbytes, snapshots.pending_bytes)
        return ExecutorStatus(
            state=self._state,
            backend=model.backend.name,
            device=model.backend.info.device,
            dtype=model.dtype,
            active_sequences=len(kv.sequences()),
            prefill_calls=t.calls["prefill"],
            decode_calls=t.calls["decode"],
            prefill_tokens=t.tokens["prefill"],
            decode_tokens=t.tokens["decode"],
            avg_prefill_ms=t.avg_ms("prefill"),
            avg_decode_ms=t.avg_ms("decode"),
            kv_blocks_total=kv.num_blocks,
            kv_blocks_used=kv.num_used_blocks,
            kv_block_size=kv.block_size,
            memory_in_use_bytes=model.weight_bytes + kv.num_used_blocks * per_block + kept_bytes + pending,
            lock_wait=LockWaitStats(self._lock_waits, self._lock_wait_ms, self._lock_wait_max_ms),
            state_snapshots=kept,
            state_snapshot_bytes=kept_bytes,
            state_snapshot_pending_bytes=pending,
        )

    def warmup(self) -> None:
        """One tiny prefill + decode so first-request latency excludes kernel set-up."""
        warm_id = ("__ferrum_warmup__", id(self))
        self.prefill(PrefillInput(warm_id, [0, 0]))
        try:
            self.decode(DecodeInput(warm_id, 0, 2))
        finally:
            self.release_cache(warm_id)

    def shutdown(self) -> None:
        """Free every sequence and refuse further calls."""
        with self._exclusive():
            self.model.reset()
            self._state = ExecutorState.SHUT_DOWN
