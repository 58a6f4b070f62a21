"""What makes the backend fast on JAX: the KV pool is updated in place and a growing decode
compiles its attention once per bucket, not once per step."""

from __future__ import annotations

import numpy as np

import ferrum
from ferrum.random_checkpoint import write_random_checkpoint
from ferrum_jax import attention, kv
from ferrum_jax.buckets import bucket

from test_greedy_matches_cpu import CONFIG


def test_buckets_are_powers_of_two_with_a_floor():
    assert [bucket(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
    assert bucket(3, 8) == 8 and bucket(9, 8) == 16


def test_kv_write_donates_the_pool_buffers():
    pool = kv.kv_alloc(2, 64, 16, 2, 8, "float32")
    before = pool.k[1]
    pointer = before.unsafe_buffer_pointer()
    k = np.ones((3, 2, 8), np.float32)
    kv.kv_write(pool, 1, k, 2 * k, np.array([5, 1023, 1024], np.int32))  # 1024: past the end, dropped
    assert before.is_deleted()  # XLA reused it: no copy of the pool
    assert pool.k[1].unsafe_buffer_pointer() == pointer
    rows = np.asarray(pool.v[1])
    assert rows[5].tolist() == rows[1023].tolist() == (2 * k[0]).tolist()
    assert not np.any(np.delete(rows, [5, 1023], axis=0))
    assert not np.any(np.asarray(pool.k[0]))  # other layers untouched


def test_a_growing_decode_compiles_attention_once_per_block_bucket(tmp_path):
    folder = write_random_checkpoint(tmp_path / "tiny", CONFIG, dtype="float32", std=0.2)
    model = ferrum.load(folder, backend="jax", dtype="float32").model
    compiled = attention._paged._cache_size()
    logits = model.prefill("s", [3, 1, 4])
    steps = 60  # 63 tokens in blocks of 16: 1, 2, 3 then 4 blocks wide
    for pos in range(3, 3 + steps):
        logits = model.decode("s", int(np.argmax(logits)), pos)
    # the prefill, then decode with widths bucketed to 1, 2 and 4 blocks; a layer's window would add more
    assert attention._paged._cache_size() - compiled <= 4 < steps
