"""Paged KV bookkeeping: which blocks each sequence owns, and where tokens go.

The backend holds the KV arrays (``kv_alloc``); this module only decides
which block and slot every token uses. Growth is planned for a whole batch
before anything changes, so a batch that does not fit raises
:class:`KVCacheExhaustedError` and leaves every sequence exactly as it was.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable

import numpy as np

from ferrum.errors import InvalidRequestError, KVCacheExhaustedError, UnknownSequenceError


@dataclass
class SequenceBlocks:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose K/V are written


@dataclass
class Reservation:
    """Blocks handed out for one batch, so they can be returned if it fails."""

    new_sequences: list[Hashable]
    added_blocks: dict[Hashable, int]  # how many blocks were appended per sequence
    new_lengths: dict[Hashable, int]


class PagedKVManager:
    """Fixed-size blocks, a free list and one block table per sequence."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise InvalidRequestError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._seqs: dict[Hashable, SequenceBlocks] = {}

    # ---- queries -------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def sequences(self) -> list[Hashable]:
        return list(self._seqs)

    def _get(self, seq_id: Hashable) -> SequenceBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequenceError(f"no KV cache for sequence {seq_id!r}; prefill it first") from None

    def length(self, seq_id: Hashable) -> int:
        return self._get(seq_id).length

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._get(seq_id).blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, current_length: int, current_blocks: int, new_tokens: int) -> int:
        total = -(-(current_length + new_tokens) // self.block_size)
        return max(0, total - current_blocks)

    # ---- growth ----------------------------------------------------------
    def reserve(self, growth: Iterable[tuple[Hashable, int]]) -> Reservation:
        """Give each ``(seq_id, new_tokens)`` the blocks it needs, all or nothing.

        Unknown ids are created. Lengths change only on :meth:`commit`.
        """
        growth = list(growth)
        needs: list[tuple[Hashable, int]] = []
        total = 0
        for seq_id, new_tokens in growth:
            seq = self._seqs.get(seq_id)
            length, owned = (seq.length, len(seq.blocks)) if seq else (0, 0)
            n = self.blocks_needed(length, owned, new_tokens)
            needs.append((seq_id, n))
            total += n
        if total > len(self._free):
            raise KVCacheExhaustedError(
                f"batch needs {total} free KV blocks but only {len(self._free)} of {self.num_blocks} are free; "
                "release finished sequences or load the model with more KV blocks"
            )
        reservation = Reservation([], {}, {})
        for (seq_id, new_tokens), (_, n) in zip(growth, needs):
            seq = self._seqs.get(seq_id)
            if seq is None:
                seq = self._seqs[seq_id] = SequenceBlocks()
                reservation.new_sequences.append(seq_id)
            seq.blocks.extend(self._free.popleft() for _ in range(n))
            reservation.added_blocks[seq_id] = n
            reservation.new_lengths[seq_id] = seq.length + new_tokens
        return reservation

    def commit(self, reservation: Reservation) -> None:
        for seq_id, length in reservation.new_lengths.items():
            self._seqs[seq_id].length = length

    def rollback(self, reservation: Reservation) -> None:
        """Return a failed batch's blocks; sequences look as before ``reserve``."""
        for seq_id, n in reservation.added_blocks.items():
            seq = self._seqs[seq_id]
            for _ in range(n):
                self._free.appendleft(seq.blocks.pop())
        for seq_id in reservation.new_sequences:
            del self._seqs[seq_id]

    # ---- slot arithmetic ------------------------------------------------
    def slots(self, seq_id: Hashable, start: int, count: int) -> np.ndarray:
        """KV slots of positions ``start .. start+count-1`` (blocks must be reserved)."""
        blocks = np.asarray(self._get(seq_id).blocks, dtype=np.int64)
        pos = np.arange(start, start + count)
        return (blocks[pos // self.block_size] * self.block_size + pos % self.block_size).astype(np.int32)

    # ---- shrinking -------------------------------------------------------
    def truncate(self, seq_id: Hashable, new_length: int) -> None:
        """Forget tokens from ``new_length`` on, freeing blocks no longer needed."""
        seq = self._get(seq_id)
        if not 0 <= new_length <= seq.length:
            raise InvalidRequestError(
                f"cannot truncate sequence {seq_id!r} of length {seq.length} to {new_length}"
            )
        keep = -(-new_length // self.block_size)
        while len(seq.blocks) > keep:
            self._free.append(seq.blocks.pop())
        seq.length = new_length

    def release(self, seq_id: Hashable) -> None:
        seq = self._get(seq_id)
        self._free.extend(seq.blocks)
        del self._seqs[seq_id]

    def reset(self) -> None:
        self._free = deque(range(self.num_blocks))
        self._seqs.clear()
