"""poolside's Laguna (``laguna``) as llama.cpp runs such a file, in transformers' Laguna terms.

llama.cpp reads a query head count per block (``attention.head_count``), the gate's kind from ``attn_gate``'s rows
(one per head, or one per head dim), its sliding layers from the file's window and ``attention.sliding_window_pattern``
(a period, 4 where absent; the first of each period full; none without a window), their rope from
``rope.freq_base_swa`` and ``rope.dimension_count_swa``, unscaled; the full layers' from the file's rope keys (YaRN
included). It routes by sigmoid scores chosen with the correction bias, renormalised (``expert_weights_norm``, which
it requires) and scaled, beside one ungated shared expert, after ``leading_dense_block_count`` dense layers, and never
soft-caps the router's logits."""

from __future__ import annotations

from typing import Any

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, float32_value, routed_scale

FULL, SLIDING = "full_attention", "sliding_attention"
_SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID, its default for laguna
#: Block tensors under the names of Laguna's checkpoints: the output gate, the router's correction bias, the shared
#: expert.
TENSORS = (("attn_gate.weight", "self_attn.g_proj.weight"), ("exp_probs_b.bias", "mlp.experts.e_score_correction_bias"),
           *((f"ffn_{p}_shexp.weight", f"mlp.shared_expert.{p}_proj.weight") for p in ("gate", "up", "down")))


def _refuse(meta: Metadata, what: str, why: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(f"{meta.where}: {what} is not supported ({why})")


def _layer_kinds(meta: Metadata, p: str, layers: int) -> tuple[int, list[str]]:
    """The window and each layer's kind as llama.cpp's set_swa_pattern(period, dense_first) makes them."""
    window = int(meta.get(p + "attention.sliding_window") or 0)
    if not window:
        return 0, [FULL] * layers
    period = meta.get(p + "attention.sliding_window_pattern", 4)
    if isinstance(period, (list, bool)) or not isinstance(period, int):
        raise _refuse(meta, f"{p}attention.sliding_window_pattern {period!r}",
                      "llama.cpp's laguna reads one period, the first layer of each full")
    return window, [SLIDING if period == 0 or i % period else FULL for i in range(layers)]


def _gating(meta: Metadata, heads: list[int], head_dim: int) -> bool | str:
    """transformers' ``gating`` from the rows of each block's attn_gate: True (one gate per head) or "per-element"."""
    gates = [meta.tensor(f"blk.{i}.attn_gate.weight") for i in range(len(heads))]
    rows = [None if t is None else int(t.shape[-1]) for t in gates]  # gguf's shapes run innermost first
    if rows == heads:
        return True
    if rows == [n * head_dim for n in heads]:
        return "per-element"
    raise _refuse(meta, f"attn_gate rows {rows} for query heads {heads}",
                  "transformers' Laguna gates every layer one way: one row per head, or one per head dim")


def laguna_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json's Laguna entries from a laguna file; a file llama.cpp runs otherwise than transformers can (another
    gate function, unnormalised weights, other than one shared expert, biases, a sliding-layer pattern list) is
    refused by name."""
    layers, head_dim = cfg["num_hidden_layers"], cfg["head_dim"]
    gating = meta.get(p + "expert_gating_func", _SIGMOID_GATING)
    if gating != _SIGMOID_GATING:
        raise _refuse(meta, f"{p}expert_gating_func {gating}", "transformers' Laguna routes by sigmoid scores")
    if not meta.get(p + "expert_weights_norm"):
        raise _refuse(meta, f"a laguna file without {p}expert_weights_norm true",
                      "transformers' Laguna always renormalises the chosen weights")
    if meta.get(p + "expert_shared_count", 1) != 1:
        raise _refuse(meta, f"{p}expert_shared_count {meta.get(p + 'expert_shared_count')}",
                      "transformers' Laguna has one shared expert")
    if any(f"blk.{i}.attn_{t}.bias" in meta.tensors for i in range(layers) for t in ("q", "k", "v", "output")):
        raise _refuse(meta, "attention biases in a laguna file", "llama.cpp's laguna reads none of them")
    heads = meta.need(p + "attention.head_count")
    if isinstance(heads, list) and len(heads) != layers:
        raise CheckpointError(f"{meta.where}: {p}attention.head_count lists {len(heads)} layers' query heads, but the "
                              f"file has {layers} blocks; it must list one per block")
    heads = [int(n) for n in heads] if isinstance(heads, list) else [int(heads)] * layers
    window, kinds = _layer_kinds(meta, p, layers)
    full = {"rope_type": "default", "rope_theta": cfg["rope_theta"],
            "partial_rotary_factor": cfg.get("partial_rotary_factor", 1.0), **(cfg["rope_scaling"] or {})}
    base_swa, dims_swa = meta.get(p + "rope.freq_base_swa"), meta.get(p + "rope.dimension_count_swa")
    sliding = {"rope_type": "default", "rope_theta": cfg["rope_theta"] if base_swa is None else float32_value(base_swa),
               "partial_rotary_factor": full["partial_rotary_factor"] if dims_swa is None else int(dims_swa) / head_dim}
    dense = int(meta.need(p + "leading_dense_block_count"))
    return {
        "num_attention_heads": max(heads), "num_attention_heads_per_layer": heads,
        "sliding_window": window, "layer_types": kinds,
        "mlp_layer_types": ["dense" if i < dense else "sparse" for i in range(layers)],
        "rope_parameters": {FULL: full, SLIDING: sliding}, "rope_scaling": None, "partial_rotary_factor": 1.0,
        "gating": _gating(meta, heads, head_dim),
        "moe_routed_scaling_factor": routed_scale(meta, p),
        "moe_router_logit_softcapping": 0.0,  # llama.cpp's laguna caps nothing
        "attention_bias": False,
    }
