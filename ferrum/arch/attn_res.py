"""Attention residuals (Kimi K3's ``attn_res_block_size``, as mlx-lm's kimi_k3 runs them): in place of one residual
sum, each sub-layer reads a softmax mix of the blocks' outputs so far.

The stream is the stored blocks ``b_0 .. b_{K-1}`` (``b_0`` the embeddings, each later one the sum of a block of
``block_size`` layers' outputs) and the running sum ``p`` of the current block's outputs, each ``[T, H]``. Before
attention and before the MLP, a layer reads ``mix(b_0 .. b_{K-1}, p)``: per token, ``softmax_k(proj . RMSNorm(v_k;
norm))`` over ``v = (b_0 .. b_{K-1}, p)``, times ``v_k``, summed (``_attn_res_combine``), with the sub-layer's own
``proj`` ``[1, H]`` and ``norm`` weight; with no stored block the read is ``p``. A layer starting a block (index a
multiple of ``block_size``) stores ``p`` as a block after its attention's read, and its outputs start ``p`` afresh.
After the last layer the output's own mix (``output_attn_res``) is what the final norm reads.

Each mix is one ``attention`` op call, tokens as heads: the ``K + 1`` arrays joined along rows (``concat``) are the
values, seen ``[K + 1, T, H]``, and, RMS-normed by the norm weight, the keys; the one query per head is ``proj``
tiled over the tokens (``linear`` of zeros with a zero weight and ``proj`` as its bias); scale 1. The mix is exact
below float32 rounding and row-wise in the tokens, as ``compile_fn`` needs. The stored blocks are carried past the
mixer step into the block's second half (:attr:`AttnResSpec.carries`), so a pass is never narrowed to its logit rows
at the last KV write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.errors import UnsupportedFeatureError

#: Each layer's two mixes (mlx-lm's modules), before attention and before the MLP.
MIXES = ("self_attention_res", "mlp_res")
#: The output's mix, under the decoder's prefix.
OUTPUT = "output_attn_res"


#: Ferrum's (mlx-lm's) tensor names -> the release's (``<mix>.proj_weight``, ``<mix>.norm_weight``), as
#: ``Architecture.stored_names`` takes them.
RELEASE_NAMES = {f"{m}_{part}.weight": f"{m}.{part}_weight" for m in (*MIXES, OUTPUT) for part in ("proj", "norm")}


@dataclass(frozen=True)
class AttnResSpec:
    """The layers per block (attn_res_block_size) and the mixes' RMS epsilon (rms_norm_eps)."""

    block_size: int
    eps: float
    name = "attention residuals (Kimi K3's attn_res_block_size)"
    #: The stream's stored blocks are handed to each block's second half besides the mixer step's arrays.
    carries = True

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """The model's tensors (names under the decoder's prefix) and their shapes."""
        return {f"{OUTPUT}_proj.weight": (1, hidden), f"{OUTPUT}_norm.weight": (hidden,)}

    def layer_tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """Each layer's tensors (names under the layer) and their shapes."""
        return {f"{m}_{part}.weight": shape for m in MIXES for part, shape in (("proj", (1, hidden)),
                                                                               ("norm", (hidden,)))}

    def holds(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` (Ferrum's naming) is a mix's projection, read as a query row."""
        return name.endswith("_res_proj.weight")

    def split(self, name: str, tensor: Any, hidden: int) -> list[tuple[str, Any]]:
        """A mix's ``proj [1, H]`` -> ``<mix>_query.bias [H]``: the bias that tiles it over the tokens."""
        if not isinstance(tensor, np.ndarray):
            raise UnsupportedFeatureError(f"{name}: an attention residual's projection is stored packed, which "
                                          "mlx-lm never does (its quant_predicate keeps res_proj float); load a "
                                          "checkpoint with it in float")
        return [(name.replace("_proj.weight", "_query.bias"), np.asarray(tensor).reshape(hidden))]

    def stream(self, model: Any, weights: Callable[[str], Any], projection: Callable[[str], Any]) -> AttnResStream:
        """The model's ends of the stream (``weights``: by name under the decoder's prefix)."""
        return AttnResStream(model.ops, self, model.config.hidden_size, model.dtype, weights)

    def layer(self, model: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              index: int) -> AttnResLayer:
        """Layer ``index``'s two mixes (``tensor``: the layer's placed weights)."""
        return AttnResLayer(model.wide, tensor, index)


class _Mix:
    """One sub-layer's read of the stream: its query row and norm weight."""

    __slots__ = ("stream", "query", "norm")

    def __init__(self, stream: AttnResStream, tensor: Callable[[str], Any], module: str):
        from ferrum.weights import Linear  # imported here: ferrum.weights reads the family table

        self.stream, self.norm = stream, tensor(f"{module}_norm.weight")
        self.query = Linear(stream.zero_column, tensor(f"{module}_query.bias"))

    def __call__(self, blocks: tuple, p: Any) -> Any:
        """``mix(blocks, p)`` (``p`` alone where no block is stored), ``[T, H]``."""
        if not blocks:
            return p
        ops, hidden, n = self.stream.ops, self.stream.hidden, len(blocks) + 1
        values = ops.concat([*blocks, p])
        keys = ops.reshape(ops.rms_norm(values, self.norm, self.stream.spec.eps), (n, -1, hidden))
        query = ops.reshape(self.query(self.stream.zero_row(p)), (1, -1, hidden))
        mixed = ops.attention(query, keys, ops.reshape(values, (n, -1, hidden)), 1.0, None, None, None, None)
        return ops.reshape(mixed, (-1, hidden))


class AttnResStream:
    """The model's ends of the stream (:meth:`widen`, :meth:`narrow`) and the zero matrices the mixes tile with."""

    def __init__(self, ops: Any, spec: AttnResSpec, hidden: int, dtype: str, weights: Callable[[str], Any]):
        from ferrum.weights import Linear, place  # imported here: ferrum.weights reads the family table

        self.ops, self.spec, self.hidden = ops, spec, hidden
        self.zero_row = Linear(place(ops, "attn_res.zero_row", np.zeros((1, hidden), dtype=np.float32), dtype))
        self.zero_column = place(ops, "attn_res.zero_column", np.zeros((hidden, 1), dtype=np.float32), dtype)
        self.output = _Mix(self, weights, OUTPUT)

    def widen(self, h: Any) -> tuple:
        """The first layer's stream: no stored block, the embeddings as the running sum."""
        return (h,)

    def narrow(self, stream: tuple) -> Any:
        """The output's mix of the stream after the last layer, before the final norm."""
        return self.output(stream[:-1], stream[-1])

    def projections(self) -> list[Any]:
        return []


class AttnResLayer:
    """One layer's mixes: its halves (``DecoderOnlyLLM._block_halves``) read the stream and carry its blocks."""

    def __init__(self, stream: AttnResStream, tensor: Callable[[str], Any], index: int):
        self.attn, self.mlp = (_Mix(stream, tensor, module) for module in MIXES)
        self.stored = -(-index // stream.spec.block_size)  # blocks stored before this layer
        self.starts = index % stream.spec.block_size == 0

    def projections(self) -> list[Any]:
        return []

    def halves(self, model: Any, layer: Any, project: Callable, mixer_out: Callable,
               norm: Callable) -> tuple[Callable[..., tuple], Callable[..., tuple]]:
        """``enter(*blocks, p, positions)`` projects from attention's mix and hands ``p`` on; ``leave(mixed, p,
        *extra, *blocks)`` adds the mixer's output (storing ``p`` first where the layer starts a block), then the
        MLP's of its own mix."""

        def enter(*stream: Any) -> tuple:
            *blocks, p, positions = stream
            return project(norm(self.attn(tuple(blocks), p), layer.pre_attn), p, positions)

        def leave(mixed: Any, p: Any, *rest: Any) -> tuple:
            extra, blocks = (rest[:-self.stored], rest[-self.stored:]) if self.stored else (rest, ())
            y = mixer_out(mixed, *extra)
            blocks, p = ((*blocks, p), y) if self.starts else (blocks, model.ops.add(p, y))
            return (*blocks, model.ops.add(p, layer.mlp(norm(self.mlp(blocks, p), layer.pre_mlp))))

        return enter, leave
