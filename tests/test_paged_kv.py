"""Paged KV bookkeeping: reservations, truncation, prefix-cache keys, refcounts, LRU eviction."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.errors import InvalidRequestError, KVCacheExhaustedError, UnknownSequenceError
from ferrum.model import DecoderOnlyLLM, ForwardItem
from ferrum.paged_kv import PagedKVManager, chain_hash

from support import write_arch_checkpoint


def grow(kv: PagedKVManager, seq_id, tokens) -> None:
    kv.commit(kv.reserve([(seq_id, list(tokens))]))


def test_reserve_commit_rollback_truncate_release():
    kv = PagedKVManager(num_blocks=6, block_size=4)
    r = kv.reserve([("x", [1, 2, 3, 4, 5]), ("y", [9])])
    assert kv.num_free_blocks == 3 and kv.length("x") == 0
    kv.commit(r)
    assert kv.length("x") == 5 and len(kv.block_table("x")) == 2
    assert kv.slots("x", 3, 2).tolist() == [kv.block_table("x")[0] * 4 + 3, kv.block_table("x")[1] * 4]
    r = kv.reserve([("x", [6, 7, 8, 9]), ("z", [1, 2, 3, 4])])
    kv.rollback(r)
    assert "z" not in kv and len(kv.block_table("x")) == 2 and kv.num_free_blocks == 3
    assert kv.truncate("x", 4) == []
    assert len(kv.block_table("x")) == 1 and kv.num_free_blocks == 4
    with pytest.raises(InvalidRequestError):
        kv.truncate("x", 5)
    kv.release("x")
    kv.release("y")
    assert kv.num_free_blocks == 6 and kv.sequences() == []
    with pytest.raises(UnknownSequenceError):
        kv.release("x")


def test_block_array_follows_the_table_through_every_change():
    """The int32 copy the model reads each step is kept between calls; any change to the blocks must show."""
    kv = PagedKVManager(num_blocks=8, block_size=4)
    history = []

    def check(seq_id):
        array = kv.block_array(seq_id)
        assert array.dtype == np.int32 and array.tolist() == kv.block_table(seq_id)
        history.append(array)

    grow(kv, "x", range(5))
    check("x")
    grow(kv, "x", [6])  # no new block: the same array serves
    assert kv.block_array("x") is history[-1]
    failed = kv.reserve([("y", [1]), ("x", [7, 8, 9])])  # x takes its third block
    check("x")  # as a forward pass reads it before it fails
    kv.rollback(failed)
    check("x")
    grow(kv, "y", range(9))  # takes the blocks x's failed batch returned, so x's next ones differ
    grow(kv, "x", [7, 8, 9])
    check("x")
    assert kv.truncate("x", 3) == []
    check("x")
    match = kv.match_prefix(list(range(9)) + [5])
    kv.adopt("z", list(range(9)), match)
    check("z")
    with pytest.raises(ValueError):
        kv.block_array("z")[0] = 7  # read-only: a caller cannot change the manager's copy


def test_exhaustion_changes_nothing():
    kv = PagedKVManager(num_blocks=2, block_size=4)
    grow(kv, "a", range(5))
    with pytest.raises(KVCacheExhaustedError, match="needs 2 free KV blocks but only 0"):
        kv.reserve([("a", [1, 2, 3, 4]), ("b", [1])])
    assert kv.sequences() == ["a"] and kv.length("a") == 5 and kv.num_free_blocks == 0


def test_block_keys_chain_their_parents():
    assert chain_hash(b"", [1, 2]) == chain_hash(b"", [1, 2])
    assert chain_hash(b"", [1, 2]) != chain_hash(b"", [2, 1])
    assert chain_hash(chain_hash(b"", [7, 7]), [1, 2]) != chain_hash(b"", [1, 2])


def test_prefix_match_shares_full_blocks_with_refcounts():
    kv = PagedKVManager(num_blocks=8, block_size=4)
    prompt = list(range(10, 21))  # 11 tokens: two full blocks and a partial one
    grow(kv, "a", prompt)
    assert kv.num_cached_blocks == 2
    match = kv.match_prefix(prompt[:9] + [99, 98])
    assert match.num_tokens == 8 and match.blocks == tuple(kv.block_table("a")[:2])
    kv.adopt("b", prompt[:9] + [99, 98], match)
    assert kv.length("b") == 8
    assert [kv.ref_count(b) for b in match.blocks] == [2, 2]
    grow(kv, "b", [prompt[8], 99, 98])
    assert kv.block_table("b")[2] != kv.block_table("a")[2]  # partial blocks are never shared
    kv.release("a")
    assert [kv.ref_count(b) for b in match.blocks] == [1, 1]
    kv.release("b")
    assert kv.num_free_blocks == 8 and kv.num_cached_blocks == 2  # contents kept for reuse


def test_prefix_match_always_leaves_a_token_to_compute():
    kv = PagedKVManager(num_blocks=8, block_size=4)
    grow(kv, "a", range(8))
    assert kv.match_prefix(list(range(8))).num_tokens == 4
    assert kv.match_prefix(list(range(9))).num_tokens == 8
    assert kv.match_prefix([0, 1, 2]).num_tokens == 0


def test_a_different_first_block_breaks_the_chain():
    kv = PagedKVManager(num_blocks=8, block_size=2)
    grow(kv, "a", [1, 2, 3, 4, 5])
    assert kv.match_prefix([9, 2, 3, 4, 5]).num_tokens == 0


def test_unreferenced_cached_blocks_are_evicted_least_recently_used_first():
    kv = PagedKVManager(num_blocks=4, block_size=2)
    grow(kv, "old", [1, 2, 3, 4])
    kv.release("old")
    grow(kv, "new", [5, 6, 7, 8])
    kv.release("new")
    assert kv.num_cached_blocks == 4 and kv.num_free_blocks == 4
    grow(kv, "c", [0, 0, 0])  # two blocks, taken from "old" (released first), its tail first
    assert kv.match_prefix([1, 2, 3, 4, 0]).num_tokens == 0
    assert kv.match_prefix([5, 6, 7, 8, 0]).num_tokens == 4


def test_adopting_revives_a_cached_block_so_it_cannot_be_evicted():
    kv = PagedKVManager(num_blocks=3, block_size=2)
    grow(kv, "a", [1, 2, 3])
    kv.release("a")
    match = kv.match_prefix([1, 2, 3])
    kv.adopt("b", [1, 2, 3], match)
    grow(kv, "c", [7, 7, 7, 7])  # needs both other blocks; the adopted one is not evictable
    assert kv.num_free_blocks == 0 and kv.block_table("b") == list(match.blocks)
    with pytest.raises(KVCacheExhaustedError):
        kv.reserve([("d", [1])])


def test_stale_match_is_refused():
    kv = PagedKVManager(num_blocks=2, block_size=2)
    grow(kv, "a", [1, 2, 3])
    kv.release("a")
    match = kv.match_prefix([1, 2, 3])
    grow(kv, "b", [5, 5, 5, 5])  # overwrites both cached blocks
    with pytest.raises(InvalidRequestError, match="stale"):
        kv.adopt("c", [1, 2, 3], match)
    assert "c" not in kv


def test_truncating_into_a_shared_block_asks_for_a_private_copy():
    kv = PagedKVManager(num_blocks=8, block_size=4)
    grow(kv, "a", range(9))
    kv.adopt("b", list(range(9)), kv.match_prefix(list(range(9))))
    shared = kv.block_table("b")[1]
    assert kv.truncate("b", 6) == [4, 5]  # the shared block is dropped; positions 4, 5 are recomputed
    assert kv.length("b") == 4 and kv.block_table("b") == kv.block_table("a")[:1]
    assert kv.ref_count(shared) == 1


def test_truncating_into_a_private_cached_block_unkeys_it():
    kv = PagedKVManager(num_blocks=4, block_size=2)
    grow(kv, "a", [1, 2, 3, 4])
    assert kv.truncate("a", 3) == []
    grow(kv, "a", [9])  # block 2 now holds [3, 9]
    assert kv.match_prefix([1, 2, 3, 4, 0]).num_tokens == 2
    assert kv.match_prefix([1, 2, 3, 9, 0]).num_tokens == 4


def test_model_truncate_into_shared_block_keeps_both_sequences_correct(tmp_path):
    """Rolling back into a shared block recomputes privately; the other sequence is untouched."""
    path = tmp_path / "m"
    write_arch_checkpoint(path, "llama")
    model = DecoderOnlyLLM.from_pretrained(path, backend="cpu", num_kv_blocks=16, block_size=4)
    reference = DecoderOnlyLLM.from_pretrained(path, backend="cpu", num_kv_blocks=16, block_size=4)
    tokens = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7]
    model.prefill("a", tokens)
    match = model.kv.match_prefix(tokens)
    model.kv.adopt("b", tokens, match)
    model.forward([ForwardItem("b", tokens[match.num_tokens :], match.num_tokens)])
    model.truncate_kv("b", 6)
    got_b = model.decode("b", 42, 6)
    got_a = model.decode("a", 11, 10)
    reference.prefill("x", tokens[:6])
    np.testing.assert_allclose(got_b, reference.decode("x", 42, 6), atol=2e-5)
    reference.prefill("y", tokens)
    np.testing.assert_allclose(got_a, reference.decode("y", 11, 10), atol=2e-5)
