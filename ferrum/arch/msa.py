"""MiniMax-M3's block-sparse attention, run as the dense attention it equals up to ``index_topk_blocks`` blocks.

Its lightning indexer (transformers' ``MiniMaxM3VLIndexer``) scores each query against every key with its own
``q_proj`` / ``k_proj`` heads (Gemma-normed, rotated), max-pools the scores over blocks of ``index_block_size``
keys and keeps each query's ``index_topk_blocks`` best blocks (the ``index_local_blocks`` before it always among
them). A context of at most ``index_topk_blocks * index_block_size`` tokens has no more blocks than that, each with
a key at or before any query that reaches it, so every block is kept and the attention is dense attention exactly.
As DSA's (:mod:`ferrum.arch.dsa`), Ferrum runs it so, caps the context there (``Architecture.context_limit``) and
checks the indexers' tensors for shape, then drops them: nothing computes with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferrum.arch.dsa import INDEXER
from ferrum.arch.keys import Key, KeyReader, optional_non_negative_int, positive_int

#: transformers' names of the indexer's keys -> the release's (nested in its sparse_attention_config).
RELEASE_NAMES = {"index_n_heads": "sparse_num_index_heads", "index_head_dim": "sparse_index_dim",
                 "index_block_size": "sparse_block_size", "index_topk_blocks": "sparse_topk_blocks",
                 "index_local_blocks": "sparse_local_block"}
#: The layer kind of transformers' layer_types whose layers have an indexer.
SPARSE = "minimax_m3_sparse"

#: The indexer's keys with transformers' MiniMaxM3VLTextConfig defaults.
KEYS = (Key("index_n_heads", default=4, check=positive_int), Key("index_head_dim", default=128, check=positive_int),
        Key("index_block_size", default=128, check=positive_int),
        Key("index_topk_blocks", default=16, check=positive_int),
        Key("index_local_blocks", default=1, check=optional_non_negative_int))


@dataclass(frozen=True)
class BlockIndexerSpec:
    """The sizes of one model's block indexers, and which layers have one."""

    heads: int  # index_n_heads
    head_dim: int  # index_head_dim
    block_size: int  # index_block_size
    topk_blocks: int  # index_topk_blocks
    layers: tuple[bool, ...]  # per layer: it has an indexer (layer_types "minimax_m3_sparse")

    def tensors(self, hidden: int, arch: Any) -> dict[str, tuple[int, ...]]:
        """One indexed layer's indexer tensors (names relative to the layer, transformers' naming)."""
        d = self.head_dim
        return {f"{INDEXER}q_proj.weight": (self.heads * d, hidden), f"{INDEXER}k_proj.weight": (d, hidden),
                f"{INDEXER}q_norm.weight": (d,), f"{INDEXER}k_norm.weight": (d,)}

    @property
    def topk(self) -> int:
        """The context up to which the attention is dense attention exactly."""
        return self.topk_blocks * self.block_size

    @property
    def why(self) -> str:
        """Why the context is capped, for the line said at load."""
        return (f"its sparse attention keeps index_topk_blocks ({self.topk_blocks}) blocks of index_block_size "
                f"({self.block_size}) keys, which is dense attention exactly up to {self.topk} tokens; Ferrum runs it "
                "densely and refuses longer contexts")


def read(r: KeyReader, sparse: list[bool]) -> BlockIndexerSpec:
    """The indexers of the layers ``sparse`` marks."""
    return BlockIndexerSpec(r("index_n_heads"), r("index_head_dim"), r("index_block_size"), r("index_topk_blocks"),
                            tuple(sparse))
