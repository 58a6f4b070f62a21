"""The core's reference form of a quantized weight, for backends without native quantized ops.

The packed matrix stays on the host; each use dequantizes it into a float32
buffer shared by every matrix of the same shape, hands that to the backend's
``upload_weight`` and runs the dense ``linear``. Memory stays at the packed
size plus one buffer per distinct shape; speed is the backend's dense speed
plus a dequantization per matrix per forward pass.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ferrum.quant.affine import QuantizedWeight, dequantize

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
