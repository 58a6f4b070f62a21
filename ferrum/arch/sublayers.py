"""Checkpoint layers that each hold several of Ferrum's (LongCat-Flash's two attention + MLP sub-blocks a layer).

Ferrum runs every sub-block as a layer of its own (its own KV pool layer, its own :class:`ferrum.arch.spec.LayerSpec`),
so its layer ``n`` is the checkpoint's layer ``n // count``; the modules that the checkpoint keeps one of per
sub-block are numbered inside it (``self_attn.1.q_a_proj``, ``mlps.1.gate_proj``), and the others (LongCat-Flash's
shortcut MoE, ``mlp.router`` / ``mlp.experts``) belong to its first sub-block. Only the names change: shapes and
values are the stored ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SubLayers:
    """``count`` Ferrum layers per checkpoint layer; ``numbered``: (Ferrum's module, the checkpoint's) of the modules
    kept once per sub-block, the checkpoint's numbered after its first component (``("mlp.gate_proj",
    "mlps.gate_proj")``: ``mlp.gate_proj`` of sub-block 1 is stored as ``mlps.1.gate_proj``)."""

    count: int
    numbered: tuple[tuple[str, str], ...]
    #: Modules the checkpoint keeps once per layer under their own names that belong to a later sub-block: (the
    #: module, its sub-block) (RWKV-7's channel mix, ``ffn`` and ``ffn_norm``, its layers' second).
    later: tuple[tuple[str, int], ...] = ()
    #: What each checkpoint layer holds and why LoRA cannot adapt it, as a refusal says it.
    lora_refusal: str = "several sub-blocks, whose projections Ferrum does not adapt"

    def stored(self, prefix: str, name: str) -> str:
        """The checkpoint's name of Ferrum's tensor ``name`` (names outside the layers unchanged)."""
        split = _split(prefix, name)
        if split is None:
            return name
        n, rest = split
        layer, sub = divmod(n, self.count)
        for ours, theirs in self.numbered:
            if rest == ours or rest.startswith(ours + "."):
                head, _, tail = theirs.partition(".")
                return f"{prefix}layers.{layer}.{head}.{sub}{'.' + tail if tail else ''}{rest[len(ours):]}"
        return f"{prefix}layers.{layer}.{rest}"

    def model(self, prefix: str, name: str) -> str:
        """Ferrum's name of checkpoint tensor ``name``: the inverse of :meth:`stored`."""
        split = _split(prefix, name)
        if split is None:
            return name
        layer, rest = split
        for ours, theirs in self.numbered:
            head, _, tail = theirs.partition(".")
            first, _, after = rest.partition(".")
            index, _, inner = after.partition(".")
            if first != head or not index.isdigit():
                continue
            if tail and inner != tail and not inner.startswith(tail + "."):
                continue
            remainder = inner[len(tail):] if tail else ("." + inner if inner else "")
            return f"{prefix}layers.{layer * self.count + int(index)}.{ours}{remainder}"
        sub = dict(self.later).get(rest.partition(".")[0], 0)
        return f"{prefix}layers.{layer * self.count + sub}.{rest}"


def _split(prefix: str, name: str) -> tuple[int, str] | None:
    """``(layer, the rest of the name)`` of a layer's tensor, else None."""
    stem = prefix + "layers."
    if not name.startswith(stem):
        return None
    index, _, rest = name[len(stem):].partition(".")
    return (int(index), rest) if index.isdigit() and rest else None
