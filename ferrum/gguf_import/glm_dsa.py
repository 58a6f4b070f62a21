"""The DSA indexers of GLM-5 (``glm-dsa``) and DeepSeek-V3.2 (``deepseek32``) as llama.cpp reads such files, in
transformers' GlmMoeDsa / DeepseekV32 terms.

Ferrum checks the indexers' tensors for shape and drops them, running the model as the dense attention it is up to
``index_topk`` keys (:mod:`ferrum.arch.dsa`); so the file's indexer sizes and which layers hold one are what the import
reads. llama.cpp takes the layers from ``attention.indexer.types`` (a flag a layer: its own indexer, or the previous
one's selection), and for a file without it guesses by the context: every layer for GLM-5 / 5.1, GLM-5.2's pattern
from a million tokens on."""

from __future__ import annotations

from typing import Any

from ferrum.arch.dsa import FULL, INDEXER, SHARED
from ferrum.errors import CheckpointError
from ferrum.gguf_import.files import Metadata

#: The indexer's tensors (GGUF name within a block -> transformers' name within the layer).
TENSORS = tuple((f"indexer.{gguf}.{part}", f"{INDEXER}{hf}.{part}") for gguf, hf, part in (
    ("attn_q_b", "wq_b", "weight"), ("attn_k", "wk", "weight"), ("k_norm", "k_norm", "weight"),
    ("k_norm", "k_norm", "bias"), ("proj", "weights_proj", "weight")))

#: llama.cpp's guess for a file without indexer types: GLM-5.2's layers (its first two, then one in four from the
#: third, of 78) where the context is at least this long, every layer below it (GLM-5 / 5.1).
_GLM_5_2_CONTEXT, _GLM_5_2_LAYERS = 1 << 20, 78


def _glm_5_2_flags(layers: int) -> list[bool]:
    return [i < 2 or (i < _GLM_5_2_LAYERS and (i - 2) % 4 == 0) for i in range(layers)]


def indexer_sizes(meta: Metadata, p: str) -> dict[str, Any]:
    """config.json's indexer sizes: its heads, their width and how many keys it selects, which llama.cpp requires."""
    return {"index_n_heads": int(meta.need(p + "attention.indexer.head_count")),
            "index_head_dim": int(meta.need(p + "attention.indexer.key_length")),
            "index_topk": int(meta.need(p + "attention.indexer.top_k"))}


def indexer_config(meta: Metadata, p: str, layers: int, context: int) -> dict[str, Any]:
    """GLM-5's indexer entries for a file of ``layers`` decoder layers and a training ``context``: the sizes and which
    layers hold an indexer."""
    key = p + "attention.indexer.types"
    flags = meta.get(key)
    if flags is None:
        flags = [True] * layers if context < _GLM_5_2_CONTEXT else _glm_5_2_flags(layers)
    elif not isinstance(flags, list) or len(flags) != layers or any(f not in (0, 1) for f in flags):
        raise CheckpointError(f"{meta.where}: {key} must flag each of the {layers} decoder layers as holding an "
                              f"indexer (true) or sharing the previous one's selection (false), got {flags!r:.80}")
    return {**indexer_sizes(meta, p), "indexer_types": [FULL if flag else SHARED for flag in flags]}
