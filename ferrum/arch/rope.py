"""Rotary embeddings as data: one :class:`Rope` per attention kind, its frequencies computed on the host.

Every variant reaches the backend's one ``rope`` op as an ``inv_freq [head_dim // 2]``
table (two for longrope), plus changes to the q/k weights made at load:

* default, ``linear``, ``llama3`` and ``yarn`` scaling: one table. YaRN also
  multiplies cos and sin by its attention factor (applied at load, as for longrope below).
* ``dynamic`` (NTK): transformers rescales the frequencies only once a
  sequence exceeds ``max_position_embeddings``, which Ferrum never lets one
  do (the model refuses longer sequences), so its table is the default one.
* ``longrope`` (Phi-3 / Phi-3.5 / Phi-4): a *short* and a *long* table.
  transformers picks one per forward call by ``max(position_ids) + 1 >
  original_max_position_embeddings``. Ferrum applies that rule to each token
  on its own: the token at position ``p`` is rotated with the long table when
  ``p + 1 > original_max_position_embeddings``. So a key's value depends only
  on its tokens and position, never on batching or chunking, which the paged
  cache needs (prefix-cache hits and recompute after preemption reuse or
  rebuild blocks as they were). Consequences: a sequence within the original
  length is exact; a sequence growing past it matches transformers decoding
  token by token with its cache (earlier keys keep the short rotation); a
  prompt longer than that in one call differs from transformers' single
  forward, which rotates *all* its tokens with the long table (transformers'
  ``generate`` also recomputes its cache at the crossing; Ferrum does not).
  The attention factor multiplies cos and sin in transformers, i.e. the
  rotated dims of q and k; rope is linear, so Ferrum multiplies those rows of
  the q and k projections by it at load (:mod:`ferrum.arch.tensors`). Where the
  long table has a factor of its own (Phi-3.5-MoE's ``long_mscale`` beside
  ``short_mscale``), the tokens it rotates are multiplied by the ratio once rotated.
* partial rotary (``partial_rotary_factor``, Phi-4-mini): transformers rotates
  the first ``rotary_dim`` dims of each head, pairing ``i`` with ``i +
  rotary_dim / 2``. Ferrum permutes the q and k projection rows at load so those
  pairs become ``(i, i + head_dim / 2)`` and gives the untouched pairs frequency
  0 (an exact identity): scores are unchanged since q and k move together.
* nanochat's rotation the other way round (``rotate_half`` as ``cat(x2, -x1)``):
  ``cos`` is even and ``sin`` odd, so it is the usual rope with every frequency
  negated (``Rope.negated``), which every backend's ``rope`` op runs as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rope:
    """The rotary embedding of one attention kind (validated by the family table)."""

    theta: float
    head_dim: int
    rotary_dim: int  # == head_dim unless partial rotary
    kind: str = "default"  # default | linear | dynamic (= default within the context) | llama3 | yarn | longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max: int | None = None  # llama3 / yarn / longrope: pretraining context
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0  # yarn / longrope: multiplies cos and sin
    #: longrope: the factor of the long table where it differs (Phi-3.5-MoE's long_mscale; None: attention_factor);
    #: whole heads only (it multiplies every dim of a rotated head)
    long_attention_factor: float | None = None
    beta_fast: float = 32.0  # yarn: rotations over the pretraining context above which a dim keeps its frequency
    beta_slow: float = 1.0  # yarn: ... below which it is interpolated (divided by factor)
    truncate: bool = True  # yarn: round the ramp's ends to whole dims
    #: The checkpoint pairs adjacent dims (GPT-J's rope: Ernie 4.5), not each dim with the one half a head on.
    interleaved: bool = False
    #: The checkpoint turns its pairs the other way (nanochat: rotate_half as ``cat(x2, -x1)``, so ``sin`` changes
    #: sign): every frequency negated, as mlx-lm runs it.
    negated: bool = False
    #: Gemma 4's "proportional" rope: the first ``rotary_dim / 2`` pairs ``(i, i + head_dim / 2)`` turn at
    #: ``theta ** (-2i / head_dim)`` (the whole head's spacing), the others not at all; no rows are moved.
    proportional: bool = False

    @classmethod
    def unrotated(cls, head_dim: int) -> "Rope":
        """No rotation at all (SmolLM3's NoPE layers): every pair at frequency 0, an exact identity."""
        return cls(theta=1.0, head_dim=head_dim, rotary_dim=0)

    @property
    def scaled_context(self) -> int | None:
        """YaRN's pretraining context times its factor: the context the scaling is made for. Qwen2.5's and Qwen3's
        model cards have users add YaRN to a config whose max_position_embeddings stays the pretraining one;
        the model then runs that many tokens (vLLM's max_model_len reads it so too). None for other kinds."""
        if self.kind != "yarn" or self.original_max is None:
            return None
        return int(self.original_max * self.factor)

    @property
    def switches(self) -> bool:
        """Whether the table depends on the sequence length (longrope with two different tables)."""
        return self.kind == "longrope" and (self.short_factor != self.long_factor or self.long_scaled != 1.0)

    @property
    def long_scaled(self) -> float:
        """What the long table multiplies cos and sin by beyond ``attention_factor`` (folded into q and k at load)."""
        return 1.0 if self.long_attention_factor is None else self.long_attention_factor / self.attention_factor

    def inv_freq(self, long: bool = False) -> np.ndarray:
        """``[head_dim // 2]`` float32 frequencies in Ferrum's pairing (zeros for unrotated pairs)."""
        dim = self.rotary_dim
        spacing = self.head_dim if self.proportional else dim
        base = 1.0 / (self.theta ** (np.arange(0, dim, 2, dtype=np.float64) / spacing))
        if self.kind == "linear":
            base = base / self.factor
        elif self.kind == "llama3":
            base = _llama3(base, self)
        elif self.kind == "yarn":
            base = _yarn(base, self)
        elif self.kind == "longrope":
            ext = np.asarray(self.long_factor if long else self.short_factor, dtype=np.float64)
            # transformers: 1 / (ext * theta ** (arange / dim)) in float32
            shape = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
            base = 1.0 / (ext.astype(np.float32) * np.float32(self.theta) ** shape)
        out = np.zeros(self.head_dim // 2, dtype=np.float32)
        out[: dim // 2] = -base if self.negated else base
        return out

    def rotary_permutation(self) -> np.ndarray | None:
        """Row order within a head that maps the checkpoint's pairing of q/k dims (partial rotary, adjacent
        pairs) onto Ferrum's (dim ``j`` with ``j + head_dim / 2``, the unrotated pairs last), or None."""
        d, r = self.head_dim, self.rotary_dim
        if (r in (0, d) or self.proportional) and not self.interleaved:
            return None
        first, second = (np.arange(0, r, 2), np.arange(1, r, 2)) if self.interleaved else \
            (np.arange(0, r // 2), np.arange(r // 2, r))
        half_pass = (d - r) // 2
        return np.concatenate([first, np.arange(r, r + half_pass), second, np.arange(r + half_pass, d)])


def _llama3(inv_freq: np.ndarray, rope: Rope) -> np.ndarray:
    """Leave high frequencies, divide low ones by factor, blend between (nothing between where the two factors are
    equal, Llama 4 Scout's: a wavelength of exactly the original context would be transformers' NaN)."""
    old_ctx, low, high, factor = float(rope.original_max), rope.low_freq_factor, rope.high_freq_factor, rope.factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return np.where(medium, blended, scaled)


def _yarn(inv_freq: np.ndarray, rope: Rope) -> np.ndarray:
    """Keep the dims that turn more than ``beta_fast`` times over the pretraining context, divide by factor
    those turning fewer than ``beta_slow`` times, and ramp linearly between (transformers' ``yarn``)."""
    dim = rope.rotary_dim

    def dim_turning(rotations: float) -> float:
        return dim * math.log(rope.original_max / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dim_turning(rope.beta_fast), dim_turning(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high + 0.001 if low == high else high) - low),
                   0, 1)
    return inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)


def yarn_attention_factor(params: dict, factor: float) -> float:
    """transformers' default: ``0.1 * log(factor) + 1``, or the ratio of two such terms weighted by ``mscale``
    and ``mscale_all_dim`` where both are given."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(weight: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0

    weight, weight_all = params.get("mscale"), params.get("mscale_all_dim")
    return mscale(weight) / mscale(weight_all) if weight and weight_all else mscale(1.0)


def longrope_attention_factor(params: dict, max_position: int, original_max: int) -> float:
    """transformers' default: ``sqrt(1 + log(factor) / log(original_max))`` with factor = max / original."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = params.get("factor") or max_position / original_max
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
