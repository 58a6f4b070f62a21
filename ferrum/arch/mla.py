"""Multi-head Latent Attention (DeepSeek-V2/V3, R1, Kimi K2, Moonlight) run as ordinary per-head attention.

The checkpoint's attention of one layer (transformers' ``DeepseekV3Attention``), with ``H`` heads, q/k heads of
``Dq = nope + rope`` dims (``qk_nope_head_dim + qk_rope_head_dim``) and value heads of ``v`` dims:

* queries: ``q_proj [H*Dq, hidden]``, or, with a ``q_lora_rank``, ``q_b_proj(q_a_layernorm(q_a_proj(x)))``;
* keys and values from a latent: ``kv_a_proj_with_mqa [kv_lora + rope, hidden]`` gives the latent ``c`` (its first
  ``kv_lora_rank`` rows, normed by ``kv_a_layernorm``) and one rope key ``k_pe`` shared by every head (its last
  ``rope`` rows, never normed); ``kv_b_proj [H*(nope + v), kv_lora]`` expands ``c`` into each head's ``k_nope``
  and value;
* rope on the ``rope`` dims only (the last of each q head, and ``k_pe``), in DeepSeek's interleaved pairs where
  ``rope_interleave`` (transformers' default) or rotate-half ones; ``o_proj [hidden, H*v]``.

This first version expands the latent per head *before* caching, so every backend's paged attention runs it
unchanged: the cache holds ``H`` key heads of ``Dq`` dims and ``H`` value heads zero-padded to ``Dq`` dims (zeros
in the values are exact: they only add zero columns to the output, which are dropped before ``o_proj``). Caching
the compressed latent (``kv_lora + rope`` numbers a token instead of ``2*H*Dq``) and absorbing ``kv_b_proj`` into
the queries and the output is a later optimization.

How the pieces meet without any op beyond ``linear``, ``reshape``, ``add`` and ``rope``:

* every head of q and k is laid out as :meth:`MlaSpec.head_layout` says, the rope dims in Ferrum's rotate-half
  pairs ``(j, j + Dq/2)`` and the nope dims in the pairs the model's ``rope`` op turns by frequency 0 (an exact
  identity), as for partial rotary (:mod:`ferrum.arch.rope`); q's projection rows are permuted so at load;
* a head's key is ``k_nope`` placed by a 0/1 matrix ``[Dq, nope + v]`` applied to each head's slice of the
  ``kv_b_proj`` output, plus ``k_pe`` placed into every head by a 0/1 matrix ``[H*Dq, rope]``; a value is placed
  by another ``[Dq, nope + v]`` matrix. Products with 0 and 1 and sums with 0 are exact in any float dtype, and
  the checkpoint's matrices stay as stored (a packed ``kv_b_proj`` or ``o_proj`` runs packed);
* the attention output's value dims are picked by a 0/1 matrix ``[v, Dq]`` before ``o_proj``.

YaRN's attention factor multiplies cos and sin in transformers, i.e. the rope rows of q and of ``k_pe``: they are
scaled at load. Its ``mscale_all_dim`` correction of the softmax scale is the family's ``attn_scale``.

A.X-K2 (``MlaSpec.output_gate``) reads its queries from the latent *and* its norm, and gates the attention output:
its ``q_b_proj [H*(Dq + v), 2*q_lora_rank]`` takes ``[q_a_layernorm(c), c]`` (``c = q_a_proj(x)``) and gives per
head its query, then a gate of ``v`` dims; the heads' values are multiplied by ``sigmoid(gate)`` before ``o_proj``.
No op joins two inputs along their last axis, so the matrix is cut at load into the columns each input reads and
the rows of queries and of gates (:meth:`MlaSpec.split`): four projections summed in pairs. The gate's rows are
placed at the value dims of Ferrum's head (zero rows beside them, whose ``sigmoid(0)`` multiplies the zero padding),
so the model's output gate (``ops.sigmoid_mul`` over the flattened heads) takes it as it takes any other.

Dots 3 (``dots3_note_text``) sizes its latent attention per layer kind (``LayerSpec.mla``: its sliding layers have
fewer, wider heads than its indexed ones). The KV pool holds every layer alike, so each layer's heads are padded to
the pool's at load: a head's ``nope + rope`` dims to ``MlaSpec.dim`` with zero dims after them (q's zero rows; the
placements leave those dims of k and v zero), and the heads to ``MlaSpec.pool_heads`` with zero heads (q_b_proj's,
kv_b_proj's and the output gate's zero rows, o_proj's zero columns). Zero dims add nothing to a score; a zero head
attends uniformly to zero values and o_proj reads nothing of it, so the layer is exact. Its latents are also scaled
(``q_scale``, ``kv_scale``: folded into q_b_proj and kv_a_layernorm) and its shared rope key RMS-normed
(``rope_norm``) before rope.

mlx-lm's DeepSeek-V3 (Kimi K2, Moonlight) conversions store each ``kv_b_proj`` split into two per-head
``MultiLinear`` modules (its ``sanitize``): ``embed_q [H, kv_lora, nope]``, each head's key rows transposed, and
``unembed_out [H, v, kv_lora]``, its value rows; quantized, each is packed along its own last axis (mlx-lm's
``QuantizedMultiLinear``). They are joined back at load (:meth:`MlaSpec.join_kv_b`), in float: ``embed_q``'s groups
run along ``nope``, across ``kv_b_proj``'s rows, so no packed ``kv_b_proj`` holds the same numbers. Its LongCat-Flash
conversions split each sub-block's alike, under the sub-block's numbered ``self_attn.N`` (the family's renames find
them). mlx-lm's DeepSeek-V2 keeps ``kv_b_proj`` whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ferrum.arch.rope import Rope
from ferrum.errors import CheckpointError

if TYPE_CHECKING:  # ferrum.weights reads the family table, which reads this module
    from ferrum.weights import Linear

#: The latent norms' epsilon: transformers builds q_a_layernorm and kv_a_layernorm with DeepseekV3RMSNorm's default,
#: whatever rms_norm_eps says.
LATENT_EPS = 1e-6

#: The two halves of ``kv_a_proj_with_mqa`` once split at load: the latent's rows and the shared rope key's.
LATENT, ROPE_KEY = "self_attn.kv_a_proj", "self_attn.kv_rope_proj"
#: A.X-K2's ``q_b_proj`` once cut at load (:meth:`MlaSpec.split`): the queries from the normed query latent and
#: from the latent itself, the output gate from each.
GATED_QUERY = {"query": ("self_attn.q_b_proj", "self_attn.q_skip_proj"),
               "gate": ("self_attn.gate_b_proj", "self_attn.gate_skip_proj")}
#: Dots 3's RMSNorm of the shared rope key (``MlaSpec.rope_norm``).
ROPE_NORM = "self_attn.k_rope_only_layernorm"
#: mlx-lm's split of ``kv_b_proj``: its per-head key rows (transposed) and value rows.
SPLIT_KV_B = ("self_attn.embed_q", "self_attn.unembed_out")


def split_kv_b(arch: Any, name: str, present: Any) -> tuple[str, str] | None:
    """The weights of mlx-lm's two modules that hold ``kv_b_proj`` weight ``name`` (both the checkpoint's names, as
    ``arch`` stores them: LongCat-Flash's numbered per sub-block, ``self_attn.1.embed_q``), where ``present``
    (checkpoint names) holds it split; else None."""
    from ferrum.arch.tensors import model_name, stored_name  # imported here: ferrum.arch.tensors reads this module

    ours = model_name(arch, name)
    if not ours.endswith(".self_attn.kv_b_proj.weight") or name in present:
        return None
    stem = ours.removesuffix("self_attn.kv_b_proj.weight")
    split = tuple(stored_name(arch, f"{stem}{module}.weight") for module in SPLIT_KV_B)
    return split if all(weight in present for weight in split) else None


@dataclass(frozen=True)
class MlaSpec:
    """The sizes of one model's latent attention (of its layers', where one's differ: ``LayerSpec.mla``)."""

    heads: int
    q_lora_rank: int | None  # None: a plain q_proj
    kv_lora_rank: int
    nope: int  # qk_nope_head_dim
    rope: int  # qk_rope_head_dim
    v_head_dim: int
    bias: bool = False  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj have biases
    #: A.X-K2: q_b_proj reads the query latent beside its norm and emits each head's output gate after its query
    #: (see the module docstring).
    output_gate: bool = False
    eps: float = LATENT_EPS  # the latent norms' (and the rope key norm's) epsilon
    rope_norm: bool = False  # Dots 3: the shared rope key is RMS-normed (ROPE_NORM) before rope
    q_scale: float = 1.0  # Dots 3: the normed query latent's multiplier, folded into q_b_proj
    kv_scale: float = 1.0  # ...and the normed key/value latent's, folded into kv_a_layernorm
    dim: int | None = None  # Ferrum's head dims where the KV pool's are wider than nope + rope: zero dims after
    pool_heads: int | None = None  # the KV pool's heads where more than ``heads``: zero heads after
    #: Kimi K3: the output gate stored one row per value dim (``self_attn.gate_proj [H*v, hidden]``), its rows
    #: placed at the value dims of Ferrum's heads at load (zero rows beside them, as A.X-K2's gate).
    value_gate: bool = False

    @property
    def qk_head_dim(self) -> int:
        """The dims of the checkpoint's q (and k) head."""
        return self.nope + self.rope

    @property
    def head_dim(self) -> int:
        """The dims of Ferrum's q (and cached k) head; the cache's value heads are zero-padded to it."""
        return self.dim or self.qk_head_dim

    @property
    def width_heads(self) -> int:
        """Ferrum's heads: the checkpoint's, then zero heads up to the KV pool's."""
        return self.pool_heads or self.heads

    def split_shapes(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """The shapes of mlx-lm's ``embed_q`` and ``unembed_out`` (:data:`SPLIT_KV_B`)."""
        return (self.heads, self.kv_lora_rank, self.nope), (self.heads, self.v_head_dim, self.kv_lora_rank)

    def join_kv_b(self, embed_q: np.ndarray, unembed_out: np.ndarray, where: str) -> np.ndarray:
        """``kv_b_proj [H*(nope + v), kv_lora]`` from mlx-lm's float ``embed_q`` and ``unembed_out`` (the inverse of
        its ``sanitize``)."""
        for got, want, module in zip((embed_q, unembed_out), self.split_shapes(), SPLIT_KV_B):
            if tuple(got.shape) != want:
                raise CheckpointError(f"{where}: {module} is {tuple(got.shape)} but config.json implies {want} "
                                      "(mlx-lm's split of kv_b_proj)")
        return np.concatenate([embed_q.transpose(0, 2, 1), unembed_out], axis=1).reshape(-1, self.kv_lora_rank)

    def head_layout(self, rope: Rope) -> np.ndarray:
        """``[head_dim]``: the checkpoint's dim (``< nope``: a nope dim; ``nope + i``: rope dim ``i``; -1: a zero
        padding dim) at each position of Ferrum's head, rope dims first and then in the pairing
        ``rope.rotary_permutation`` makes."""
        rope_first = np.concatenate([np.arange(self.nope, self.qk_head_dim), np.arange(self.nope),
                                     np.full(self.head_dim - self.qk_head_dim, -1)])
        order = rope.rotary_permutation()
        return rope_first if order is None else rope_first[order]

    def query_rows(self, rope: Rope) -> np.ndarray:
        """``[width_heads * head_dim]``: the checkpoint's q row at each of Ferrum's (-1: a zero row)."""
        layout = self.head_layout(rope)
        own = np.where(layout >= 0, np.arange(self.heads)[:, None] * self.qk_head_dim + layout, -1)
        return np.concatenate([own.reshape(-1), np.full((self.width_heads - self.heads) * self.head_dim, -1)])

    def padded_rows(self, per_head: int) -> np.ndarray:
        """Row order padding a matrix of ``per_head`` rows a head with zero heads (-1) up to ``width_heads``."""
        return np.concatenate([np.arange(self.heads * per_head), np.full((self.width_heads - self.heads) * per_head,
                                                                         -1)])

    def value_gate_rows(self) -> np.ndarray:
        """``[width_heads * head_dim]``: the stored gate's row at each of Ferrum's (its head's value dims first;
        -1: a zero row)."""
        own = np.arange(self.heads)[:, None] * self.v_head_dim + np.arange(self.head_dim)[None, :]
        own = np.where(np.arange(self.head_dim)[None, :] < self.v_head_dim, own, -1)
        return np.concatenate([own.reshape(-1), np.full((self.width_heads - self.heads) * self.head_dim, -1)])

    def adaptable(self, hidden: int) -> dict[str, tuple[int, int, int]]:
        """The checkpoint's projections of one layer that LoRA adapts, each ``(in, out)`` as stored (as a PEFT
        adapter's factors are) and the outputs the load makes of its rows (q's laid out and padded to
        ``width_heads``, ``kv_b_proj``'s padded, ``kv_a_proj_with_mqa``'s split in two): the B factor's rows are
        transformed as the weight's, so the adapter adds to the outputs the model computes. A.X-K2's ``q_b_proj``,
        whose columns are cut, is not among them."""
        h, wide, d = self.heads, self.width_heads, self.qk_head_dim
        queries = (h * d, wide * self.head_dim)
        out: dict[str, tuple[int, int, int]] = {}
        if self.q_lora_rank is None:
            out["q_proj"] = (hidden, *queries)
        else:
            out["q_a_proj"] = (hidden, self.q_lora_rank, self.q_lora_rank)
            if not self.output_gate:
                out["q_b_proj"] = (self.q_lora_rank, *queries)
        per_head = self.nope + self.v_head_dim
        out.update({"kv_a_proj_with_mqa": (hidden, self.kv_lora_rank + self.rope, self.kv_lora_rank + self.rope),
                    "kv_b_proj": (self.kv_lora_rank, h * per_head, wide * per_head),
                    "o_proj": (h * self.v_head_dim, hidden, hidden)})
        return out

    # ------------------------------------------------------------- checkpoint
    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """One layer's attention tensors as the checkpoint stores them (names relative to the layer; the block's
        norms are the architecture's)."""
        h, d = self.heads, self.qk_head_dim
        out: dict[str, tuple[int, ...]] = {}
        if self.q_lora_rank is None:
            out["self_attn.q_proj.weight"] = (h * d, hidden)
        else:
            rows, inputs = (h * (d + self.v_head_dim), 2) if self.output_gate else (h * d, 1)
            out.update({"self_attn.q_a_proj.weight": (self.q_lora_rank, hidden),
                        "self_attn.q_a_layernorm.weight": (self.q_lora_rank,),
                        "self_attn.q_b_proj.weight": (rows, inputs * self.q_lora_rank)})
            if self.bias:
                out["self_attn.q_a_proj.bias"] = (self.q_lora_rank,)
        out.update({"self_attn.kv_a_proj_with_mqa.weight": (self.kv_lora_rank + self.rope, hidden),
                    "self_attn.kv_a_layernorm.weight": (self.kv_lora_rank,),
                    "self_attn.kv_b_proj.weight": (h * (self.nope + self.v_head_dim), self.kv_lora_rank),
                    "self_attn.o_proj.weight": (hidden, h * self.v_head_dim)})
        if self.rope_norm:
            out[f"{ROPE_NORM}.weight"] = (self.rope,)
        if self.bias:
            out.update({"self_attn.kv_a_proj_with_mqa.bias": (self.kv_lora_rank + self.rope,),
                        "self_attn.o_proj.bias": (hidden,)})
        return out

    def splits(self, name: str) -> bool:
        """Whether :meth:`split` cuts checkpoint tensor ``name``."""
        return ".self_attn.kv_a_proj_with_mqa." in name or (self.output_gate and ".self_attn.q_b_proj." in name)

    def split(self, name: str, tensor: Any, rows: Callable[[Any, int, int], Any]) -> list[tuple[str, Any]]:
        """``kv_a_proj_with_mqa`` (weight or bias) cut into the latent's rows and the rope key's; A.X-K2's
        ``q_b_proj`` into :data:`GATED_QUERY`'s four (float only: its columns are cut)."""
        if ".self_attn.q_b_proj." in name:
            return self._split_gated_query(name, tensor)
        latent = self.kv_lora_rank
        return [(name.replace("self_attn.kv_a_proj_with_mqa", LATENT), rows(tensor, 0, latent)),
                (name.replace("self_attn.kv_a_proj_with_mqa", ROPE_KEY), rows(tensor, latent, latent + self.rope))]

    def _split_gated_query(self, name: str, tensor: Any) -> list[tuple[str, Any]]:
        """``[H*(Dq + v), 2r]`` -> per input (the normed latent's columns, then the latent's) the queries ``[H*Dq,
        r]`` and the gates ``[H*Dq, r]``, each head's ``v`` gate rows at its value dims (the first ``v`` of Ferrum's
        head, :meth:`placements`), zero rows after them."""
        if not isinstance(tensor, np.ndarray):
            raise CheckpointError(f"{name}: a packed q_b_proj of A.X-K2 is not supported (its columns are cut at "
                                  "load: the normed query latent's and the latent's); load the float checkpoint")
        h, d, v, r = self.heads, self.qk_head_dim, self.v_head_dim, self.q_lora_rank
        per_head = tensor.reshape(h, d + v, 2 * r)
        gates = np.zeros((h, d, 2 * r), dtype=tensor.dtype)
        gates[:, :v] = per_head[:, d:]
        stem = name.removesuffix("self_attn.q_b_proj.weight")
        return [(f"{stem}{module}.weight", np.ascontiguousarray(part[:, :, half * r:(half + 1) * r].reshape(h * d, r)))
                for kind, part in (("query", per_head[:, :d]), ("gate", gates))
                for half, module in enumerate(GATED_QUERY[kind])]

    def transform(self, name: str, tensor: Any, rope: Rope, take_rows: Callable[[Any, np.ndarray], Any],
                  scale_rows: Callable[[Any, np.ndarray], Any]) -> Any:
        """The q projection's rows laid out per :meth:`query_rows` (rope rows times the rope's attention factor,
        all times ``q_scale``), the rope key's rows (its norm's weight, where normed) times that factor,
        kv_a_layernorm's weight times ``kv_scale``, kv_b_proj's and the output gate's rows and o_proj's columns
        padded to ``width_heads``; any other tensor as it is. ``take_rows`` gives a zero row for -1."""
        factor = rope.attention_factor
        if f".{ROPE_NORM if self.rope_norm else ROPE_KEY}." in name:
            return tensor if factor == 1.0 else scale_rows(tensor, np.full(self.rope, factor))
        if ".self_attn.kv_a_layernorm." in name and self.kv_scale != 1.0:
            return scale_rows(tensor, np.full(self.kv_lora_rank, self.kv_scale))
        padding = self.width_heads != self.heads
        if self.value_gate and ".self_attn.gate_proj." in name:
            return take_rows(tensor, self.value_gate_rows())
        if padding and ".self_attn.kv_b_proj." in name:
            return take_rows(tensor, self.padded_rows(self.nope + self.v_head_dim))
        if padding and ".self_attn.gate_proj." in name:  # already one row per head dim (ferrum.arch.tensors)
            return take_rows(tensor, self.padded_rows(self.head_dim))
        if padding and ".self_attn.o_proj.weight" in name:
            if not isinstance(tensor, np.ndarray):
                raise CheckpointError(f"{name}: a packed o_proj of a layer whose {self.heads} latent-attention heads "
                                      f"are padded to {self.width_heads} at load is not supported (its columns are "
                                      "padded); load the float checkpoint")
            return np.pad(tensor, ((0, 0), (0, (self.width_heads - self.heads) * self.v_head_dim)))
        if not any(f".self_attn.{q}." in name for q in ("q_proj", "q_b_proj", "q_skip_proj")):
            return tensor
        d = self.qk_head_dim
        scale = np.tile(np.where(np.arange(d) >= self.nope, factor, 1.0), self.heads) * self.q_scale
        if np.any(scale != 1.0):
            tensor = scale_rows(tensor, scale)
        return take_rows(tensor, self.query_rows(rope))

    # ------------------------------------------------------------------ model
    def placements(self, rope: Rope) -> dict[str, np.ndarray]:
        """The 0/1 matrices (``[out, in]``, as ``linear`` takes them) that assemble keys and values and pick the
        attention output's value dims (see the module docstring)."""
        d, nope, v, r, h = self.head_dim, self.nope, self.v_head_dim, self.rope, self.heads
        layout = self.head_layout(rope)
        k_nope = np.zeros((d, nope + v), np.float32)
        k_rope = np.zeros((d, r), np.float32)
        for j, dim in enumerate(layout):
            if 0 <= dim < nope:
                k_nope[j, dim] = 1.0
            elif dim >= nope:
                k_rope[j, dim - nope] = 1.0
        value = np.zeros((d, nope + v), np.float32)
        value[np.arange(v), nope + np.arange(v)] = 1.0
        rope_keys = np.concatenate([np.tile(k_rope, (h, 1)), np.zeros(((self.width_heads - h) * d, r), np.float32)])
        return {"k_nope": k_nope, "k_rope": rope_keys, "value": value,
                "pick_value": np.ascontiguousarray(value[:, nope:].T)}

    def place(self, ops: Any, dtype: str, rope: Rope) -> dict[str, Linear]:
        """:meth:`placements` on the backend, shared by every layer."""
        from ferrum.weights import Linear, place

        return {name: Linear(place(ops, f"mla.{name}", array, dtype))
                for name, array in self.placements(rope).items()}


class LatentAttention:
    """The attention kind of an :class:`MlaSpec` (``Architecture.attention``): its placement matrices, once per rope
    and layer sizes (``LayerSpec.mla``, else the architecture's) and shared by their layers, and each layer's
    projections built around them."""

    def __init__(self, spec: MlaSpec):
        self.spec = spec

    def place(self, ops: Any, dtype: str, rope: Rope, own: MlaSpec | None = None) -> tuple[MlaSpec,
                                                                                          dict[str, Linear]]:
        spec = own or self.spec
        return spec, spec.place(ops, dtype, rope)

    def build(self, ops: Any, config: Any, tensor: Callable[[str], Any], projection: Callable[[str], Linear],
              placed: tuple[MlaSpec, dict[str, Linear]]) -> tuple[MlaProjections, MlaOutput]:
        spec, matrices = placed
        qkv = MlaProjections(spec, ops, projection, lambda norm: tensor(f"{norm}.weight"), matrices)
        return qkv, MlaOutput(spec, ops, projection("self_attn.o_proj"), matrices)

    def adapt(self, qkv: MlaProjections, o: MlaOutput, wrap: Callable[[str, int, int, Linear], Linear],
              hidden: int) -> MlaOutput:
        """The layer's projections LoRA adapts (:meth:`MlaSpec.adaptable`) replaced by ``wrap(projection, start,
        stop, matrix)``, as :meth:`ferrum.arch.tensors.DenseAttention.adapt` does; the output keeps its object."""
        qkv.adapt(wrap)
        o.adapt(lambda linear: wrap("o_proj", 0, hidden, linear))
        return o


class MlaProjections:
    """One layer's ``x -> (q, k, v)``, each ``[T, H*Dq]`` (values zero-padded per head), as the model's blocks take
    a projection group's outputs (A.X-K2's output gate after them, :data:`GATED_QUERY`); ``linears`` are every
    matrix it applies (profilers wrap them)."""

    __slots__ = ("spec", "ops", "q_a", "q_a_norm", "q", "q_skip", "gate", "gate_skip", "latent", "latent_norm",
                 "rope_key", "rope_norm", "kv_b", "placed", "linears")

    def __init__(self, spec: MlaSpec, ops: Any, projection: Callable[[str], Linear], norm: Callable[[str], Any],
                 placed: dict[str, Linear]):
        self.spec, self.ops, self.placed = spec, ops, placed
        lora = spec.q_lora_rank is not None
        self.q_a = projection("self_attn.q_a_proj") if lora else None
        self.q_a_norm = norm("self_attn.q_a_layernorm") if lora else None
        self.q = projection("self_attn.q_b_proj" if lora else "self_attn.q_proj")
        gated = spec.output_gate
        self.q_skip, self.gate, self.gate_skip = (projection(GATED_QUERY["query"][1]), *map(
            projection, GATED_QUERY["gate"])) if gated else (None, None, None)
        self.latent, self.rope_key = projection(LATENT), projection(ROPE_KEY)
        self.latent_norm = norm("self_attn.kv_a_layernorm")
        self.rope_norm = norm(ROPE_NORM) if spec.rope_norm else None
        self.kv_b = projection("self_attn.kv_b_proj")
        self._list()

    def _list(self) -> None:
        own = [p for p in (self.q_a, self.q, self.q_skip, self.gate, self.gate_skip, self.latent, self.rope_key,
                           self.kv_b) if p is not None]
        self.linears = own + [self.placed[name] for name in ("k_nope", "k_rope", "value")]

    def adapt(self, wrap: Callable[[str, int, int, Linear], Linear]) -> None:
        """Each matrix LoRA adapts (:meth:`MlaSpec.adaptable`) replaced by ``wrap(projection, start, stop, matrix)``:
        the checkpoint's projection it runs and the columns of that projection's outputs it makes."""
        spec, latent = self.spec, self.spec.kv_lora_rank
        if self.q_a is not None:
            self.q_a = wrap("q_a_proj", 0, spec.q_lora_rank, self.q_a)
        if self.q_skip is None:
            queries = spec.width_heads * spec.head_dim
            self.q = wrap("q_proj" if self.q_a is None else "q_b_proj", 0, queries, self.q)
        self.latent = wrap("kv_a_proj_with_mqa", 0, latent, self.latent)
        self.rope_key = wrap("kv_a_proj_with_mqa", latent, latent + spec.rope, self.rope_key)
        self.kv_b = wrap("kv_b_proj", 0, spec.width_heads * (spec.nope + spec.v_head_dim), self.kv_b)
        self._list()

    def __call__(self, x: Any) -> tuple[Any, ...]:
        """``(q, k, v)``, and A.X-K2's output gate after them."""
        ops, spec, placed = self.ops, self.spec, self.placed
        width = spec.width_heads * spec.head_dim
        gate: tuple[Any, ...] = ()
        if self.q_a is None:
            q = self.q(x)
        else:
            c = self.q_a(x)
            normed = ops.rms_norm(c, self.q_a_norm, spec.eps)
            q = self.q(normed)
            if self.q_skip is not None:
                q = ops.add(q, self.q_skip(c))
                gate = (ops.add(self.gate(normed), self.gate_skip(c)),)
        latent = ops.rms_norm(self.latent(x), self.latent_norm, spec.eps)
        per_head = ops.reshape(self.kv_b(latent), (-1, spec.nope + spec.v_head_dim))  # [T*H, nope + v]
        rope_key = self.rope_key(x)
        if self.rope_norm is not None:
            rope_key = ops.rms_norm(rope_key, self.rope_norm, spec.eps)
        k = ops.add(ops.reshape(placed["k_nope"](per_head), (-1, width)), placed["k_rope"](rope_key))
        v = ops.reshape(placed["value"](per_head), (-1, width))
        return (q, k, v, *gate)


class MlaOutput:
    """``o_proj`` of the attention output's value dims: ``[T, H*Dq] -> [T, hidden]``."""

    __slots__ = ("spec", "ops", "pick", "o", "linears")

    def __init__(self, spec: MlaSpec, ops: Any, o: Linear, placed: dict[str, Linear]):
        self.spec, self.ops, self.o = spec, ops, o
        self.pick = None if spec.v_head_dim == spec.head_dim else placed["pick_value"]
        self.linears = [o] if self.pick is None else [self.pick, o]

    def adapt(self, wrap: Callable[[Linear], Linear]) -> None:
        """``o_proj`` replaced by ``wrap(o_proj)`` (LoRA's)."""
        self.o = wrap(self.o)
        self.linears[-1] = self.o

    def __call__(self, attn: Any) -> Any:
        if self.pick is None:
            return self.o(attn)
        ops, spec = self.ops, self.spec
        values = self.pick(ops.reshape(attn, (-1, spec.head_dim)))  # [T*H, v]
        return self.o(ops.reshape(values, (-1, spec.width_heads * spec.v_head_dim)))
