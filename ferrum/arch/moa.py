"""JetMoE's mixture of attention heads (MoA, ``LayerSpec.mixer`` "moa"): each token's top-k attention experts each
give it a query projection and an output projection around keys and values shared by all experts (``kv_proj``).

transformers' ``JetMoeAttention`` lays slot ``j``'s queries out as heads ``j * kv + i`` and repeats the keys and
values ``top_k`` times in a tile (``repeat``, not ``repeat_interleave``), so query head ``j * kv + i`` reads key/value
head ``i``. Ferrum orders the heads ``(kv head i, slot j)`` instead, head ``i * top_k + j``, which ordinary
grouped-query attention over ``kv`` key/value heads (groups of ``top_k``) reads the same way: the KV cache stays at
``kv`` heads.

The experts are routed on the host (softmax over the top-k logits, as ``JetMoeTopKGating``); every expert's queries
come from one stacked linear and each token's heads are picked, reordered, by one ``take_rows``. Its slots' outputs,
each times its gate, are placed in the chosen expert's block of a row of ``E * kv * head_dim`` (zeros elsewhere), so
one linear with the experts' output projections side by side, biased by ``experts.bias``, sums them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.errors import UnsupportedFeatureError
from ferrum.moe.routing import route

MODULE = "self_attention"
#: The stored tensors (in a layer), and the names the model reads them by once prepared.
KV, QUERIES, OUTPUTS, BIAS, ROUTER = (f"{MODULE}.kv_proj", f"{MODULE}.experts.input_linear",
                                      f"{MODULE}.experts.output_linear", f"{MODULE}.experts.bias",
                                      f"{MODULE}.experts.router.layer")
K, V, Q_ALL, O_ALL = f"{MODULE}.k_proj", f"{MODULE}.v_proj", f"{MODULE}.q_experts", f"{MODULE}.o_experts"
#: The tensors the load splits or reorders on the host, from float only: what ``ferrum quantize`` keeps in float.
HOST_SPLIT = (KV, QUERIES, OUTPUTS)


@dataclass(frozen=True)
class MoaSpec:
    """The attention experts' sizes: ``num_experts`` of which each token takes ``top_k``, ``kv_heads`` heads of
    ``head_dim`` each (the model's heads are ``kv_heads * top_k``)."""

    num_experts: int
    top_k: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.kv_heads * self.head_dim

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        e, w = self.num_experts, self.width
        return {f"{KV}.weight": (2 * w, hidden), f"{QUERIES}.weight": (e, w, hidden),
                f"{OUTPUTS}.weight": (e, hidden, w), BIAS: (hidden,), f"{ROUTER}.weight": (e, hidden)}

    def split(self, name: str, tensor: Any) -> list[tuple[str, Any]]:
        """``kv_proj`` cut into keys and values (``chunk(2)``); the stacked query projections ``[E, w, hidden]`` as
        one matrix ``[E * w, hidden]``; the output projections ``[E, hidden, w]`` side by side, ``[hidden, E * w]``,
        with ``experts.bias`` as their bias."""
        w = self.width
        if f".{KV}." in name:
            return [(name.replace(KV, K), _host(name, tensor)[:w]), (name.replace(KV, V), _host(name, tensor)[w:])]
        if f".{QUERIES}." in name:
            return [(name.replace(QUERIES, Q_ALL), _host(name, tensor).reshape(-1, np.shape(tensor)[-1]))]
        if f".{OUTPUTS}." in name:
            stack = _host(name, tensor)
            return [(name.replace(OUTPUTS, O_ALL), np.ascontiguousarray(stack.transpose(1, 0, 2)).reshape(
                stack.shape[1], -1))]
        if name.endswith(f".{BIAS}"):
            return [(name.replace(BIAS, f"{O_ALL}.bias"), tensor)]
        return [(name, tensor)]

    def layer(self, ops: Any, projection: Callable[[str], Any], dtype: str) -> MoaLayer:
        return MoaLayer(self, ops, projection, dtype)


def _host(name: str, tensor: Any) -> np.ndarray:
    if not isinstance(tensor, np.ndarray):
        raise UnsupportedFeatureError(f"{name}: JetMoE's attention experts are read from float checkpoints only; "
                                      "load the unquantized checkpoint")
    return tensor


class MoaLayer:
    """One layer's attention experts: the router, every expert's queries in one linear, keys and values, and the
    experts' output projections in one biased linear."""

    def __init__(self, spec: MoaSpec, ops: Any, projection: Callable[[str], Any], dtype: str):
        self.spec, self.ops = spec, ops
        self.router, self.queries = projection(ROUTER), projection(Q_ALL)
        self.keys, self.values, self.o = projection(K), projection(V), projection(O_ALL)
        self.zero = ops.from_numpy(np.zeros((1, spec.head_dim), dtype=np.float32), dtype)  # an unchosen block's rows

    @property
    def linears(self) -> list[Any]:
        return [self.router, self.queries, self.keys, self.values]

    def __call__(self, x: Any) -> list[Any]:
        """``[router logits, every expert's queries, k, v]``."""
        return [self.router(x), self.queries(x), self.keys(x), self.values(x)]

    def route(self, logits: Any) -> tuple[np.ndarray, np.ndarray]:
        """Each token's experts and gates on the host: ``(ids [T, k], weights [T, k])``."""
        return route(self.ops.to_numpy(logits), self.spec.top_k, True)

    def heads(self, queries: Any, ids: np.ndarray) -> Any:
        """``[T, kv * k, head_dim]``: head ``i * k + j`` is key/value head ``i``'s query of slot ``j``'s expert,
        picked from every expert's rotated queries ``[T, E * kv, head_dim]``."""
        s, ops = self.spec, self.ops
        t = np.arange(len(ids))[:, None, None]
        rows = (t * s.num_experts + ids[:, None, :]) * s.kv_heads + np.arange(s.kv_heads)[None, :, None]
        picked = ops.take_rows(ops.reshape(queries, (-1, s.head_dim)), ops.from_numpy(rows.reshape(-1).astype(
            np.int32), None))
        return ops.reshape(picked, (-1, s.kv_heads * s.top_k, s.head_dim))

    def placed(self, attended: Any, ids: np.ndarray, weights: np.ndarray) -> Any:
        """``[T, E * kv * head_dim]``: slot ``j``'s heads times its gate in its expert's block, zeros elsewhere."""
        s, ops = self.spec, self.ops
        n, heads = len(ids), s.kv_heads * s.top_k
        rows = ops.reshape(attended, (-1, s.head_dim))  # row t * heads + i * k + j
        gates = np.broadcast_to(weights[:, None, :], (n, s.kv_heads, s.top_k)).reshape(-1, 1)
        gated = ops.concat([ops.mul(rows, ops.from_numpy(np.ascontiguousarray(gates, dtype=np.float32), None)),
                            self.zero])
        slot = np.full((n, s.num_experts), -1)
        np.put_along_axis(slot, ids.astype(np.int64), np.arange(s.top_k)[None, :], axis=1)
        t, i = np.arange(n)[:, None, None], np.arange(s.kv_heads)[None, None, :]
        source = np.where(slot[:, :, None] >= 0, t * heads + i * s.top_k + slot[:, :, None], n * heads)
        picked = ops.take_rows(gated, ops.from_numpy(source.reshape(-1).astype(np.int32), None))
        return ops.reshape(picked, (n, s.num_experts * s.width))
