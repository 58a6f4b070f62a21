"""The ``ModelExecutor`` contract and its input/output records.

An executor owns one model and its KV cache and serialises access to it. The
engine above it speaks only these types, so another executor (a remote one,
a different model family) can stand in.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from ferrum.capabilities import ExecutorCapabilities
from ferrum.model import ForwardItem

#: One slice of one sequence in a mixed batch: (seq_id, q_tokens, pos_offset, is_final_chunk),
#: plus ``full_logits`` and the request's ``metadata`` (``ferrum_require_full_logits`` sets ``full_logits``).
UnifiedBatchItem = ForwardItem


@dataclass(frozen=True)
class KvCacheHandle:
    """Where a sequence's KV lives: its block table and how many tokens are cached."""

    cache_id: Hashable
    block_table: tuple[int, ...]
    seq_len: int


@dataclass(frozen=True)
class PrefillInput:
    cache_id: Hashable
    tokens: Sequence[int]
    metadata: Mapping[str, Any] = field(default_factory=dict)  # see ferrum.metadata


@dataclass(frozen=True)
class PrefillOutput:
    handle: KvCacheHandle
    logits: np.ndarray  # [vocab], last prompt position


@dataclass(frozen=True)
class DecodeInput:
    cache_id: Hashable
    token: int
    position: int  # must equal the sequence's cached length
    metadata: Mapping[str, Any] = field(default_factory=dict)  # see ferrum.metadata


@dataclass(frozen=True)
class DecodeOutput:
    handle: KvCacheHandle
    logits: np.ndarray  # [vocab]


@dataclass(frozen=True)
class UnifiedBatch:
    items: tuple[UnifiedBatchItem, ...]
    #: Logits for every query position of every item instead of the last
    #: position of final chunks (speculative verification, scoring).
    require_full_logits: bool = False


@dataclass(frozen=True)
class UnifiedBatchOutput:
    #: seq_id -> ``[vocab]`` for final chunks, or ``[q_len, vocab]`` with full logits
    #: (the batch's ``require_full_logits``, or the item's own ``full_logits``).
    logits: dict[Hashable, np.ndarray]
    handles: dict[Hashable, KvCacheHandle]


class ExecutorState(str, enum.Enum):
    READY = "ready"
    BUSY = "busy"
    SHUT_DOWN = "shut_down"


@dataclass(frozen=True)
class LockWaitStats:
    """How long callers waited for the model lock (contention between threads)."""

    acquisitions: int
    total_ms: float
    max_ms: float

    @property
    def avg_ms(self) -> float:
        return self.total_ms / self.acquisitions if self.acquisitions else 0.0


@dataclass(frozen=True)
class ExecutorStatus:
    state: ExecutorState
    backend: str
    device: str
    dtype: str
    active_sequences: int
    prefill_calls: int
    decode_calls: int
    prefill_tokens: int
    decode_tokens: int
    avg_prefill_ms: float
    avg_decode_ms: float
    kv_blocks_total: int
    kv_blocks_used: int
    kv_block_size: int
    memory_in_use_bytes: int  # weights + KV blocks in use + recurrent states kept for the prefix cache
    lock_wait: LockWaitStats = field(default_factory=lambda: LockWaitStats(0, 0.0, 0.0))
    #: Hybrid models: recurrent states the prefix cache keeps at block boundaries, and their bytes (within
    #: ``EngineConfig.prefix_state_bytes``); plus those held for running sequences until they are released.
    state_snapshots: int = 0
    state_snapshot_bytes: int = 0
    state_snapshot_pending_bytes: int = 0


class ModelExecutor(abc.ABC):
    """Runs forward passes of one model over its own KV cache."""

    @abc.abstractmethod
    def prefill(self, request: PrefillInput) -> PrefillOutput: ...

    @abc.abstractmethod
    def batch_prefill(self, requests: Sequence[PrefillInput]) -> list[PrefillOutput]: ...

    @abc.abstractmethod
    def decode(self, step: DecodeInput) -> DecodeOutput: ...

    @abc.abstractmethod
    def batch_decode(self, steps: Sequence[DecodeInput]) -> list[DecodeOutput]: ...

    @abc.abstractmethod
    def unified_decode(self, batch: UnifiedBatch) -> UnifiedBatchOutput: ...

    @abc.abstractmethod
    def forward_verify(self, cache_id: Hashable, tokens: Sequence[int]) -> np.ndarray: ...

    @abc.abstractmethod
    def truncate_kv(self, cache_id: Hashable, new_len: int) -> KvCacheHandle: ...

    @abc.abstractmethod
    def release_cache(self, cache_id: Hashable) -> None: ...

    @abc.abstractmethod
    def capabilities(self) -> ExecutorCapabilities: ...

    @abc.abstractmethod
    def status(self) -> ExecutorStatus: ...

    @abc.abstractmethod
    def warmup(self) -> None: ...

    @abc.abstractmethod
    def shutdown(self) -> None: ...
