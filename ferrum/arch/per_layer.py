"""Gemma 4 and Gemma 3n E2B / E4B's per-layer inputs: a second token embedding giving every layer an input of its own.

They are computed once per pass, before the first block, from the token ids and the scaled token embeddings
``h``, as transformers' Gemma4TextModel computes them (``size`` is hidden_size_per_layer_input)::

    looked_up = embed_tokens_per_layer(ids) * sqrt(size)                      [T, layers * size]
    context = per_layer_projection_norm(per_layer_model_projection(h) / sqrt(hidden)), normed per layer's slice
    inputs = (context + looked_up) / sqrt(2)                                  layer i's: columns [i * size, +size)

and each block, once its MLP has joined the residual stream ``s``, adds
``post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(s)) * inputs[i]))``, before its
layer_scalar. The table (vocab x layers x size: 4.7 GB of E2B's bfloat16 weights) is read a few rows a step, so it
is placed as an embedding (a lookup table, where a quantized checkpoint keeps it packed) and counted as one
(``DecoderOnlyLLM.lookup_weight_bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ferrum.weights import Placed

#: The model's tensors, under the decoder's prefix.
TABLE = "embed_tokens_per_layer.weight"
MODEL_PROJECTION = "per_layer_model_projection.weight"
MODEL_NORM = "per_layer_projection_norm.weight"


@dataclass(frozen=True)
class PerLayerInputs:
    """The per-layer inputs of an architecture: ``size`` per layer (hidden_size_per_layer_input), looked up in a
    table of ``vocab`` rows (vocab_size_per_layer_input)."""

    size: int
    vocab: int

    def tensors(self, hidden: int, layers: int) -> dict[str, tuple[int, ...]]:
        """The model's tensors (names under the decoder's prefix) and their shapes."""
        return {TABLE: (self.vocab, layers * self.size), MODEL_PROJECTION: (layers * self.size, hidden),
                MODEL_NORM: (self.size,)}

    def cover(self, table: Any, vocab: int, take_rows: Any) -> Any:
        """The table with a copy of row 0 for each id past its rows (Gemma 3n's vision and audio tokens), which
        transformers' Gemma3nTextModel looks row 0 up for; ``take_rows(table, order)`` reads rows of a dense or
        packed table."""
        rows = self.vocab
        if rows >= vocab:
            return table
        return take_rows(table, np.concatenate([np.arange(rows), np.zeros(vocab - rows, dtype=np.int64)]))

    def layer_tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """Each layer's tensors (names under the layer) and their shapes."""
        return {"per_layer_input_gate.weight": (self.size, hidden),
                "per_layer_projection.weight": (hidden, self.size),
                "post_per_layer_input_norm.weight": (hidden,)}


class PerLayerEmbedding:
    """The placed model tensors; ``self(ids, h)`` is every layer's input, ``[T, size]`` each."""

    def __init__(self, ops: Any, config: Any, weights: dict[str, Placed]):
        from ferrum.weights import Linear  # imported here: ferrum.weights reads the family table, which reads this

        prefix = config.arch.prefix
        table = weights[prefix + TABLE]
        self.table, self.lookup = table.weight, table.embedding
        self.projection = Linear(weights[prefix + MODEL_PROJECTION])
        self.norm = weights[prefix + MODEL_NORM].weight
        self.ops, self.size, self.layers = ops, config.arch.per_layer_inputs.size, config.num_layers
        self.hidden, self.eps = config.hidden_size, config.rms_norm_eps

    def __call__(self, ids: Any, h: Any) -> list[Any]:
        ops, size = self.ops, self.size
        looked_up = ops.mul_scalar(self.lookup(self.table, ids), math.sqrt(size))
        context = ops.mul_scalar(self.projection(h), self.hidden ** -0.5)
        context = ops.reshape(ops.rms_norm(ops.reshape(context, (-1, size)), self.norm, self.eps),
                              (-1, self.layers * size))
        return ops.split(ops.mul_scalar(ops.add(context, looked_up), 2.0 ** -0.5), (size,) * self.layers)


class PerLayerMix:
    """One layer's gate, projection and norm: ``self(s, inputs)`` is what the layer adds to its stream ``s``."""

    __slots__ = ("ops", "gate", "projection", "norm", "act", "eps")

    def __init__(self, ops: Any, projection: Any, tensor: Any, act: Any, eps: float):
        """``projection(module)`` / ``tensor(name)``: the layer's placed weights (``DecoderOnlyLLM._layer``'s);
        ``act(gate, up)``: the architecture's gated activation op."""
        self.ops, self.act, self.eps = ops, act, eps
        self.gate, self.projection = projection("per_layer_input_gate"), projection("per_layer_projection")
        self.norm = tensor("post_per_layer_input_norm.weight")

    def __call__(self, stream: Any, inputs: Any) -> Any:
        return self.ops.rms_norm(self.projection(self.act(self.gate(stream), inputs)), self.norm, self.eps)
