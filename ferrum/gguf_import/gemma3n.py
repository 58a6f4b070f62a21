"""Gemma 3n files (``gemma3n``: E2B / E4B) back into transformers' Gemma3nTextConfig and tensor names.

llama.cpp's converter writes Gemma 3n's norms as they are (no ``1 + w``), ``altup.correct_output_scale`` as
``altup_correct_scale.weight``, the three AltUp projections (and the three unembedding ones) stacked into one
``[3, H, H]`` tensor each, cut apart again here, and both embedding tables padded with zero rows to the full
vocabulary (the per-layer one from vocab_size_per_layer_input). llama.cpp then runs, whatever the file says: four
sliding layers to one full one, the sliding ones at rope base 10000, keys and values computed by the first 20
layers only (the later ones read the last of their kind before them), the first 10 layers' MLP gates cut at the
standard normal's 0.95 quantile, and the logits capped at 30. The import reads the file as llama.cpp runs it, and
refuses by name a file whose own keys (the converter's, from the checkpoint) say otherwise.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

from ferrum.errors import UnsupportedFeatureError
from ferrum.gguf_import import gemma4
from ferrum.gguf_import.files import Metadata, float32_value

#: Gemma 3n's block tensors under their transformers names: Gemma 4's sandwich norms and per-layer input, AltUp's
#: and Laurel's.
TENSORS = gemma4.TENSORS[:3] + gemma4.TENSORS[4:7] + (
    ("altup_correct_coef.weight", "altup.correction_coefs.weight"),
    ("altup_correct_scale.weight", "altup.correct_output_scale"),
    ("altup_predict_coef.weight", "altup.prediction_coefs.weight"),
    ("altup_router.weight", "altup.modality_router.weight"),
    ("altup_router_norm.weight", "altup.router_norm.weight"),
    ("laurel_l.weight", "laurel.linear_left.weight"),
    ("laurel_r.weight", "laurel.linear_right.weight"),
    ("laurel_post_norm.weight", "laurel.post_laurel_norm.weight"),
)
#: The AltUp copies the converter handles (it refuses others), so the stacked projections hold three matrices.
_COPIES = 4
#: The stacked AltUp projections: GGUF -> the transformers matrices they hold, in order.
SPLIT_GLOBALS = tuple((stacked, tuple(f"model.{name}.{i}.weight" for i in range(_COPIES - 1)))
                      for stacked, name in (("altup_proj.weight", "altup_projections"),
                                            ("altup_unembd_proj.weight", "altup_unembed_projections")))
#: What llama.cpp fixes for every gemma3n file: the first layer whose keys and values another reads, the layers
#: whose MLP gates it cuts and the quantile it cuts them at, the full-attention period, the sliding layers' rope
#: base and the final soft-cap.
_KV_FROM, _SPARSE_LAYERS, _SPARSITY, _PERIOD, _SLIDING_BASE, _SOFTCAP = 20, 10, 0.95, 5, 10_000.0, 30.0


def _refuse(meta: Metadata, key: str, value: Any, runs: str) -> None:
    raise UnsupportedFeatureError(f"{meta.where}: {key} {value!r} is not supported: llama.cpp runs every gemma3n file "
                                  f"with {runs}, which this file's model does not")


def _sparsity(meta: Metadata, p: str, layers: int) -> list[float]:
    """llama.cpp's activation sparsity (the first 10 layers' at 0.95), checked against the file's quantiles."""
    pattern = [_SPARSITY if i < _SPARSE_LAYERS else 0.0 for i in range(layers)]
    scales = meta.get(p + "activation_sparsity_scale")
    if scales is None:
        return pattern
    cut = NormalDist().inv_cdf(_SPARSITY)
    fits = isinstance(scales, list) and len(scales) == layers and all(
        abs(s - cut) < 1e-5 if share else s == float("-inf") for s, share in zip(scales, pattern))
    if not fits:
        _refuse(meta, p + "activation_sparsity_scale", scales,
                f"the first {_SPARSE_LAYERS} layers' MLP gates cut at the normal {_SPARSITY} quantile ({cut:.7f}) "
                "and no other layer's")
    return pattern


def _sliding_flags(stated: int | list[Any], layers: int) -> list[bool]:
    """A flag per layer, or llama.cpp's period (set_swa_pattern: the last layer of every ``stated`` full; 0: none)."""
    if isinstance(stated, list):
        return [bool(f) for f in stated]
    return [stated == 0 or i % stated < stated - 1 for i in range(layers)]


def gemma3n_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma3nTextConfig's keys as llama.cpp runs the file (see the module docstring)."""
    layers = cfg["num_hidden_layers"]
    copies = meta.get(p + "altup.num_inputs", _COPIES)
    if copies != _COPIES:
        _refuse(meta, p + "altup.num_inputs", copies, f"{_COPIES} AltUp copies (the converter writes no other)")
    types = ["full_attention" if (i + 1) % _PERIOD == 0 else "sliding_attention" for i in range(layers)]
    stated = meta.get(p + "attention.sliding_window_pattern")
    if stated is not None and _sliding_flags(stated, layers) != [t == "sliding_attention" for t in types]:
        _refuse(meta, p + "attention.sliding_window_pattern", stated,
                f"one full-attention layer in every {_PERIOD}, the rest sliding")
    shared = meta.get(p + "attention.shared_kv_layers", 0)
    if shared != max(0, layers - _KV_FROM):
        _refuse(meta, p + "attention.shared_kv_layers", shared,
                f"keys and values computed by the first {_KV_FROM} layers, read by the later ones")
    base = meta.get(p + "rope.freq_base_swa")
    if base is not None and float32_value(base) != _SLIDING_BASE:
        _refuse(meta, p + "rope.freq_base_swa", base, f"its sliding layers' rope at base {_SLIDING_BASE:g}")
    softcap = meta.get(p + "final_logit_softcapping")
    if softcap is not None and float32_value(softcap) != _SOFTCAP:
        _refuse(meta, p + "final_logit_softcapping", softcap, f"its logits capped at {_SOFTCAP:g}")
    widths = meta.need(p + "feed_forward_length")
    widths = [int(w) for w in widths] if isinstance(widths, list) else int(widths)
    laurel, per_layer = (meta.tensor(name) for name in ("blk.0.laurel_l.weight", "per_layer_token_embd.weight"))
    return {
        "intermediate_size": widths, "layer_types": types,
        "sliding_window": int(meta.need(p + "attention.sliding_window")),
        "num_kv_shared_layers": shared, "rope_local_base_freq": _SLIDING_BASE, "final_logit_softcapping": _SOFTCAP,
        "activation_sparsity_pattern": _sparsity(meta, p, layers),
        "altup_num_inputs": copies, "altup_active_idx": meta.get(p + "altup.active_idx", 0),
        "altup_correct_scale": True,
        "hidden_size_per_layer_input": int(meta.need(p + "embedding_length_per_layer_input")),
        # GGUF lists rows last: Laurel's rank, the per-layer table's vocabulary (padded to the full one)
        **({"laurel_rank": int(laurel.shape[-1])} if laurel is not None else {}),
        **({"vocab_size_per_layer_input": int(per_layer.shape[-1])} if per_layer is not None else {}),
    }
