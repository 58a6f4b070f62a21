"""The paged KV pool. JAX arrays are immutable, so ``kv_write`` returns new arrays, and the pool
donates the old ones to it: XLA then scatters into the same buffer instead of copying the pool."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ferrum import hookimpl

from ferrum_jax.arrays import DEVICE, dtype_of


class KVPool:
    """Per layer a K and a V array ``[num_blocks * block_size, kv_heads, head_dim]``: the contract's
    ``[num_blocks, block_size, ...]`` layout, flattened so a slot indexes a row.

    ``kv_write`` rebinds ``k[layer]`` / ``v[layer]``; any other reference to the old arrays is
    invalid afterwards (JAX raises on use of a donated buffer).
    """

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype):
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.block_size, self.num_slots = block_size, num_blocks * block_size
        # committed to the device, as the scatter's results are: an uncommitted first pool would compile
        # ``_scatter`` once more at the second write of each layer (the first timed step of a bench)
        self.k = [jax.device_put(jnp.zeros(shape, dtype), DEVICE) for _ in range(num_layers)]
        self.v = [jax.device_put(jnp.zeros(shape, dtype), DEVICE) for _ in range(num_layers)]


@hookimpl
def kv_alloc(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype):
    return KVPool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype_of(dtype))


@partial(jax.jit, donate_argnums=(0, 1))
def _scatter(k_pool, v_pool, k, v, slots):
    # mode="drop": a slot >= num_slots is skipped (a padding slot); negative slots would wrap.
    return (k_pool.at[slots].set(k.astype(k_pool.dtype), mode="drop"),
            v_pool.at[slots].set(v.astype(v_pool.dtype), mode="drop"))


@hookimpl
def kv_write(pool, layer, k, v, slot_mapping):
    pool.k[layer], pool.v[layer] = _scatter(pool.k[layer], pool.v[layer], k, v, slot_mapping)


def slots_of(block_ids: np.ndarray, length: int, block_size: int) -> np.ndarray:
    """The pool rows holding positions ``0 .. length - 1`` of a sequence with these blocks."""
    pos = np.arange(length)
    return (np.asarray(block_ids, dtype=np.int64)[pos // block_size] * block_size + pos % block_size).astype(np.int32)


@hookimpl
def kv_gather(pool, layer, block_ids, length):
    slots = jnp.asarray(slots_of(block_ids, length, pool.block_size))
    return jnp.take(pool.k[layer], slots, axis=0), jnp.take(pool.v[layer], slots, axis=0)
