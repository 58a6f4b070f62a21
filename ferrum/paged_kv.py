"""Paged KV bookkeeping: which blocks each sequence owns, and where tokens go.

The backend holds the KV arrays (``kv_alloc``); this module only decides
which block and slot every token uses. Growth is planned for a whole batch
before anything changes, so a batch that does not fit raises
:class:`KVCacheExhaustedError` and leaves every sequence exactly as it was.

Prefix caching: every *full* block is keyed by a hash chaining its parent
block's key with its own tokens, so equal keys mean equal token prefixes and
therefore equal K/V. A sequence's first block chains from its *salt* instead
of nothing: the digest of the LoRA adapter it runs with (an adapter changes
the K/V of the same tokens), empty for the base model, so sequences share
blocks only when they share an adapter. Blocks are reference counted; a block nobody references
keeps its contents on an LRU list and is revived when another sequence's
prompt matches it (:meth:`PagedKVManager.match_prefix` then
:meth:`PagedKVManager.adopt`). It is overwritten only when no never-used
block is left.

A model whose recurrent layers carry a state per sequence (Qwen3.5, Granite
4.0-H) can use a match only where that state was kept too: a
:class:`BlockStates` listener (:mod:`ferrum.recurrent.snapshots`) cuts
matches to it, starts adopting sequences from it, and hears of released
sequences and evicted keys.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from ferrum.errors import InvalidRequestError, KVCacheExhaustedError, UnknownSequenceError


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Key of a full block: its parent's key plus its own token ids."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return digest.digest()


@dataclass
class SequenceBlocks:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose K/V are written
    tokens: list[int] = field(default_factory=list)  # those tokens, for block keys
    hashes: list[bytes] = field(default_factory=list)  # keys of the full blocks, in order
    salt: bytes = b""  # what its first block's key chains from (its adapter's digest)
    _table: np.ndarray | None = field(default=None, repr=False, compare=False)

    def table(self) -> np.ndarray:
        """``blocks`` as int32, built again only after they change (once per block while decoding): every
        step reads every running sequence's table, and converting the list each time grows with the context."""
        if self._table is None:
            self._table = np.array(self.blocks, dtype=np.int32)
        return self._table

    def grow(self, blocks: Iterable[int]) -> None:
        self.blocks.extend(blocks)
        self._table = None

    def drop_last(self) -> int:
        self._table = None
        return self.blocks.pop()


@dataclass(frozen=True)
class PrefixMatch:
    """Cached blocks that hold the K/V of a prompt's first ``num_tokens`` tokens."""

    blocks: tuple[int, ...]
    hashes: tuple[bytes, ...]
    num_tokens: int


class BlockStates(Protocol):
    """What keeps per-sequence state beside the blocks, keyed with their keys (see the module docstring)."""

    def usable(self, match: PrefixMatch) -> PrefixMatch: ...

    def adopted(self, seq_id: Hashable, match: PrefixMatch) -> None: ...

    def released(self, seq_id: Hashable, seq: SequenceBlocks) -> None: ...

    def evicted(self, key: bytes) -> None: ...

    def reset(self) -> None: ...


@dataclass
class Reservation:
    """Blocks handed out for one batch, so they can be returned if it fails."""

    new_sequences: list[Hashable]
    added_blocks: dict[Hashable, int]  # how many blocks were appended per sequence
    new_tokens: dict[Hashable, Sequence[int]]


class PagedKVManager:
    """Fixed-size, reference-counted blocks with a prefix cache and one table per sequence."""

    #: Set by a model with recurrent layers (a class default, so re-initialising the manager keeps it).
    listener: BlockStates | None = None

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise InvalidRequestError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.reset()

    def reset(self) -> None:
        """Forget every sequence and every cached block."""
        self._free: deque[int] = deque(range(self.num_blocks))  # blocks holding nothing reusable
        self._evictable: OrderedDict[int, bytes] = OrderedDict()  # unreferenced cached blocks, oldest first
        self._refs = [0] * self.num_blocks
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._seqs: dict[Hashable, SequenceBlocks] = {}
        if self.listener is not None:
            self.listener.reset()

    # ---- queries -------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def sequences(self) -> list[Hashable]:
        return list(self._seqs)

    def _get(self, seq_id: Hashable) -> SequenceBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequenceError(f"no KV cache for sequence {seq_id!r}; prefill it first") from None

    def length(self, seq_id: Hashable) -> int:
        return self._get(seq_id).length

    def salt(self, seq_id: Hashable) -> bytes:
        """The salt ``seq_id``'s block keys chain from (b"" for the base model)."""
        return self._get(seq_id).salt

    def history(self, seq_id: Hashable, count: int) -> list[int | None]:
        """The last ``count`` tokens whose K/V ``seq_id`` holds (None for one sampled on the device, not read yet):
        what a model whose embedding reads earlier tokens (:mod:`ferrum.arch.ngram`) needs besides a pass's own."""
        seq = self._get(seq_id)
        return seq.tokens[seq.length - count: seq.length] if count else []

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._get(seq_id).blocks)

    def block_array(self, seq_id: Hashable) -> np.ndarray:
        """:meth:`block_table` as a read-only int32 array, without converting the list every call."""
        table = self._get(seq_id).table()
        table.flags.writeable = False
        return table

    def block_key(self, seq_id: Hashable, index: int) -> bytes | None:
        """The key of ``seq_id``'s block ``index``; None while that block is not full or holds a token not known
        yet (sampled on the device), or for an unknown sequence."""
        seq = self._seqs.get(seq_id)
        return seq.hashes[index] if seq is not None and index < len(seq.hashes) else None

    def is_cached(self, key: bytes) -> bool:
        """Whether some block holds the contents keyed ``key`` (until it is evicted)."""
        return key in self._block_of

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (cached but unreferenced ones included)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose contents are keyed for reuse, referenced or not."""
        return len(self._hash_of)

    def blocks_needed(self, seq_id: Hashable, new_tokens: int) -> int:
        """Blocks ``seq_id`` must gain to hold ``new_tokens`` more tokens (0 if unknown and 0 tokens)."""
        seq = self._seqs.get(seq_id)
        length, owned = (seq.length, len(seq.blocks)) if seq else (0, 0)
        return max(0, -(-(length + new_tokens) // self.block_size) - owned)

    # ---- block lifetime ----------------------------------------------------
    def _take_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # overwrite the least recently used cached block
            block, key = self._evictable.popitem(last=False)
            del self._block_of[key], self._hash_of[block]
            if self.listener is not None:
                self.listener.evicted(key)
        self._refs[block] = 1
        return block

    def _unref(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = self._hash_of[block]  # most recently used at the end
            else:
                self._free.append(block)

    def _forget_key(self, block: int) -> None:
        key = self._hash_of.pop(block, None)
        if key is not None:
            del self._block_of[key]
            if self.listener is not None:
                self.listener.evicted(key)

    # ---- prefix cache --------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int], salt: bytes = b"") -> PrefixMatch:
        """The longest run of cached full blocks that starts ``tokens`` (computed under ``salt``).

        At least one token is always left uncached, so the caller still has
        a position to compute logits for. With a :attr:`listener` the match
        ends where it holds the state too.
        """
        blocks: list[int] = []
        hashes: list[bytes] = []
        parent = salt
        bs = self.block_size
        for start in range(0, len(tokens) - 1 - bs + 1, bs):
            key = chain_hash(parent, tokens[start : start + bs])
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
            hashes.append(key)
            parent = key
        match = PrefixMatch(tuple(blocks), tuple(hashes), len(blocks) * bs)
        return match if self.listener is None or not blocks else self.listener.usable(match)

    def adopt(self, seq_id: Hashable, tokens: Sequence[int], match: PrefixMatch, salt: bytes = b"") -> None:
        """Start ``seq_id`` on the cached blocks of ``match`` (shared, read-only)."""
        if seq_id in self._seqs:
            raise InvalidRequestError(f"sequence {seq_id!r} already has a KV cache")
        for block, key in zip(match.blocks, match.hashes):
            if self._hash_of.get(block) != key:
                raise InvalidRequestError("stale prefix match: a matched block was reused; match again")
        if self.listener is not None and match.blocks:
            self.listener.adopted(seq_id, match)
        for block in match.blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        self._seqs[seq_id] = SequenceBlocks(
            list(match.blocks), match.num_tokens, list(tokens[: match.num_tokens]), list(match.hashes), salt
        )

    def _key_full_blocks(self, seq: SequenceBlocks) -> None:
        """Key the full blocks not keyed yet, up to the first that holds a token not known yet (None)."""
        bs = self.block_size
        while len(seq.hashes) < seq.length // bs:
            index = len(seq.hashes)
            tokens = seq.tokens[index * bs : (index + 1) * bs]
            if None in tokens:
                return
            parent = seq.hashes[-1] if seq.hashes else seq.salt
            key = chain_hash(parent, tokens)
            seq.hashes.append(key)
            block = seq.blocks[index]
            if key not in self._block_of and block not in self._hash_of:
                self._block_of[key] = block
                self._hash_of[block] = key

    # ---- growth ----------------------------------------------------------
    def reserve(
        self, growth: Iterable[tuple[Hashable, Sequence[int]]], salts: Mapping[Hashable, bytes] | None = None
    ) -> Reservation:
        """Give each ``(seq_id, new_tokens)`` the blocks it needs, all or nothing.

        Unknown ids are created, with their salt from ``salts`` (default b"").
        Lengths change only on :meth:`commit`.
        """
        growth = list(growth)
        needs = [self.blocks_needed(seq_id, len(tokens)) for seq_id, tokens in growth]
        total = sum(needs)
        if total > self.num_free_blocks:
            raise KVCacheExhaustedError(
                f"batch needs {total} free KV blocks but only {self.num_free_blocks} of {self.num_blocks} "
                "are free; release finished sequences or load the model with more KV blocks"
            )
        reservation = Reservation([], {}, {})
        for (seq_id, tokens), n in zip(growth, needs):
            seq = self._seqs.get(seq_id)
            if seq is None:
                seq = self._seqs[seq_id] = SequenceBlocks(salt=(salts or {}).get(seq_id, b""))
                reservation.new_sequences.append(seq_id)
            if n:
                seq.grow(self._take_block() for _ in range(n))
            reservation.added_blocks[seq_id] = n
            reservation.new_tokens[seq_id] = tokens
        return reservation

    def commit(self, reservation: Reservation) -> None:
        """The batch's K/V are written: extend lengths and key newly full blocks.

        A token given as None (sampled on the device, not read yet) holds its
        block out of the prefix cache until :meth:`fill` supplies it.
        """
        for seq_id, tokens in reservation.new_tokens.items():
            seq = self._seqs[seq_id]
            seq.tokens.extend(None if t is None else int(t) for t in tokens)
            seq.length += len(tokens)
            self._key_full_blocks(seq)

    def fill(self, seq_id: Hashable, position: int, token: int) -> None:
        """The host learned the token at ``position`` that was committed as None: key what it completes.

        Unknown sequences and positions not held (released, truncated) are ignored.
        """
        seq = self._seqs.get(seq_id)
        if seq is not None and position < len(seq.tokens) and seq.tokens[position] is None:
            seq.tokens[position] = int(token)
            self._key_full_blocks(seq)

    def rollback(self, reservation: Reservation) -> None:
        """Return a failed batch's blocks; sequences look as before ``reserve``."""
        for seq_id, n in reservation.added_blocks.items():
            seq = self._seqs[seq_id]
            for _ in range(n):
                self._unref(seq.drop_last())
        for seq_id in reservation.new_sequences:
            del self._seqs[seq_id]

    # ---- slot arithmetic ------------------------------------------------
    def slots(self, seq_id: Hashable, start: int, count: int) -> np.ndarray:
        """KV slots of positions ``start .. start+count-1`` (blocks must be reserved)."""
        blocks = self._get(seq_id).table().astype(np.int64)
        pos = np.arange(start, start + count)
        return (blocks[pos // self.block_size] * self.block_size + pos % self.block_size).astype(np.int32)

    # ---- shrinking -------------------------------------------------------
    def truncate(self, seq_id: Hashable, new_length: int) -> list[int]:
        """Forget tokens from ``new_length`` on, dropping blocks no longer needed.

        New tokens will be written into the last kept block when ``new_length``
        falls inside it. If that block is shared with another sequence it must
        not be written, so it is dropped too and the tokens it kept are
        returned: the caller recomputes them (a private copy). Otherwise the
        list is empty.
        """
        seq = self._get(seq_id)
        if not 0 <= new_length <= seq.length:
            raise InvalidRequestError(
                f"cannot truncate sequence {seq_id!r} of length {seq.length} to {new_length}"
            )
        bs = self.block_size
        keep = -(-new_length // bs)
        partial = new_length % bs != 0
        if partial and self._refs[seq.blocks[keep - 1]] > 1:
            keep -= 1
        recompute = seq.tokens[keep * bs : new_length]
        while len(seq.blocks) > keep:
            self._unref(seq.drop_last())
        if partial and not recompute:
            self._forget_key(seq.blocks[-1])  # sole owner: its tail is about to change
        seq.length = keep * bs if recompute else new_length
        del seq.tokens[seq.length :]
        del seq.hashes[seq.length // bs :]
        return recompute

    def release(self, seq_id: Hashable) -> None:
        seq = self._get(seq_id)
        if self.listener is not None:
            self.listener.released(seq_id, seq)
        for block in reversed(seq.blocks):  # the prefix's first block is evicted last
            self._unref(block)
        del self._seqs[seq_id]
