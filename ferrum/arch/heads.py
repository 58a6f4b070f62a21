"""A layer's attention heads as its checkpoint stores them, where they differ from the model's uniform heads.

Every layer runs the model's heads (``num_heads`` queries over ``num_kv_heads`` key/value heads of ``head_dim``
dims) in one KV pool. A family whose layers store fewer or narrower heads says per layer what it stores
(:class:`StoredHeads`, ``LayerSpec.heads``); the load makes each stored tensor the model's exactly (zero heads and
dims attend and add nothing; repeated key/value heads are read as the stored ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ferrum.arch.differential import paired_values
from ferrum.errors import ConfigError

#: How a layer's fewer key/value heads become the model's: "repeat", each stands for the consecutive groups of
#: queries it serves, whose queries are all stored (Gemma 4's full layers, Nemotron NAS, Baichuan-M1, MiMo-V2-Flash);
#: "zero", the last groups are zero heads whose queries the checkpoint lacks too (OpenELM).
FEWER_KV = ("repeat", "zero")


@dataclass(frozen=True)
class StoredHeads:
    """What one layer stores of its attention, each None where it is the model's."""

    #: Query heads stored. With the model's key/value groups, each group's queries are padded with zero heads after
    #: its own (Laguna's num_attention_heads_per_layer, Step 3.5's sliding layers); with ``fewer_kv`` "zero", the
    #: stored groups' queries (as many per group as the model's).
    query_heads: int | None = None
    #: Key/value heads stored, made the model's as ``fewer_kv`` says.
    kv_heads: int | None = None
    fewer_kv: str = "repeat"
    #: Dims of each stored q/k/v head (Gemma 4's sliding layers; DiffLlama's heads, half the differential ones),
    #: each head padded with zero dims at its end; the q/k norms then run as the stored head's RMSNorm exactly.
    head_dim: int | None = None
    #: The layer stores no v_proj: its values are its key projection (Gemma 4's ``attention_k_eq_v``), taken before
    #: the k norm and rope, with the value norm of their own.
    values_are_keys: bool = False

    def __post_init__(self) -> None:
        if self.fewer_kv not in FEWER_KV:
            raise ConfigError(f"StoredHeads.fewer_kv is {self.fewer_kv!r}; it must be one of {FEWER_KV}")


@dataclass(frozen=True)
class HeadLayout:
    """One layer's heads as stored beside the model's, resolved from its :class:`StoredHeads` and the architecture;
    :meth:`order` says where each loaded row (or o_proj column) of an attention tensor comes from."""

    heads: int  # the model's query heads, key/value heads (groups) and head dims
    groups: int
    head_dim: int
    stored_groups: int  # the groups the checkpoint holds (the rest zero heads)
    per_group: int  # the query heads it holds per group held (the rest of each group's zero heads)
    kv_heads: int  # the key/value heads it holds, each standing for stored_groups / kv_heads groups
    dim: int  # the stored q/k head's dims
    value_dim: int  # the stored value head's dims: o_proj's inputs per head (Architecture.value_head_dim)
    tiled: bool  # stored query head r * groups + j reads key/value head j (PLaMo's tiled heads)
    paired: bool  # DiffLlama: loaded value head g is stored heads g % (kv/2) and kv/2 + g % (kv/2), joined
    values_are_keys: bool

    @property
    def query_heads(self) -> int:
        """The query heads the checkpoint holds."""
        return self.stored_groups * self.per_group

    @property
    def identity(self) -> bool:
        """Whether every attention tensor loads as stored."""
        return (self.stored_groups, self.per_group * self.groups, self.kv_heads, self.dim, self.value_dim) == (
            self.groups, self.heads, self.groups, self.head_dim, self.head_dim) and not (self.tiled or self.paired)

    def rows(self, kind: str) -> int:
        """The stored width of an attention axis: "q" (q_proj's rows, and the output gate's), "k", "v", "o" (o_proj's
        inputs) or "heads" (one per query head: the sinks); :meth:`order` takes "head" too (one head's dims)."""
        return {"q": self.query_heads * self.dim, "k": self.kv_heads * self.dim, "v": self.kv_heads * self.value_dim,
                "o": self.query_heads * (self.dim if self.paired else self.value_dim), "heads": self.query_heads}[kind]

    def order(self, kind: str) -> np.ndarray | None:
        """For each loaded entry of axis ``kind`` (see :meth:`rows`), the stored entry it is, or -1 for a zero;
        None where the axis loads as stored."""
        if kind == "head":  # one head's dims (a q/k norm's weight)
            order = _dims(np.zeros(1, dtype=int), self.dim, self.head_dim).reshape(-1)
            return None if self.dim == self.head_dim else order
        if kind == "o" and self.paired:  # DiffLlama's o_proj reads the heads combined, at their stored width
            return None
        if kind == "v" and self.paired:  # each value head joined with its pair (ferrum.arch.differential)
            order = paired_values(np.arange(self.kv_heads * self.dim), self.kv_heads)
        elif kind in ("k", "v"):
            g = np.arange(self.groups)
            heads = np.where(g < self.stored_groups, g // (self.stored_groups // self.kv_heads), -1)
            order = _dims(heads, self.dim if kind == "k" else self.value_dim, self.head_dim).reshape(-1)
        else:
            g, p = np.divmod(np.arange(self.heads), self.heads // self.groups)
            stored = p * self.stored_groups + g if self.tiled else g * self.per_group + p
            heads = np.where((g < self.stored_groups) & (p < self.per_group), stored, -1)
            width = {"q": self.dim, "o": self.value_dim, "heads": 1}[kind]
            order = _dims(heads, width, 1 if kind == "heads" else self.head_dim).reshape(-1)
        return None if np.array_equal(order, np.arange(len(order))) else order

    def padding(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """What the load does to o_proj's inputs, for refusals by name: ``(what, the widths named, the widths)``,
        the widths those a packed matrix's groups must divide for it to be done in whole groups."""
        out = []
        if self.per_group * self.groups < self.heads:
            own, padded = self.per_group * self.value_dim, self.heads // self.groups * self.value_dim
            out.append((f"this layer's {self.query_heads} query heads are padded to {self.heads} at load",
                        f"each key/value head's queries ({own} inputs) and their padded width ({padded})",
                        (own, padded)))
        if self.stored_groups < self.groups:
            columns = self.query_heads * self.value_dim
            out.append(("this layer's fewer key/value heads are padded with zero heads and their queries at load",
                        f"its {columns} inputs", (columns,)))
        if self.value_dim != self.head_dim and not self.paired:
            out.append((f"this layer's heads of {self.value_dim} inputs are padded with zeros to {self.head_dim} at "
                        "load", f"{self.value_dim} and {self.head_dim}", (self.value_dim, self.head_dim)))
        if self.tiled:
            out.append(("its query heads are regrouped at load (tiled key/value heads)", f"head_dim ({self.head_dim})",
                        (self.head_dim,)))
        return out


def layout(config: Any, spec: Any) -> HeadLayout:
    """Layer ``spec``'s heads (a LayerSpec of ``config``'s architecture) as stored and as loaded."""
    arch, stored = config.arch, spec.heads
    heads, groups, d = config.num_heads, config.num_kv_heads, config.head_dim
    kv = stored.kv_heads or groups
    held = kv if stored.fewer_kv == "zero" else groups
    queries = stored.query_heads or heads * held // groups
    dim = stored.head_dim or d
    return HeadLayout(heads, groups, d, held, queries // held, kv, dim, arch.value_head_dim or dim,
                      arch.tiled_kv_heads, arch.differential, stored.values_are_keys)


def _dims(heads: np.ndarray, width: int, loaded: int) -> np.ndarray:
    """``[len(heads), loaded]``: each loaded head's dims as stored entries of heads ``width`` wide (-1: a zero dim, or
    every dim of a head -1, a zero head)."""
    x = np.arange(loaded)
    return np.where((heads[:, None] >= 0) & (x[None, :] < width), heads[:, None] * width + x[None, :], -1)
