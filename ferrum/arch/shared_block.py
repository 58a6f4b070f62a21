"""Zamba 2's shared transformer blocks: a few attention + MLP blocks whose weights serve many layers.

A hybrid layer (``LayerSpec.mixer`` "shared_mamba2", its use of a block in ``LayerSpec.shared_use``) runs, before its
Mamba-2 mixer, one shared block on the RMS-normed concatenation of the residual stream and the token embeddings
(twice the hidden size), its attention (heads of ``2 * hidden / heads`` dims, its own KV pool layer per use) and
gated GELU MLP each widened by a low-rank adapter of that use, then the use's own ``linear``; that output joins the
Mamba-2 mixer's input only (``x + mamba(norm(x + t))``), never the residual stream. Uses ``j`` and ``j +
num_blocks`` share block ``j % num_blocks``, which transformers stores once, in the layer of its first use; the
other uses read those placed weights (``Architecture.aliases``), so the memory is the checkpoint's. transformers 5
ties the blocks only where it ties the embeddings (``tie_word_embeddings``, as every release does); else each use
runs a block of its own, stored in its layer with the adapters of its block's uses, and so does Ferrum (``tied``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.mamba2 import Mamba2Spec
from ferrum.recurrent.state import StateShapes

#: The shared block's module in the layer that stores it, and the hybrid layer's Mamba-2 and its norm.
BLOCK, MAMBA, MAMBA_NORM = "shared_transformer", "mamba_decoder.mamba", "mamba_decoder.input_layernorm"
ATTENTION, MLP = f"{BLOCK}.self_attn", f"{BLOCK}.feed_forward"
#: The adapted projections, each as ``<module>_adapter_list.<use>.0`` (down) and ``.1`` (up).
QKV_ADAPTERS = ("linear_q", "linear_k", "linear_v")


@dataclass(frozen=True)
class SharedBlockSpec:
    """The shared blocks' sizes, which layers use them, and the hybrid layers' Mamba-2 (module :data:`MAMBA`)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    uses: tuple[int, ...]  # the hybrid layers, in order: use j is uses[j]
    num_blocks: int
    adapter_rank: int
    qkv_adapters: bool  # use_shared_attention_adapter: q/k/v adapted too (the MLP always is)
    mamba: Mamba2Spec
    tied: bool = True  # the uses of a block share it (else each has its own copy, in its layer)

    title = "Mamba-2"  # what error messages call the mixer
    module = MAMBA
    taps = "conv1d"

    def home(self, use: int) -> int:
        """The layer that stores use ``use``'s block (that block's first use)."""
        return self.uses[use % self.num_blocks]

    @property
    def aliases(self) -> tuple[tuple[str, str], ...]:
        """``(alias, source)`` layer module prefixes: each later use reads its block from the block's first."""
        return tuple((f"layers.{layer}.{BLOCK}.", f"layers.{self.home(j)}.{BLOCK}.")
                     for j, layer in enumerate(self.uses) if j >= self.num_blocks and self.tied)

    @property
    def unloaded(self) -> str | None:
        """The later uses' copies of their block, where a checkpoint holds them: transformers ties them to the first."""
        later = self.uses[self.num_blocks:] if self.tied else ()
        return rf"layers\.({'|'.join(map(str, later))})\.{BLOCK}\." if later else None

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """Every hybrid layer's own tensors: its Mamba-2, that mixer's norm and ``linear``."""
        return {**self.mamba.tensors(hidden), f"{MAMBA_NORM}.weight": (hidden,), "linear.weight": (hidden, hidden)}

    def stored_at(self, use: int) -> dict[str, tuple[int, ...]]:
        """The block tensors stored in use ``use``'s layer: the whole block and its uses' adapters where it is the
        block's first use (or the blocks are not ``tied``), else none."""
        if use >= self.num_blocks and self.tied:
            return {}
        wide, q, kv, r = 2 * self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.adapter_rank
        out = {f"{BLOCK}.input_layernorm.weight": (wide,), f"{BLOCK}.pre_ff_layernorm.weight": (self.hidden,),
               f"{ATTENTION}.q_proj.weight": (q, wide), f"{ATTENTION}.k_proj.weight": (kv, wide),
               f"{ATTENTION}.v_proj.weight": (kv, wide), f"{ATTENTION}.o_proj.weight": (self.hidden, q),
               f"{MLP}.gate_up_proj.weight": (2 * self.intermediate, self.hidden),
               f"{MLP}.down_proj.weight": (self.hidden, self.intermediate)}
        for j in range(use % self.num_blocks, len(self.uses), self.num_blocks):
            out.update({f"{MLP}.gate_up_proj_adapter_list.{j}.0.weight": (r, self.hidden),
                        f"{MLP}.gate_up_proj_adapter_list.{j}.1.weight": (2 * self.intermediate, r)})
            if self.qkv_adapters:
                for name in QKV_ADAPTERS:  # each as wide as the block's input (so k and v have all the heads)
                    out.update({f"{ATTENTION}.{name}_adapter_list.{j}.0.weight": (r, wide),
                                f"{ATTENTION}.{name}_adapter_list.{j}.1.weight": (wide, r)})
        return out

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """The Mamba-2's tensors as :class:`Mamba2Spec` splits them; the MLP's ``gate_up_proj`` and its adapters'
        up halves cut into gate and up rows (``torch.chunk``'s halves), so no output is split per pass."""
        if f".{MAMBA}." in name:
            return self.mamba.split(name, tensor, take_rows)
        if ".gate_up_proj." in name or (".gate_up_proj_adapter_list." in name and name.endswith(".1.weight")):
            inter = self.intermediate
            return [(name.replace("gate_up_proj", part), take_rows(tensor, np.arange(lo, lo + inter)))
                    for part, lo in (("gate_proj", 0), ("up_proj", inter))]
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        return self.mamba.state_shapes(dtype)

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any], eps: float,
              use: int) -> SharedBlockLayer:
        return SharedBlockLayer(self, ops, tensor, projection, eps, use)


class Adapted:
    """Projections of one input each widened by its low-rank adapter: ``base(x) + up(down(x))``, one ``down`` per
    adapter (or one shared by several ``ups``: the MLP's gate and up halves)."""

    def __init__(self, ops: Any, base: list[Any], downs: list[Any], ups: list[list[Any]]):
        self.ops, self.base, self.downs, self.ups = ops, base, downs, ups

    @property
    def linears(self) -> list[Any]:
        return [*self.base, *self.downs, *(u for ups in self.ups for u in ups)]

    def __call__(self, x: Any) -> list[Any]:
        low = [down(x) for down in self.downs]
        extra = [up(a) for a, ups in zip(low, self.ups) for up in ups]
        return [self.ops.add(p(x), e) for p, e in zip(self.base, extra)] if extra else [p(x) for p in self.base]


class SharedBlockLayer:
    """One hybrid layer's weights: its use's block (q/k/v with their adapters, o_proj, the MLP with its adapter, the
    norms), its ``linear``, and its Mamba-2 (whose ``project`` / ``mix`` / ``output`` it offers as its own)."""

    def __init__(self, spec: SharedBlockSpec, ops: Any, tensor: Callable[[str], Any],
                 projection: Callable[[str], Any], eps: float, use: int):
        self.spec, self.ops, self.eps = spec, ops, eps
        self.mamba = spec.mamba.layer(ops, tensor, projection, eps)
        self.input_norm, self.ff_norm = tensor(f"{BLOCK}.input_layernorm.weight"), tensor(
            f"{BLOCK}.pre_ff_layernorm.weight")
        self.mamba_norm = tensor(f"{MAMBA_NORM}.weight")

        def adapter(module: str) -> tuple[Any, Any]:
            return projection(f"{module}_adapter_list.{use}.0"), projection(f"{module}_adapter_list.{use}.1")

        base = [projection(f"{ATTENTION}.{p}") for p in ("q_proj", "k_proj", "v_proj")]
        pairs = [adapter(f"{ATTENTION}.{name}") for name in QKV_ADAPTERS] if spec.qkv_adapters else []
        self.qkv = Adapted(ops, base, [d for d, _ in pairs], [[u] for _, u in pairs])
        self.o = projection(f"{ATTENTION}.o_proj")
        down = projection(f"{MLP}.gate_up_proj_adapter_list.{use}.0")
        ups = [projection(f"{MLP}.gate_up_proj_adapter_list.{use}.1".replace("gate_up_proj", p))
               for p in ("gate_proj", "up_proj")]
        self.gate_up = Adapted(ops, [projection(f"{MLP}.gate_proj"), projection(f"{MLP}.up_proj")], [down], [ups])
        self.down, self.linear = projection(f"{MLP}.down_proj"), projection("linear")

    def projections(self) -> list[Any]:
        return [*self.qkv.linears, self.o, *self.gate_up.linears, self.down, self.linear, *self.mamba.projections()]

    def attention_input(self, x: Any, embedded: Any, n: int) -> Any:
        """RMSNorm of ``[x, embedded]`` (``n`` rows each) joined along the features: the rows of both interleaved,
        then each pair of rows read as one row of twice the width."""
        ops = self.ops
        order = np.stack([np.arange(n), n + np.arange(n)], axis=1).reshape(-1).astype(np.int32)
        joined = ops.reshape(ops.take_rows(ops.concat([x, embedded]), ops.from_numpy(order, None)),
                             (n, 2 * self.spec.hidden))
        return ops.rms_norm(joined, self.input_norm, self.eps)

    def after_attention(self, attended: Any) -> Any:
        """The block's MLP (its gate GELU, exact) on the normed attention output, then the use's ``linear``."""
        ops = self.ops
        gate, up = self.gate_up(ops.rms_norm(attended, self.ff_norm, self.eps))
        return self.linear(self.down(ops.mul(ops.gelu(gate, False), up)))

    def mamba_input(self, x: Any, block: Any) -> Any:
        """The Mamba-2's normed input: the residual stream plus the block's output."""
        return self.ops.rms_norm(self.ops.add(x, block), self.mamba_norm, self.eps)

    def project(self, x: Any) -> tuple[Any, ...]:
        return self.mamba.project(x)

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, Any], cu_seqlens: np.ndarray) -> tuple[Any, tuple, tuple]:
        return self.mamba.mix(inputs, states, cu_seqlens)

    def output(self, y: Any, z: Any) -> Any:
        return self.mamba.output(y, z)
