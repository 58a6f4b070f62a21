"""What makes the backend fast on JAX: the KV pool is updated in place and a growing decode
compiles its attention once per bucket, not once per step."""

from __future__ import annotations

import logging

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


def test_the_pool_is_written_by_one_compiled_scatter_from_the_first_write_on(caplog):
    """The pool starts committed to the device, as each write leaves it: an uncommitted first pool made the
    second write compile the scatter again (a bench's first timed step paid for it after its warm-up)."""
    import jax

    from ferrum_jax.arrays import DEVICE

    pool = kv.kv_alloc(1, 7, 16, 3, 10, "float32")  # shapes no other test writes, so nothing is compiled yet
    k = jax.device_put(np.ones((5, 3, 10), np.float32), DEVICE)  # as the model's projections hand them over
    slots = jax.device_put(np.array([1, 2, 3, 4, 5], np.int32), DEVICE)
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        for scale in (1, 2, 3):
            kv.kv_write(pool, 0, scale * k, k, slots)
    assert sum("Compiling jit(_scatter)" in r.getMessage() for r in caplog.records) == 1


def test_decodes_beside_a_long_chunk_are_not_padded_to_it():
    """The core's attention calls: 24 one-token decodes over 40 keys each and a 1,000-token prompt are two calls,
    the decodes' one query and 3 blocks wide (one padded call made every decode 1,024 queries by 64 blocks:
    60 decodes beside a 1,900-token prompt took 12.8 GB and 30 s a step)."""
    from ferrum.attention import AttentionBatch

    bs, decodes, prompt = 16, 24, 1000
    q_lens = np.array([1] * decodes + [prompt])
    seq_lens = np.array([40] * decodes + [prompt], dtype=np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    tables = np.zeros((decodes + 1, -(-prompt // bs)), dtype=np.int32)
    tables[:decodes, :3] = np.arange(decodes * 3).reshape(decodes, 3)
    tables[decodes] = np.arange(tables.shape[1]) + decodes * 3
    positions = np.concatenate([np.arange(s - q, s) for q, s in zip(q_lens, seq_lens)]).astype(np.int32)
    slots = np.concatenate([tables[i, p // bs] * bs + p % bs for i, (q, s) in enumerate(zip(q_lens, seq_lens))
                            for p in [np.arange(s - q, s)]]).astype(np.int32)
    prepared = attention.prepare_attention_batch(AttentionBatch(positions, slots, cu, seq_lens, tables, bs))
    shapes = sorted((call.q_rows.shape, call.kv_slots.shape) for call in prepared.calls)
    assert shapes == [((1, 1024), (1, 64 * bs)), ((32, 1), (32, 4 * bs))], shapes
