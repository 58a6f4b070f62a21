"""PLaMo-13B files (``plamo``) back into Preferred Networks' release layout, as Ferrum's ``plamo`` family (mlx-lm's)
reads it.

PLaMo tiles its key/value heads over the queries (query head ``h`` reads ``h % kv_heads``); llama.cpp's converter
(PlamoModel) reorders the query heads, and o_proj's inputs with them, into ggml's grouping (head ``h`` reads
``h // (heads / kv_heads)``): taken back here, whole heads moving (rows of q, column groups of o_proj). The key/value
heads are the file's (the converter writes 5, PLaMo-13B's), ``n_shared_head`` the query heads over them; q/k rows as
stored (rotate-half rope). Rope scaling (PLaMo has none) is refused by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata
from ferrum.gguf_import.gated_delta import Restored

#: The layer's one norm, before attention and the MLP side by side.
TENSORS = (("attn_norm.weight", "norm.weight"),)


def _head_order(cfg: dict[str, Any]) -> np.ndarray:
    """The stored query heads in the release's order: stored ``(kv head, share)`` back to ``(share, kv head)``."""
    heads, shared = cfg["num_attention_heads"], cfg["n_shared_head"]
    return np.arange(heads).reshape(heads // shared, shared).T.ravel()


def own_tensors(rest: str, cfg: dict[str, Any]) -> tuple[Restored, ...] | None:
    """q's rows and o_proj's input columns, head by head, in the release's order."""
    if rest == "attn_q.weight":
        width = cfg["hidden_size"] // cfg["num_attention_heads"]
        rows = (_head_order(cfg)[:, None] * width + np.arange(width)).ravel()
        return (Restored("self_attn.q_proj.weight", rows=rows),)
    if rest == "attn_output.weight":
        return (Restored("self_attn.o_proj.weight", columns=_head_order(cfg)),)
    return None


def plamo_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """n_shared_head from the file's heads; rope over whole heads in rotate-half pairs."""
    if cfg["rope_scaling"] is not None:
        raise UnsupportedFeatureError(f"{meta.where}: {cfg['rope_scaling']['rope_type']} rope scaling in a plamo file "
                                      "is not supported (PLaMo has none)")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if not kv_heads:
        raise CheckpointError(f"{meta.where}: {p}attention.head_count_kv is 0; PLaMo's query heads share at least one "
                              "key/value head")
    if heads % kv_heads:
        raise CheckpointError(f"{meta.where}: {heads} query heads do not share {kv_heads} key/value heads evenly")
    return {"n_shared_head": heads // kv_heads, "rope_traditional": False}
