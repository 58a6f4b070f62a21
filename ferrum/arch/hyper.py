"""Hyper-connections (Hy4's iHC, transformers' ``HYV4HyperConnection`` / ``HYV4HyperHead``): the residual stream
is ``copies`` streams that each block reads a mix of and writes its output back into, each with its own weight.

Before attention and before the MLP of every block, with ``X [T, N, H]`` the streams and ``flat`` their ``N * H``
numbers per token, ``mixes = (flat @ fn.T) / sqrt(mean(flat ** 2) + eps)`` (``fn [2N, N*H]``), ``pre = sigmoid(
mixes[:N] * scale[0] + base[:N]) + hc_eps``, ``post = magnitude * sigmoid(mixes[N:] * scale[1] + base[N:]) +
hc_eps``; the sub-layer reads ``sum_j pre_j X_j`` (normed by its block norm) and its output ``y`` joins every
stream, ``X_j += post_j * y``. The embeddings start every stream; after the last block the head's ``pre`` (of its
own ``hc_fn``, ``hc_base``, ``hc_scale``, no ``post``) mixes them into the one the final norm reads.

The streams are held as one array ``[T, H * N]``, each token's streams interleaved (column ``h * N + j`` is stream
``j``'s dim ``h``), so everything is composed from ``linear``, ``rms_norm``, ``sigmoid_mul``, ``mul_scalar``,
``add`` and ``reshape``: ``fn``'s columns are permuted to that order at load; a mix's ``N`` logits are spread over
the ``H * N`` columns by a ``[H*N, N]`` matrix of the scale on its 0/1 pattern, with the base tiled as its bias
(``l * scale + base`` exactly as transformers computes it); ``[T, H*N]`` seen as ``[T*H, N]`` sums its streams
through a ``[1, N]`` row of ones, and ``y [T, H]`` seen as ``[T*H, 1]`` is copied to every stream by an ``[N, 1]``
column of ones. Products with 0 and 1 and sums with 0 are exact, so in float32 this is transformers' arithmetic up
to the order of its sums. As transformers does (``_keep_in_fp32_modules_strict``, autocast off), a model of another
dtype keeps these matrices in float32 (:attr:`HyperSpec.float32`) and mixes and writes in float32: the streams cast
once per read and per write, the read's mix and the written streams rounded once to the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

#: Each block's two connections (transformers' modules), before attention and before the MLP.
CONNECTIONS = ("attn_hc", "ffn_hc")
#: The head's module under the decoder's prefix.
HEAD = "hc_head"


@dataclass(frozen=True)
class HyperSpec:
    """The streams (hc_mult), the mixes' input norm epsilon (rms_norm_eps), the gates' epsilon (hc_eps) and the
    writes' magnitude (hc_magnitude)."""

    copies: int
    eps: float
    hc_eps: float
    magnitude: float
    name = "hyper-connections (Hy4's streams)"
    #: The stream is handed through the mixer step whole (nothing carried past it).
    carries = False

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """The model's tensors (names under the decoder's prefix) and their shapes."""
        n = self.copies
        return {f"{HEAD}.hc_fn": (n, n * hidden), f"{HEAD}.hc_base": (n,), f"{HEAD}.hc_scale": (1,)}

    def layer_tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """Each layer's tensors (names under the layer) and their shapes."""
        n = self.copies
        return {f"{c}.{p}": shape for c in CONNECTIONS
                for p, shape in (("fn", (2 * n, n * hidden)), ("base", (2 * n,)), ("scale", (2,)))}

    @property
    def float32(self) -> tuple[str, ...]:
        """The endings of the tensors :meth:`split` gives, placed in float32 (``Architecture.keep_float32``)."""
        return tuple(f".{kind}{part}" for kind in ("pre_", "post_", f"{HEAD}.")
                     for part in ("mix.weight", "tile.weight", "tile.bias"))

    def holds(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` (Ferrum's naming) is one of the connections'."""
        return any(f".{module}." in name for module in (*CONNECTIONS, HEAD))

    def split(self, name: str, tensor: Any, hidden: int) -> list[tuple[str, Any]]:
        """A connection's tensors as the model reads them (see the module docstring): ``fn`` -> the ``pre_mix`` and
        ``post_mix`` matrices, columns interleaved; ``scale`` -> the ``pre_tile`` and ``post_tile`` matrices;
        ``base`` -> their biases. The head's ``hc_fn``, ``hc_scale`` and ``hc_base`` -> ``mix`` and ``tile``."""
        n, module = self.copies, name.rsplit(".", 1)[0]
        values = np.asarray(tensor, dtype=np.float32)
        kinds = ("pre", "post") if not module.endswith(HEAD) else ("",)
        parts = np.split(values, len(kinds)) if values.size > 1 else [values] * len(kinds)
        out = []
        for kind, part in zip(kinds, parts):
            stem = f"{module}.{kind}_" if kind else f"{module}."
            if name.endswith("fn"):
                order = (np.arange(n)[None, :] * hidden + np.arange(hidden)[:, None]).reshape(-1)
                out.append((f"{stem}mix.weight", np.ascontiguousarray(part[:, order])))
            elif name.endswith("scale"):
                out.append((f"{stem}tile.weight", np.tile(np.eye(n, dtype=np.float32), (hidden, 1)) * part[0]))
            else:
                out.append((f"{stem}tile.bias", np.tile(part, hidden)))
        return out

    def stream(self, model: Any, weights: Callable[[str], Any], projection: Callable[[str], Any]) -> HyperStream:
        """The model's ends of the streams (``weights`` / ``projection``: by name under the decoder's prefix)."""
        return HyperStream(model.ops, self, model.config.hidden_size, model.dtype, projection)

    def layer(self, model: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              index: int) -> HyperLayer:
        """One block's two connections (``tensor`` / ``projection``: the layer's placed weights)."""
        return HyperLayer(model.wide, projection)


class _Mix:
    """One connection's (or the head's) read of the streams: ``pre`` and ``post`` spread over the streams' columns."""

    __slots__ = ("stream", "pre", "pre_tile", "post", "post_tile")

    def __init__(self, stream: HyperStream, projection: Callable[[str], Any], module: str, post: bool = True):
        self.stream = stream
        kinds = ("pre_", "post_") if post else ("",)
        self.pre, self.pre_tile = projection(f"{module}.{kinds[0]}mix"), projection(f"{module}.{kinds[0]}tile")
        self.post, self.post_tile = (projection(f"{module}.post_mix"), projection(f"{module}.post_tile")) if post else (
            None, None)

    def projections(self) -> list[Any]:
        return [p for p in (self.pre, self.pre_tile, self.post, self.post_tile) if p is not None]

    def read(self, s: Any) -> tuple[Any, Any]:
        """``(sum_j pre_j X_j [T, H]`` in the compute dtype, ``post`` logits ``[T, H*N]`` in float32 or None) of the
        streams ``s``."""
        ops, stream = self.stream.ops, self.stream
        s = ops.cast(s, "float32")
        u = ops.rms_norm(s, stream.ones, stream.spec.eps)
        weighted = ops.add(ops.sigmoid_mul(self.pre_tile(self.pre(u)), s), ops.mul_scalar(s, stream.spec.hc_eps))
        x = ops.reshape(stream.sum(ops.reshape(weighted, (-1, stream.spec.copies))), (-1, stream.hidden))
        return ops.cast(x, stream.dtype), None if self.post is None else self.post_tile(self.post(u))

    def write(self, s: Any, post: Any, y: Any) -> Any:
        """The streams ``s`` with ``y [T, H]`` added to each, times its ``post`` (logits spread, from :meth:`read`),
        in float32, rounded once."""
        ops, stream = self.stream.ops, self.stream
        copied = stream.copy(ops.cast(y, "float32"))
        gated = ops.mul_scalar(ops.sigmoid_mul(post, copied), stream.spec.magnitude)
        written = ops.add(ops.cast(s, "float32"), ops.add(gated, ops.mul_scalar(copied, stream.spec.hc_eps)))
        return ops.cast(written, stream.dtype)


class HyperStream:
    """The model's ends of the streams (:meth:`widen`, :meth:`narrow`) and their constants, shared by the layers."""

    def __init__(self, ops: Any, spec: HyperSpec, hidden: int, dtype: str, projection: Callable[[str], Any]):
        from ferrum.weights import Linear, place  # imported here: ferrum.weights reads the family table

        self.ops, self.spec, self.hidden, self.dtype = ops, spec, hidden, dtype
        n = spec.copies  # the constants below act on float32 streams (see the module docstring)
        self.ones = ops.from_numpy(np.ones(hidden * n, dtype=np.float32), "float32")
        self.sum = Linear(place(ops, "hyper.sum", np.ones((1, n), dtype=np.float32), "float32"))
        self._copy = Linear(place(ops, "hyper.copy", np.ones((n, 1), dtype=np.float32), "float32"))
        self.head = _Mix(self, projection, HEAD, post=False)

    def copy(self, y: Any) -> Any:
        """``y [T, H]`` (float32) in every stream: ``[T, H*N]``."""
        ops = self.ops
        return ops.reshape(self._copy(ops.reshape(y, (-1, 1))), (-1, self.hidden * self.spec.copies))

    def widen(self, h: Any) -> tuple:
        """The first block's streams: the embeddings in each (copies are exact, so rounding back is too)."""
        return (self.ops.cast(self.copy(self.ops.cast(h, "float32")), self.dtype),)

    def narrow(self, stream: tuple) -> Any:
        """The head's mix of the streams after the last block, before the final norm."""
        return self.head.read(stream[0])[0]

    def projections(self) -> list[Any]:
        return self.head.projections()


class HyperLayer:
    """One block's connections: its halves (``DecoderOnlyLLM._block_halves``) read and write the streams."""

    def __init__(self, stream: HyperStream, projection: Callable[[str], Any]):
        self.attn, self.ffn = (_Mix(stream, projection, module) for module in CONNECTIONS)

    def projections(self) -> list[Any]:
        return self.attn.projections() + self.ffn.projections()

    def halves(self, model: Any, layer: Any, project: Callable, mixer_out: Callable,
               norm: Callable) -> tuple[Callable[..., tuple], Callable[..., tuple]]:
        """``enter(streams, positions)`` projects the attention mix's queries (keys, values) and hands its ``post``
        on after what attention's output takes; ``leave(attn, streams, *extra, post)`` writes attention's output
        into the streams, then the MLP's of its own mix."""

        def enter(s: Any, positions: Any) -> tuple:
            x, post = self.attn.read(s)
            *projected, s = project(norm(x, layer.pre_attn), s, positions)
            return (*projected, post, s)

        def leave(attn: Any, s: Any, *rest: Any) -> tuple:
            *extra, post = rest
            s = self.attn.write(s, post, mixer_out(attn, *extra))
            x, post = self.ffn.read(s)
            return (self.ffn.write(s, post, layer.mlp(norm(x, layer.pre_mlp))),)

        return enter, leave
