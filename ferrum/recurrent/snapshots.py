"""Recurrent states kept at block boundaries, so a hybrid model's prompts can reuse a cached prefix.

A prefix match gives a sequence the K/V of cached blocks, which is all an attention layer needs; a recurrent layer
needs its state at the match's end, which no block holds. So the states at some block boundaries are kept, each
under the key of the block that ends there (:func:`ferrum.paged_kv.chain_hash`: the tokens so far and the salt), and
a match is cut back to its last block with a kept state; the adopting sequence starts its recurrent layers from it.

Which boundaries: where a pass that feeds a sequence several tokens (a prompt's chunk) ends on one, kept at once (the
scheduler ends chunks at the last two boundaries before a prompt's end, where a chat's next turn, which re-renders
the earlier ones, most often stops matching); and the last boundary a sequence crossed while decoding, kept when its
blocks are released into the cache (its reply, if the next turn repeats it). States are immutable arrays, so a
snapshot is a reference, a one-row copy where the array holds a whole batch. Snapshots die with their blocks' keys
(eviction) and, past a byte budget of their own (which the states held for running sequences count against too),
least recently used first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Hashable, Sequence

from ferrum.errors import InvalidRequestError
from ferrum.hookspec import DTYPE_BYTES
from ferrum.paged_kv import PagedKVManager, PrefixMatch, SequenceBlocks
from ferrum.recurrent.state import RecurrentStates

#: Default byte budget of the kept states (``EngineConfig.prefix_state_bytes``): about twenty of Qwen3.5-9B's.
DEFAULT_BUDGET = 1 << 30

Snapshot = dict[int, tuple[Any, ...]]  # layer -> its states, each [1, ...]


class StateSnapshots:
    """The recurrent states of cached prefixes, by block key, within ``budget`` bytes; the KV manager's listener."""

    def __init__(self, states: RecurrentStates, kv: PagedKVManager, budget: int = 0):
        """``budget`` 0 keeps nothing (the model alone reuses no prefix); the engine sets its configured one."""
        self.states, self.kv, self.budget = states, kv, budget
        #: Bytes of one sequence's states (every recurrent layer's arrays, one row).
        self.state_bytes = sum(math.prod(shape) * DTYPE_BYTES.get(dtype, 4)
                               for parts in states.layers.values() for shape, dtype in parts)
        self._kept: OrderedDict[bytes, Snapshot] = OrderedDict()  # least recently used first
        self._latest: dict[Hashable, tuple[int, Snapshot]] = {}  # seq id -> (boundary, its states)
        kv.listener = self

    @property
    def count(self) -> int:
        return len(self._kept)

    @property
    def nbytes(self) -> int:
        """Bytes the kept snapshots hold (the budget's count)."""
        return len(self._kept) * self.state_bytes

    @property
    def pending_bytes(self) -> int:
        """Bytes held for running sequences' last decoded boundary, until they are released (within the budget with
        the kept ones: a sequence crossing a boundary holds none once the two would pass it)."""
        return len(self._latest) * self.state_bytes

    # ---- after a pass --------------------------------------------------------
    def after_pass(self, items: Sequence[Any]) -> None:
        """Keep the states of the sequences a committed pass left on a block boundary (see the module docstring)."""
        if self.budget < self.state_bytes:
            return
        bs = self.kv.block_size
        for item in items:
            end = item.pos_offset + len(item.q_tokens)
            if end % bs:
                continue
            key = self.kv.block_key(item.seq_id, end // bs - 1)
            if (len(item.q_tokens) > 1 or not item.is_final_chunk) and key is not None:
                self._latest.pop(item.seq_id, None)
                self._keep(key, self.states.row(item.seq_id))
            elif item.seq_id in self._latest or self.nbytes + self.pending_bytes + self.state_bytes <= self.budget:
                # held for its release; within the budget, which counts these too (they are device memory)
                self._latest[item.seq_id] = (end, self.states.row(item.seq_id))

    def _keep(self, key: bytes, snapshot: Snapshot) -> None:
        if not self.kv.is_cached(key):  # a key no block holds is never matched, nor evicted with it
            return
        if key in self._kept:
            self._kept.move_to_end(key)
            return
        self._kept[key] = snapshot
        while self._kept and self.nbytes + self.pending_bytes > self.budget:
            self._kept.popitem(last=False)

    # ---- the KV manager's listener ---------------------------------------------------
    def usable(self, match: PrefixMatch) -> PrefixMatch:
        """``match`` up to its last block whose state is kept (nothing if none is)."""
        bs = match.num_tokens // len(match.blocks)
        for n in range(len(match.hashes), 0, -1):
            if match.hashes[n - 1] in self._kept:
                return PrefixMatch(match.blocks[:n], match.hashes[:n], n * bs)
        return PrefixMatch((), (), 0)

    def adopted(self, seq_id: Hashable, match: PrefixMatch) -> None:
        """``seq_id`` starts on ``match``: its recurrent layers start from the state kept at its end."""
        key = match.hashes[-1]
        if key not in self._kept:
            raise InvalidRequestError("stale prefix match: the recurrent state at its end was dropped; match again")
        self._kept.move_to_end(key)
        self.states.seed(seq_id, self._kept[key])

    def released(self, seq_id: Hashable, seq: SequenceBlocks) -> None:
        """Keep the state at the last boundary ``seq_id`` decoded past, now its blocks go to the cache, and drop its
        live states (the scheduler releases a finished or preempted sequence's KV alone; they would pin their
        batch's arrays until a later pass pruned them)."""
        self.states.release(seq_id)
        latest = self._latest.pop(seq_id, None)
        if latest is not None:
            end, snapshot = latest
            index = end // self.kv.block_size - 1
            if index < len(seq.hashes):
                self._keep(seq.hashes[index], snapshot)

    def evicted(self, key: bytes) -> None:
        self._kept.pop(key, None)

    def reset(self) -> None:
        self._kept.clear()
        self._latest.clear()
