"""LongCat-Flash-Lite's n-gram embedding: each token's embedding also looks up hashes of the n-grams it ends.

As mlx-lm's ``longcat_flash_ngram`` computes it, with ``V`` the vocabulary, ``n`` emb_neighbor_num, ``k``
emb_split_num and ``m = ngram_vocab_size_ratio * V``: for each order ``i`` in ``2..n`` and split ``j < k`` there is
a table ``e = (i - 2) * k + j`` of ``m + 2e + 1`` rows (``r_e``) and ``hidden // (k (n - 1))`` columns, and a
projection back to the hidden size. Token ``t_p`` at position ``p`` looks up row

    (t_p + sum_{d=1}^{i-1} t_{p-d} * (V^d mod r_e)) mod r_e          (t_q = 0 for q < 0)

of table ``e``; the embedding is ``(word_embedding(t_p) + sum_e post_proj_e(table_e[row_e])) / (1 + k (n - 1))``.

So a token's embedding reads up to ``n - 1`` earlier tokens of its sequence. A pass knows its own tokens; the
earlier ones are those the KV manager holds for the sequence (``PagedKVManager.history``), which is exact
wherever the K/V are: after a prefix-cache hit (blocks are keyed by their tokens), after preemption (recomputed
from the tokens), after a speculative rollback (cut with the K/V), in any batch (per item). The hashing is
integer arithmetic done on the host, so every token must be known there: a step fed the previous step's pick on
the device (asynchronous stepping) is refused, and the engine does not overlap steps for such a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

import numpy as np

from ferrum.device_tokens import ends_on_device
from ferrum.errors import UnsupportedFeatureError

if TYPE_CHECKING:
    from ferrum.weights import Placed

#: The module holding the tables and projections, under the decoder's prefix.
MODULE = "ngram_embeddings"


@dataclass(frozen=True)
class NgramSpec:
    """The n-gram embedding of an architecture: ``neighbors`` (n, tokens an n-gram spans at most), ``splits`` (k,
    tables per order), over a vocabulary of ``vocab`` with ``ratio`` times as many hash buckets."""

    vocab: int
    ratio: int
    neighbors: int
    splits: int
    hidden: int

    @property
    def tables(self) -> int:
        return self.splits * (self.neighbors - 1)

    @property
    def dim(self) -> int:
        """Each table's columns (mlx-lm's ``hidden_size // (k (n - 1))``, rounded down)."""
        return self.hidden // self.tables

    def rows(self, table: int) -> int:
        return self.ratio * self.vocab + 2 * table + 1

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """The tables and projections (names under the decoder's prefix) and their shapes."""
        out: dict[str, tuple[int, ...]] = {}
        for e in range(self.tables):
            out[f"{MODULE}.embedders.{e}.weight"] = (self.rows(e), self.dim)
            out[f"{MODULE}.post_projs.{e}.weight"] = (self.hidden, self.dim)
        return out

    def lookup_tables(self) -> list[str]:
        return [f"{MODULE}.embedders.{e}.weight" for e in range(self.tables)]

    def coefficients(self) -> np.ndarray:
        """``[tables, neighbors]`` int64: table ``e``'s multiplier of ``t_{p-d}`` in column ``d`` (``V^d mod r_e``
        up to its order, 0 past it)."""
        out = np.zeros((self.tables, self.neighbors), dtype=np.int64)
        for e in range(self.tables):
            order, rows = 2 + e // self.splits, self.rows(e)
            out[e, :order] = [pow(self.vocab, d, rows) for d in range(order)]
        return out

    def rows_of(self, windows: np.ndarray) -> np.ndarray:
        """``[tables, T]`` rows each table looks up for ``windows`` (``[T, neighbors]``: a token, then its
        predecessors, 0 before the sequence), as int32; every term reduced first, so nothing overflows int64."""
        rows = np.array([self.rows(e) for e in range(self.tables)], dtype=np.int64)[:, None, None]
        terms = (windows[None].astype(np.int64) * self.coefficients()[:, None, :]) % rows
        return (terms.sum(axis=-1) % rows[..., 0]).astype(np.int32)


def windows(spec: NgramSpec, items: Sequence[Any], history: Callable[[Hashable, int], list]) -> np.ndarray:
    """``[T, neighbors]`` over a pass's tokens in item order: each token, then the ``neighbors - 1`` before it in
    its sequence (the item's own, then ``history(seq_id, count)``'s: the last ``count`` cached ones), 0 before the
    sequence's start, as mlx-lm shifts zeros in."""
    back = spec.neighbors - 1
    out = []
    for item in items:
        if ends_on_device(item.q_tokens):
            raise UnsupportedFeatureError(
                f"sequence {item.seq_id!r}: its last token is still on the device, but this model's n-gram "
                "embedding hashes every token with its predecessors on the host; feed host token ids "
                "(EngineConfig(async_stepping=False))")
        earlier = history(item.seq_id, min(back, item.pos_offset)) if item.pos_offset else []
        if None in earlier:
            raise UnsupportedFeatureError(
                f"sequence {item.seq_id!r}: a token among the {back} before position {item.pos_offset} is not known "
                "on the host yet (sampled on the device), but this model's n-gram embedding hashes it there; feed "
                "host token ids (EngineConfig(async_stepping=False))")
        context = np.concatenate([np.zeros(back - len(earlier), dtype=np.int64), np.asarray(earlier, dtype=np.int64),
                                  np.asarray(item.q_tokens, dtype=np.int64)])
        out.append(np.lib.stride_tricks.sliding_window_view(context, spec.neighbors)[:, ::-1])
    return np.concatenate(out)


class NgramEmbedding:
    """The placed tables and projections; ``self(h, windows)`` is the embedding of tokens whose word embeddings
    are ``h``."""

    def __init__(self, ops: Any, spec: NgramSpec, prefix: str, weights: dict[str, Placed]):
        from ferrum.weights import Linear  # imported here: ferrum.weights reads the family table, which reads this

        self.ops, self.spec = ops, spec
        self.tables = [weights[prefix + name] for name in spec.lookup_tables()]
        self.projections = [Linear(weights[f"{prefix}{MODULE}.post_projs.{e}.weight"]) for e in range(spec.tables)]

    def __call__(self, h: Any, windows: np.ndarray) -> Any:
        ops = self.ops
        for table, projection, rows in zip(self.tables, self.projections, self.spec.rows_of(windows)):
            h = ops.add(h, projection(table.embedding(table.weight, ops.from_numpy(rows, None))))
        return ops.mul_scalar(h, 1.0 / (1 + self.spec.tables))
