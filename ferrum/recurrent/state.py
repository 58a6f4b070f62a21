"""Per-sequence recurrent states on the backend, committed only when a whole forward pass succeeds.

A state is never written in place: a pass gathers its batch's states (one ``take_rows`` per layer and state),
the mixer returns new ones ``[B, ...]``, and the store keeps, for each sequence, a reference to its row of that
result. A decode batch that steps the same sequences again finds them already in order and gathers nothing; no
step reads a state back to the host.
"""

from __future__ import annotations

from typing import Any, Container, Hashable, Sequence

import numpy as np

#: A layer's states: one ``(shape without the batch axis, dtype)`` per array (conv window, recurrent matrix...).
StateShapes = tuple[tuple[tuple[int, ...], str], ...]


class RecurrentStates:
    """The states of every sequence for the layers that carry one; zeros for a sequence not seen yet."""

    def __init__(self, ops: Any, layers: dict[int, StateShapes]):
        self.ops = ops
        self.layers = layers
        #: (layer, part) -> a zero state ``[1, ...]``, the start of every new sequence
        self._zeros = {(layer, i): ops.from_numpy(np.zeros((1, *shape), dtype=np.float32), dtype)
                       for layer, parts in layers.items() for i, (shape, dtype) in enumerate(parts)}
        #: seq id -> layer -> (the arrays holding its states, its row in them)
        self._rows: dict[Hashable, dict[int, tuple[tuple[Any, ...], int]]] = {}
        self._pending: dict[Hashable, dict[int, tuple[tuple[Any, ...], int]]] = {}

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._rows

    def gather(self, layer: int, seq_ids: Sequence[Hashable]) -> tuple[Any, ...]:
        """Layer ``layer``'s states of ``seq_ids`` stacked ``[B, ...]`` in that order (zeros for new ones)."""
        refs = [self._rows.get(s, {}).get(layer) for s in seq_ids]
        first = refs[0]
        if first is not None and self._rows_of(first[0]) == len(refs) and all(
                r is not None and r[0] is first[0] and r[1] == i for i, r in enumerate(refs)):
            return first[0]  # the same batch as the pass that made them, in the same order
        sources: dict[int, tuple[int, tuple[Any, ...]]] = {}  # id of the arrays -> (first row in the concat, them)
        offset, picks = 0, []
        for ref in refs:
            arrays, row = ref if ref is not None else (None, 0)
            key = id(arrays)
            if key not in sources:
                held = arrays if arrays is not None else tuple(self._zeros[(layer, i)]
                                                                for i in range(len(self.layers[layer])))
                sources[key] = (offset, held)
                offset += self._rows_of(held)
            picks.append(sources[key][0] + row)
        index = self.ops.from_numpy(np.asarray(picks, dtype=np.int32), None)
        parts = [held for _, held in sources.values()]
        return tuple(self.ops.take_rows(self.ops.concat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i],
                                        index) for i in range(len(parts[0])))

    @staticmethod
    def _rows_of(arrays: tuple[Any, ...]) -> int:
        """How many sequences' states ``arrays`` hold (the batch axis, read from the shape, never the data)."""
        return int(arrays[0].shape[0])

    def stage(self, layer: int, seq_ids: Sequence[Hashable], states: tuple[Any, ...]) -> None:
        """The new states ``[B, ...]`` of ``seq_ids`` at ``layer``, kept aside until :meth:`commit`."""
        for row, seq_id in enumerate(seq_ids):
            self._pending.setdefault(seq_id, {})[layer] = (states, row)

    def commit(self) -> None:
        """Make the staged states the sequences' own (the pass succeeded)."""
        for seq_id, layers in self._pending.items():
            self._rows.setdefault(seq_id, {}).update(layers)
        self._pending.clear()

    def discard(self) -> None:
        """Forget the staged states (the pass failed): every sequence keeps the state it had before it."""
        self._pending.clear()

    def row(self, seq_id: Hashable) -> dict[int, tuple[Any, ...]]:
        """``seq_id``'s committed states, layer by layer, each ``[1, ...]``: its row copied out where the arrays
        hold other sequences' too (a snapshot of one sequence must not pin a whole batch's arrays)."""
        out, index = {}, None
        for layer, (arrays, row) in self._rows[seq_id].items():
            if self._rows_of(arrays) == 1:
                out[layer] = arrays
                continue
            if index is None or index[0] != row:
                index = (row, self.ops.from_numpy(np.asarray([row], dtype=np.int32), None))
            out[layer] = tuple(self.ops.take_rows(a, index[1]) for a in arrays)
        return out

    def seed(self, seq_id: Hashable, layers: dict[int, tuple[Any, ...]]) -> None:
        """Start ``seq_id`` from ``layers`` (as :meth:`row` gives them) instead of zeros."""
        self._rows[seq_id] = {layer: (arrays, 0) for layer, arrays in layers.items()}

    def prune(self, alive: Container[Hashable]) -> None:
        """Forget the sequences not in ``alive`` (the KV manager's: one it released, the engine's scheduler
        preempting or finishing it, has no state either, so its id starts from zeros when it comes back)."""
        for seq_id in [s for s in self._rows if s not in alive]:
            del self._rows[seq_id]

    def release(self, seq_id: Hashable) -> None:
        self._rows.pop(seq_id, None)

    def reset(self) -> None:
        self._rows.clear()
        self._pending.clear()
