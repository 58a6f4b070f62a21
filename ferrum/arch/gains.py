"""Talkie's learned scalars (``Architecture.gains``, ``embed_skip``, ``head_gain``).

They are stored beside the modules they scale, one number each (a query head's gain one per head), and read once at
load into what the blocks already apply: the residual scales of attention's and the MLP's outputs, an "each_head" q
norm weight, the final norm's weight (the logits are linear in it). Only the embedding skip adds work to a pass: one
scaled add per block.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: A layer's gains under Ferrum's names (relative to the layer): attention's output, the MLP's, the embedding skip's
#: and the query heads' (``self_attn.head_gain``: not ``q_...``, which the load would take for q's rows).
ATTN, MLP, SKIP, HEADS = "attn_gain", "mlp_gain", "embed_skip", "self_attn.head_gain"


def layer_tensors(arch: Any, heads: int) -> dict[str, tuple[int, ...]]:
    """A layer's stored gains and their shapes, by Ferrum's names."""
    out: dict[str, tuple[int, ...]] = {}
    if arch.gains:
        out.update({ATTN: (1,), MLP: (1,), HEADS: (heads,)})
    if arch.embed_skip:
        out[SKIP] = (1,)
    return out


def is_gain(arch: Any, name: str) -> bool:
    """Whether placed tensor ``name`` is a gain (placed as it is, never laid out for products)."""
    return name == arch.head_gain or name.endswith(tuple(f".{gain}" for gain in (ATTN, MLP, SKIP, HEADS)))


def values(ops: Any, tensor: Any) -> np.ndarray:
    """A placed gain's numbers on the host, float32."""
    return np.asarray(ops.to_numpy(tensor), dtype=np.float32).reshape(-1)


def number(ops: Any, tensor: Any) -> float:
    """A placed one-number gain."""
    return float(values(ops, tensor)[0])
