"""Tokens a step sampled that the host has not read yet, fed to the next step where they are.

With asynchronous stepping (:mod:`ferrum.engine.engine`) a decode item's input
token is the previous step's pick, still on the backend: a :class:`DeviceToken`
may end a :class:`ferrum.model.ForwardItem`'s ``q_tokens``. The model builds the
step's id vector from host tokens plus rows of those device arrays
(:func:`token_ids`); the KV manager sees such a token as None until the engine
fills it in (:meth:`ferrum.paged_kv.PagedKVManager.fill`), so no block is keyed
for the prefix cache under a token it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class DeviceToken:
    """Row ``row`` of ``ids``, the backend int32 array of ``size`` rows ``sample_on_device`` returned."""

    ids: Any
    row: int
    size: int


def ends_on_device(tokens: Sequence[Any]) -> bool:
    """Whether ``tokens`` ends with a :class:`DeviceToken` (the only place one may be)."""
    return isinstance(tokens[-1], DeviceToken)


def host_view(tokens: Sequence[Any]) -> Sequence[int | None]:
    """``tokens`` as the host knows them: a device token is None."""
    return [*tokens[:-1], None] if ends_on_device(tokens) else tokens


def token_ids(ops: Any, token_lists: Sequence[Sequence[Any]]) -> Any:
    """The backend int32 ids of all ``token_lists`` back to back: host tokens uploaded, device tokens
    gathered from their arrays. Decodes that each feed the previous step's pick in its row order
    (the steady state of asynchronous stepping) are that step's ids array itself."""
    lagged = [tokens[-1] for tokens in token_lists if ends_on_device(tokens)]
    if lagged and len(lagged) == len(token_lists) and all(len(tokens) == 1 for tokens in token_lists):
        first = lagged[0]
        if first.size == len(lagged) and all(t.ids is first.ids and t.row == i for i, t in enumerate(lagged)):
            return first.ids
    host = np.concatenate(  # a device token's place holds 0 here
        [np.asarray([*tokens[:-1], 0] if ends_on_device(tokens) else tokens, dtype=np.int32) for tokens in token_lists]
    )
    if not lagged:
        return ops.from_numpy(host, None)
    # Gather every position from [host tokens, *distinct device arrays] laid end to end.
    offsets: dict[int, int] = {}  # id(ids) -> where its rows start
    arrays = [ops.from_numpy(host, None)]
    end = len(host)
    index = np.arange(len(host), dtype=np.int32)
    position = 0
    for tokens in token_lists:
        position += len(tokens)
        token = tokens[-1]
        if isinstance(token, DeviceToken):
            if id(token.ids) not in offsets:
                offsets[id(token.ids)] = end
                arrays.append(token.ids)
                end += token.size
            index[position - 1] = offsets[id(token.ids)] + token.row
    return ops.take_rows(ops.concat(arrays), ops.from_numpy(index, None))
