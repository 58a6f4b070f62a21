"""DeepSeek Sparse Attention (DSA: DeepSeek-V3.2, GLM-5), run as the dense latent attention it equals up to
``index_topk`` keys.

DSA adds a "lightning indexer" to DeepSeek-V3's latent attention (transformers' ``DeepseekV32Indexer``): per
layer, ``wq_b`` (from the query latent), ``wk`` and its LayerNorm ``k_norm``, and ``weights_proj`` score each
query against every key, and the query attends only the ``index_topk`` best-scored keys. A query that sees at
most ``index_topk`` keys has every one of them selected, so its attention is dense attention exactly. Ferrum runs
these models so and caps their context at ``index_topk`` tokens (``Architecture.context_limit``), so a longer one is
refused rather than attended densely, which would differ from the model. The indexer's tensors are therefore read
and checked for shape (:meth:`IndexerSpec.tensors`), then dropped: nothing computes with them. GLM-5's "shared"
layers reuse the previous layer's selection and store no indexer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferrum.arch.keys import Key, KeyReader, optional_non_negative_int, positive_int

#: The indexer's module in a layer; its tensors are dropped at load.
INDEXER = "self_attn.indexer."

FULL, SHARED = "full", "shared"


@dataclass(frozen=True)
class IndexerSpec:
    """The sizes of one model's DSA indexers, and which layers have one."""

    heads: int  # index_n_heads
    head_dim: int  # index_head_dim
    topk: int  # index_topk: the keys each query attends, and so the context Ferrum runs exactly
    layers: tuple[bool, ...]  # per layer: it stores an indexer ("full"), or reuses the previous one's ("shared")

    def tensors(self, hidden: int, arch: Any) -> dict[str, tuple[int, ...]]:
        """One indexed layer's indexer tensors as the checkpoint stores them (names relative to the layer)."""
        return {f"{INDEXER}wq_b.weight": (self.heads * self.head_dim, arch.mla.q_lora_rank),
                f"{INDEXER}wk.weight": (self.head_dim, hidden),
                f"{INDEXER}k_norm.weight": (self.head_dim,), f"{INDEXER}k_norm.bias": (self.head_dim,),
                f"{INDEXER}weights_proj.weight": (self.heads, hidden)}

    @property
    def why(self) -> str:
        """Why the context is capped, for the line said at load."""
        return (f"its sparse attention (DSA) attends the index_topk ({self.topk}) keys its indexer picks, which is "
                "dense attention exactly up to that many tokens; Ferrum runs it densely and refuses longer contexts")


def keys(heads: int) -> tuple[Key, ...]:
    """The indexer's keys with a family's transformers defaults (index_n_heads: 64 for V3.2, 32 for GLM-5)."""
    return (Key("index_topk", default=2048, check=positive_int),
            Key("index_head_dim", default=128, check=positive_int),
            Key("index_n_heads", default=heads, check=positive_int))


#: GLM-5's per-layer indexer kinds and the keys transformers derives them from where they are not listed.
GLM_KEYS = (Key("indexer_types"), Key("index_topk_pattern"),
            Key("index_topk_freq", default=1, check=optional_non_negative_int),
            Key("index_skip_topk_offset", default=2, check=optional_non_negative_int))


def read(r: KeyReader, layers: int, kinds: list[str] | None = None) -> IndexerSpec:
    """The indexer of every layer, or of the layers ``kinds`` makes "full"."""
    kinds = kinds or [FULL] * layers
    return IndexerSpec(r("index_n_heads"), r("index_head_dim"), r("index_topk"), tuple(k == FULL for k in kinds))


def glm_kinds(r: KeyReader, layers: int) -> list[str]:
    """GLM-5's indexer kinds as transformers' GlmMoeDsaConfig reads them: indexer_types, else index_topk_pattern
    ("F" full, "S" shared, or a list of kinds), else a full layer every index_topk_freq layers from
    index_skip_topk_offset - 1 on (the layers before it full too)."""
    kinds, name = r("indexer_types"), "indexer_types"
    if kinds is None and r("index_topk_pattern") is not None:
        pattern, name = r("index_topk_pattern"), "index_topk_pattern"
        kinds = [{"F": FULL, "S": SHARED}.get(c, c) for c in pattern] if isinstance(pattern, str) else pattern
    if kinds is None:
        freq, offset = r("index_topk_freq"), r("index_skip_topk_offset")
        for key, value in (("index_topk_freq", freq), ("index_skip_topk_offset", offset)):
            if value is None:  # transformers reads it as a number here (and fails on null)
                r.fail(key, "is null, but with no indexer_types or index_topk_pattern the indexer kinds are derived "
                            "from it; give a number or leave it out (transformers' defaults: index_topk_freq 1, "
                            "index_skip_topk_offset 2)")
        return [FULL if max(i - offset + 1, 0) % max(freq, 1) == 0 else SHARED for i in range(layers)]
    if not isinstance(kinds, list) or any(kind not in (FULL, SHARED) for kind in kinds):
        r.fail(name, f"must list 'full' or 'shared' per layer (a pattern: 'F' or 'S'), got {kinds!r}")
    if len(kinds) != layers:
        r.fail(name, f"lists {len(kinds)} layers, but the model has {layers} (num_hidden_layers)")
    if kinds and kinds[0] == SHARED:
        r.fail(name, "makes the first layer 'shared', but a shared layer reuses the previous full layer's selection")
    return kinds
