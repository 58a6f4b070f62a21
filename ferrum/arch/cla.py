"""Cross-layer attention whose sharing layers norm the shared keys themselves (Hunyuan-Large's CLA): a layer reads the
keys and values its source layer projected, but rotates and RMS-norms those keys with its own ``key_layernorm``.

Ferrum's sharing layers attend the source's cached keys, normed with the source's weight (``LayerSpec.kv_source``).
Per head dim the layer's own normed key is the source's times ``own / source`` (the same RMS divides both), so that
ratio folded into the layer's query norm weight at load gives its scores exactly, and the KV pool keeps one layer
per source (``LayerSpec.own_key_norm``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ferrum.errors import UnsupportedFeatureError


def query_norm_parts(config: Any, name: str) -> tuple[str, ...]:
    """The stored tensors the query norm ``name`` of a layer with its own key norm is made of: itself, the layer's key
    norm and its source's; () for any other tensor. ``name`` is the checkpoint's (its layer's number read from Llama's
    name: PLaMo's are stored under ``layers.layers``)."""
    from ferrum.arch.tensors import _layer_of, model_name, stored_name  # here: ferrum.arch.tensors reads ferrum.weights

    arch = config.arch
    if not any(layer.own_key_norm for layer in arch.layers):  # no layer folds a key norm (every family but Hunyuan)
        return ()
    index = _layer_of(model_name(arch, name), arch.prefix)
    if index is None or index >= len(arch.layers) or not arch.layers[index].own_key_norm:
        return ()
    query, key = (f"self_attn.{norm}.weight" for norm in arch.qk_norm_names)
    if name != stored_name(arch, f"{arch.prefix}layers.{index}.{query}"):
        return ()
    return name, *(stored_name(arch, f"{arch.prefix}layers.{layer}.{key}")
                   for layer in (index, arch.layers[index].kv_source))


def folded_query_norm(parts: dict[str, Any], names: tuple[str, ...], where: str) -> np.ndarray:
    """The query norm weight of ``names`` (:func:`query_norm_parts`) times the ratio of the layer's key norm weight to
    its source's; a source weight of 0 where the layer's is not cannot be folded so, and is refused."""
    query, own, source = (np.asarray(parts[name], dtype=np.float32) for name in names)
    lost = (source == 0) & (own != 0)
    if lost.any():
        raise UnsupportedFeatureError(
            f"{where}: {names[2]} is 0 in dims {np.flatnonzero(lost).tolist()} where {names[1]} is not; Ferrum folds "
            f"the ratio of the two into {names[0]} (its layer attends the keys its source layer normed), which such "
            "a weight leaves undefined: the checkpoint cannot be run with its cross-layer attention")
    return query * np.divide(own, source, out=np.zeros_like(own), where=source != 0)
