"""The core's reference form of a quantized weight, for backends without native quantized ops.

While the dense matrices fit (:data:`DENSE_SHARE` of the backend's memory by default, counted
over every matrix dequantized so far on that device), a packed matrix is
dequantized once at load into the backend's dense form and runs on its ``linear``
and ``embedding``: memory at the float size, speed the backend's dense speed.
Past that budget a matrix stays packed on the host and each use dequantizes it into
a float32 buffer shared by every matrix of the same shape: memory at the packed
size plus one buffer per shape, and a dequantization per matrix per forward pass
(the embedded 4-bit SmolLM2-135M decoded 0.7 tokens/s so on the numpy backend here).
Both forms compute from the same float32 values, so they give the same numbers.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import weakref
from typing import Any

import numpy as np

from ferrum.errors import ConfigError
from ferrum.hookspec import DTYPE_BYTES
from ferrum.quant.affine import QuantizedWeight, dequantize

#: Share of a backend's memory (``BackendInfo.memory_bytes``) that matrices dequantized at load may
#: take together; a backend that does not report its memory keeps every matrix packed. The environment
#: variable ``FERRUM_DEQUANTIZED_SHARE`` overrides it (0 keeps every matrix packed).
DENSE_SHARE = 0.5
_SHARE_VARIABLE = "FERRUM_DEQUANTIZED_SHARE"


def _dense_share() -> float:
    raw = os.environ.get(_SHARE_VARIABLE)
    if raw is None:
        return DENSE_SHARE
    try:
        share = float(raw)
    except ValueError:
        share = math.nan
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"{_SHARE_VARIABLE}={raw!r}: give a share of the backend's memory between 0 and 1 "
                          "(0 keeps quantized matrices packed)")
    return share

_buffers: dict[tuple[int, int], np.ndarray] = {}
_buffers_lock = threading.Lock()


def _buffer(shape: tuple[int, int]) -> np.ndarray:
    """One float32 scratch matrix per shape, reused by every weight of that shape."""
    with _buffers_lock:
        buf = _buffers.get(shape)
        if buf is None:
            buf = _buffers[shape] = np.empty(shape, dtype=np.float32)
        return buf


class HostQuantized:
    """A packed weight kept on the host, dequantized on use."""

    __slots__ = ("name", "weight", "dtype")

    def __init__(self, name: str, weight: QuantizedWeight, dtype: str):
        self.name, self.weight, self.dtype = name, weight, dtype

    def dense(self, ops: Any) -> Any:
        """The whole matrix in ``upload_weight``'s form, through the shared buffer.

        Backends copy what ``upload_weight`` receives or use it before the next
        call (every built-in one does), so the buffer can be refilled at once.
        """
        buf = dequantize(self.weight, out=_buffer(self.weight.shape))
        return ops.upload_weight(self.name, buf, self.dtype)

    def rows(self, ops: Any, ids: Any) -> Any:
        rows = np.asarray(ops.to_numpy(ids), dtype=np.int64)
        return ops.from_numpy(dequantize(self.weight.take_rows(rows)), self.dtype)


class Dequantized:
    """A packed weight dequantized at load, held in the backend's dense form."""

    __slots__ = ("matrix", "nbytes", "__weakref__")

    def __init__(self, matrix: Any, nbytes: int):
        self.matrix, self.nbytes = matrix, nbytes

    def dense(self, ops: Any) -> Any:
        return self.matrix

    def rows(self, ops: Any, ids: Any) -> Any:
        return ops.embedding(self.matrix, ids)


class _DenseBudget:
    """Bytes of dequantized matrices held on each device; a matrix's bytes return when it is freed."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        #: (device, bytes) of freed matrices, settled under the lock by the next claim.
        self._returned: collections.deque[tuple[str, int]] = collections.deque()

    def claim(self, device: str, memory_bytes: int | None, nbytes: int) -> bool:
        share = _dense_share()
        with self._lock:
            while self._returned:
                freed, size = self._returned.popleft()
                self._held[freed] -= size
            held = self._held.get(device, 0)
            if memory_bytes is None or held + nbytes > share * memory_bytes:
                return False
            self._held[device] = held + nbytes
            return True

    def release(self, device: str, nbytes: int) -> None:
        """Queue the bytes back, without the lock: a freed matrix's finalizer runs wherever the garbage
        collector does, inside :meth:`claim` too (taking the lock there deadlocked a load)."""
        self._returned.append((device, nbytes))


_budget = _DenseBudget()


def upload(ops: Any, name: str, weight: QuantizedWeight, dtype: str) -> HostQuantized | Dequantized:
    """``weight`` dequantized into ``upload_weight``'s form if it fits the device's budget, else kept packed."""
    device, nbytes = ops.info.device, math.prod(weight.shape) * DTYPE_BYTES.get(dtype, 4)
    if not _budget.claim(device, ops.info.memory_bytes, nbytes):
        return HostQuantized(name, weight, dtype)
    try:
        placed = Dequantized(ops.upload_weight(name, dequantize(weight), dtype), nbytes)
    except BaseException:
        _budget.release(device, nbytes)
        raise
    weakref.finalize(placed, _budget.release, device, nbytes)
    return placed
