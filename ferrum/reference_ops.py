"""Reference compositions of the optional ops out of the required ones.

Each function takes the ops table first; :class:`ferrum.ops.OpsTable` binds
it when a plugin leaves the op out. They define the semantics a native
implementation must match.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ferrum.quant.reference import HostQuantized
from ferrum.sampling import sample_numpy


def cast(ops: Any, x: Any, dtype: str) -> Any:
    return ops.from_numpy(ops.to_numpy(x), dtype)


def upload_weight(ops: Any, name: str, array: Any, dtype: str) -> Any:
    return ops.from_numpy(np.ascontiguousarray(array, dtype=np.float32), dtype)


def embedding(ops: Any, weight: Any, ids: Any) -> Any:
    return ops.take_rows(weight, ids)


def add_rms_norm(ops: Any, x: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
    summed = ops.add(x, residual)
    return ops.rms_norm(summed, weight, eps), summed


def prepare_attention_batch(ops: Any, batch: Any) -> Any:
    return None


def paged_attention(
    ops: Any, q: Any, pool: Any, layer: int, batch: Any, scale: float, sliding_window: int | None
) -> Any:
    """Item by item: gather the item's KV from its blocks, then dense attention."""
    if batch.num_items == 1:
        k, v = ops.kv_gather(pool, layer, batch.block_ids(0), int(batch.seq_lens[0]))
        return ops.attention(q, k, v, scale, sliding_window)
    outputs = []
    for item in range(batch.num_items):
        start, end = batch.query_range(item)
        k, v = ops.kv_gather(pool, layer, batch.block_ids(item), int(batch.seq_lens[item]))
        rows = ops.from_numpy(np.arange(start, end, dtype=np.int32), None)
        outputs.append(ops.attention(ops.take_rows(q, rows), k, v, scale, sliding_window))
    return ops.concat(outputs)


def sample(ops: Any, logits: Any, batch: Any) -> Any:
    return sample_numpy(ops.to_numpy(logits), batch)


def quantized_upload(ops: Any, name: str, weight: Any, dtype: str, role: str) -> HostQuantized:
    return HostQuantized(name, weight, dtype)


def quantized_linear(ops: Any, x: Any, weight: HostQuantized, bias: Any) -> Any:
    return ops.linear(x, weight.dense(ops), bias)


def quantized_embedding(ops: Any, weight: HostQuantized, ids: Any) -> Any:
    return weight.rows(ops, ids)
