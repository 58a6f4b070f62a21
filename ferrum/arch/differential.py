"""DiffLlama's differential attention, composed from one ordinary attention over wider heads.

transformers (models/diffllama) attends twice with the same queries and keys: once over the first half of the
key/value heads' values, repeated to every head (``v1``), once over the second half (``v2``); the outputs are joined
per head into ``2 * d`` dims, the first half of the heads minus ``lambda`` times the second half, each such pair RMS
normed without a weight and scaled by ``1 - lambda_init``. Ferrum runs it as one attention over heads of ``2 * d``
dims: q and k padded with zero dims (scores unchanged; rope turns their first ``d``), and key/value head ``g``'s value
made ``[v[g % (kv / 2)], v[kv / 2 + g % (kv / 2)]]`` at load, so every head's output is its ``[o1, o2]``. The KV pool
so holds twice the keys' dims. ``lambda = exp(sum(q1 * k1)) - exp(sum(q2 * k2)) + lambda_init``, from the layer's
four ``lambda_*`` vectors, is one number per layer, computed at load.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

#: A layer's parameters of lambda, ``[d]`` each.
LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def lambda_init(layer: int) -> float:
    """transformers' ``lambda_init_fn``."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


def paired_values(v: np.ndarray, kv_heads: int) -> np.ndarray:
    """v_proj's rows ``[kv * d, ...]`` -> ``[kv * 2d, ...]``: head ``g``'s rows, then head ``kv/2 + g``'s (``g`` taken
    modulo ``kv / 2``)."""
    heads = np.asarray(v).reshape(kv_heads, -1, *np.shape(v)[1:])
    half = kv_heads // 2
    pairs = [np.concatenate([heads[g % half], heads[half + g % half]]) for g in range(kv_heads)]
    return np.concatenate(pairs)


def layer_lambda(ops: Any, tensor: Callable[[str], Any], layer: int) -> float:
    """The layer's lambda from its placed ``lambda_*`` vectors, each product summed in float32."""
    q1, k1, q2, k2 = (np.asarray(ops.to_numpy(tensor(f"self_attn.{name}")), dtype=np.float32) for name in LAMBDAS)
    return float(np.exp(np.sum(q1 * k1)) - np.exp(np.sum(q2 * k2)) + np.float32(lambda_init(layer)))


def combine(ops: Any, eps: float, heads: int, head_dim: int, lam: float, weight: Any) -> Callable[[Any], Any]:
    """``flat [T, heads * head_dim]`` (each head ``[o1, o2]``) -> ``[T, heads * head_dim / 2]``: the first half of
    the heads minus ``lam`` times the second, each head RMS normed times ``weight`` (``1 - lambda_init``)."""
    half = heads * head_dim // 2

    def joined(flat: Any) -> Any:
        first, second = ops.split(flat, (half, half))
        diff = ops.add(first, ops.mul_scalar(second, -lam))
        normed = ops.rms_norm(ops.reshape(diff, (-1, head_dim)), weight, eps)
        return ops.reshape(normed, (-1, half))

    return joined


def combine_for(ops: Any, tensor: Callable[[str], Any], config: Any, layer: int, dtype: str) -> Callable[[Any], Any]:
    """Layer ``layer``'s :func:`combine`: its lambda from its placed ``lambda_*`` vectors, its heads normed and
    scaled by ``1 - lambda_init`` (a weight of ``dtype``)."""
    scale = np.full(config.head_dim, 1 - lambda_init(layer), dtype=np.float32)
    return combine(ops, config.rms_norm_eps, config.num_heads, config.head_dim, layer_lambda(ops, tensor, layer),
                   ops.from_numpy(scale, dtype))
