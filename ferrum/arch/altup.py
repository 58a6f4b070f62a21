"""Gemma 3n's AltUp (alternating updates) and Laurel (a low-rank residual), as transformers' Gemma3nTextModel runs
them.

The residual stream is ``copies`` (altup_num_inputs) arrays ``[T, hidden]``: the scaled embeddings, and each of
``altup_projections`` of them rescaled to the embeddings' root mean square. Each block

* predicts every copy from all of them, with per-token coefficients: ``modalities(x) = tanh(modality_router(
  router_norm(x) / hidden))`` of the active copy, ``pred[c] = s[c] + sum_a coefs[c * n + a] * s[a]`` with
  ``coefs = prediction_coefs(modalities)``;
* runs attention and the MLP on the active prediction only, with Laurel beside attention: ``x = input_layernorm(
  pred[active])``, ``laurel = x + post_laurel_norm(linear_right(linear_left(x)))``, ``a = (pred[active] +
  post_attention_layernorm(attn) + laurel) / sqrt(2)``, ``out = a + post_feedforward_layernorm(mlp(a))``;
* corrects every copy by how far the active one moved: ``s[c] = pred[c] + (correction_coefs(modalities(out)) +
  1)[c] * (out - pred[active])``, then adds the per-layer input mix of ``s[active] * correct_output_scale``
  (:class:`ferrum.arch.per_layer.PerLayerMix`) to copies 1 on.

After the last block copies 1 on go through ``altup_unembed_projections``, are rescaled to copy 0's root mean
square, and the copies are averaged before the final norm. Per-token scalars times rows are ``mul`` of rows in
which every column holds the scalar: the coefficient matrices are stored with each row repeated ``hidden`` times
(:meth:`AltUpSpec.prepare`), so one ``linear`` gives them spread. The coefficients are clipped to
altup_coef_clip at load, as mlx-lm clips them (transformers clips while training, so trained ones are within).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.arch.rowwise import RowOps
from ferrum.errors import UnsupportedFeatureError

#: The per-layer coefficient matrices, expanded at load.
PREDICTION, CORRECTION = "altup.prediction_coefs.weight", "altup.correction_coefs.weight"
#: The per-layer scale of the corrected active copy (a vector, placed as it is).
OUTPUT_SCALE = "altup.correct_output_scale"


@dataclass(frozen=True)
class AltUpSpec:
    """AltUp's copies (altup_num_inputs), which one the blocks compute (altup_active_idx), whether the corrected
    active copy is scaled before the per-layer mix (altup_correct_scale), the coefficients' clip (altup_coef_clip)
    and Laurel's rank (laurel_rank)."""

    copies: int
    active: int
    correct_scale: bool
    coef_clip: float | None
    laurel_rank: int
    name = "AltUp (Gemma 3n's stream of copies)"
    #: The stream is handed through the mixer step whole (nothing carried past it).
    carries = False

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """The model's tensors (names under the decoder's prefix) and their shapes."""
        return {f"{kind}.{i}.weight": (hidden, hidden) for kind in ("altup_projections", "altup_unembed_projections")
                for i in range(self.copies - 1)}

    def layer_tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """Each layer's tensors (names under the layer) and their shapes."""
        n, rank = self.copies, self.laurel_rank
        return {OUTPUT_SCALE: (hidden,), CORRECTION: (n, n), PREDICTION: (n * n, n),
                "altup.modality_router.weight": (n, hidden), "altup.router_norm.weight": (hidden,),
                "laurel.linear_left.weight": (rank, hidden), "laurel.linear_right.weight": (hidden, rank),
                "laurel.post_laurel_norm.weight": (hidden,)}

    def prepare(self, name: str, tensor: Any, hidden: int) -> Any:
        """A coefficient matrix clipped, each of its rows repeated ``hidden`` times; other tensors as they are."""
        if not name.endswith((PREDICTION, CORRECTION)):
            return tensor
        if not isinstance(tensor, np.ndarray):
            raise UnsupportedFeatureError(f"{name}: AltUp's coefficients are stored packed, which Ferrum does not "
                                          "run (no conversion packs their 4 columns); load a float checkpoint")
        coefs = np.asarray(tensor, dtype=np.float32)
        if self.coef_clip is not None:
            coefs = np.clip(coefs, -self.coef_clip, self.coef_clip)
        return np.repeat(coefs, hidden, axis=0)

    def holds(self, name: str) -> bool:
        """Whether a tensor is split at load (none of AltUp's: :meth:`prepare` lays them out)."""
        return False

    def stream(self, model: Any, weights: Callable[[str], Any], projection: Callable[[str], Any]) -> AltUpStream:
        """The model's ends of the stream (``weights`` / ``projection``: by name under the decoder's prefix)."""
        return AltUpStream(model.ops, self, model.config.hidden_size, model.dtype, weights, projection)

    def layer(self, model: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              index: int) -> AltUpLayer:
        """One block's AltUp and Laurel (``tensor`` / ``projection``: the layer's placed weights)."""
        return AltUpLayer(model.ops, self, model.config.hidden_size, model.config.rms_norm_eps, model.dtype, tensor,
                          projection)


class AltUpLayer:
    """One block's AltUp and Laurel weights: :meth:`predict`, :meth:`laurel` and :meth:`correct`."""

    def __init__(self, ops: Any, spec: AltUpSpec, hidden: int, eps: float, dtype: str,
                 tensor: Callable[[str], Any], projection: Callable[[str], Any]):
        """``tensor`` / ``projection``: the layer's placed weights (``DecoderOnlyLLM._layer``'s)."""
        self.ops, self.spec, self.hidden, self.eps, self.dtype = ops, spec, hidden, eps, dtype
        self.router, self.router_norm = projection("altup.modality_router"), tensor("altup.router_norm.weight")
        self.prediction, self.correction = projection("altup.prediction_coefs"), projection("altup.correction_coefs")
        # the correction's "+ 1", as its bias
        self.correction.bias = ops.from_numpy(np.ones(spec.copies * hidden, dtype=np.float32), dtype)
        self.scale = tensor(OUTPUT_SCALE) if spec.correct_scale else None
        self.left, self.right = projection("laurel.linear_left"), projection("laurel.linear_right")
        self.laurel_norm = tensor("laurel.post_laurel_norm.weight")

    def projections(self) -> list[Any]:
        return [self.router, self.prediction, self.correction, self.left, self.right]

    def halves(self, model: Any, layer: Any, project: Callable, attention_out: Callable,
               norm: Callable) -> tuple[Callable[..., tuple], Callable[..., tuple]]:
        """The block's halves: :func:`block_halves`."""
        return block_halves(model, layer, project, attention_out, norm)

    def _modalities(self, x: Any) -> Any:
        ops = self.ops
        routed = self.router(ops.mul_scalar(ops.rms_norm(x, self.router_norm, self.eps), 1.0 / self.hidden))
        return ops.cast(ops.softcap(routed, 1.0), self.dtype)  # tanh, in float32

    def predict(self, stream: tuple) -> list[Any]:
        """Every copy's prediction from the stream's copies."""
        ops, n = self.ops, self.spec.copies
        coefs = ops.split(self.prediction(self._modalities(stream[self.spec.active])), (self.hidden,) * (n * n))
        out = []
        for c in range(n):
            mixed = ops.mul(coefs[c * n], stream[0])
            for a in range(1, n):
                mixed = ops.add(mixed, ops.mul(coefs[c * n + a], stream[a]))
            out.append(ops.add(mixed, stream[c]))
        return out

    def laurel(self, x: Any) -> Any:
        """Laurel's output on the normed active prediction ``x``."""
        ops = self.ops
        return ops.add(x, ops.rms_norm(self.right(self.left(x)), self.laurel_norm, self.eps))

    def correct(self, predictions: list[Any], activated: Any) -> list[Any]:
        """The copies corrected by the block's output ``activated`` of the active prediction."""
        ops, active = self.ops, self.spec.active
        innovation = ops.add(activated, ops.mul_scalar(predictions[active], -1.0))
        coefs = ops.split(self.correction(self._modalities(activated)), (self.hidden,) * self.spec.copies)
        return [ops.add(ops.mul(innovation, coef), prediction) for coef, prediction in zip(coefs, predictions)]


class AltUpStream:
    """The model's ends of the stream: :meth:`widen` the embeddings into copies, :meth:`narrow` them into one."""

    def __init__(self, ops: Any, spec: AltUpSpec, hidden: int, dtype: str, tensor: Callable[[str], Any],
                 projection: Callable[[str], Any]):
        """``tensor`` / ``projection``: the model's placed weights by name under the decoder's prefix."""
        self.ops, self.spec, self.rows = ops, spec, RowOps(ops, hidden, dtype)
        self.up = [projection(f"altup_projections.{i}") for i in range(spec.copies - 1)]
        self.down = [projection(f"altup_unembed_projections.{i}") for i in range(spec.copies - 1)]

    def _rescaled(self, x: Any, like: Any) -> Any:
        """``x``'s rows at ``like``'s rows' root mean square."""
        rows = self.rows
        return self.ops.mul(rows.unit(x), rows.spread(rows.rms(like)))

    def widen(self, h: Any) -> tuple:
        """The first block's stream from the scaled embeddings ``h``."""
        return (h, *[self._rescaled(up(h), h) for up in self.up])

    def narrow(self, stream: tuple) -> Any:
        """The copies' mean after the last block, before the final norm."""
        ops = self.ops
        total = stream[0]
        for down, x in zip(self.down, stream[1:]):
            total = ops.add(total, self._rescaled(down(x), stream[0]))
        return ops.mul_scalar(total, 1.0 / self.spec.copies)

    def projections(self) -> list[Any]:
        return [*self.up, *self.down]


def block_halves(model: Any, layer: Any, project: Callable, attention_out: Callable,
                 norm: Callable) -> tuple[Callable[..., tuple], Callable[..., tuple]]:
    """A Gemma 3n block's halves (``DecoderOnlyLLM._block_halves``): ``enter(*stream, positions)`` projects the
    active prediction's queries (keys, values) and hands on the other predictions and Laurel's output beside it;
    ``leave(attn, active, *others, laurel, inputs)`` is the rest of the block, the corrected stream."""
    ops, altup, mix = model.ops, layer.wide, layer.per_layer
    active = altup.spec.active

    def enter(*args: Any) -> tuple:
        *stream, positions = args
        predictions = altup.predict(stream)
        x = norm(predictions[active], layer.pre_attn)
        *projected, h = project(x, predictions[active], positions)
        return (*projected, *predictions[:active], *predictions[active + 1:], altup.laurel(x), h)

    def leave(attn: Any, h: Any, *rest: Any) -> tuple:
        *others, laurel, inputs = rest
        o = norm(attention_out(attn), layer.post_attn)
        joined = ops.mul_scalar(ops.add(ops.add(h, o), laurel), 2.0 ** -0.5)
        activated = ops.add(joined, norm(layer.mlp(norm(joined, layer.pre_mlp)), layer.post_mlp))
        corrected = altup.correct([*others[:active], h, *others[active:]], activated)
        first = corrected[active] if altup.scale is None else ops.mul(corrected[active], altup.scale)
        added = mix(first, inputs)
        return (corrected[0], *[ops.add(x, added) for x in corrected[1:]])

    return enter, leave
