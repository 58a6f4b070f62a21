"""The family table: per ``model_type``, the config keys that change the math and how they build an Architecture.

Adding a family is one entry in its kind's module (its keys and a builder) plus tests; the model reads only the
resulting :class:`ferrum.arch.spec.Architecture`. Each module holds one kind's builders and its part of the table
(``TABLE``): dense Llama-shaped families (:mod:`.llama_like`), Gemma's (:mod:`.gemma`), LayerNorm and ungated-MLP
ones (:mod:`.layer_norm`), the older GPT-style decoders (:mod:`.classic`), latent attention (:mod:`.latent`),
routed experts (:mod:`.moe`), linear-attention hybrids (:mod:`.hybrid`), Mamba's (:mod:`.mamba`), RWKV's
(:mod:`.rwkv`) and those whose layers differ in shape (:mod:`.heterogeneous`); what more than one kind reads is in
:mod:`._shared`.
"""

from __future__ import annotations

from types import ModuleType

from ferrum.arch.families import classic, gemma, heterogeneous, hybrid, latent, layer_norm, llama_like, mamba, moe, rwkv
from ferrum.arch.families._shared import Family, Sizes, lift_nested, read_sizes
from ferrum.errors import FerrumError

__all__ = ["FAMILIES", "Family", "Sizes", "lift_nested", "read_sizes"]


def _merged(*kinds: ModuleType) -> dict[str, Family]:
    """The kinds' tables as one; a model_type in two of them is refused, as neither would be sure to win."""
    merged: dict[str, Family] = {}
    home: dict[str, str] = {}
    for kind in kinds:
        for name, family in kind.TABLE.items():
            if name in merged:
                raise FerrumError(f"model_type {name!r} is in both {home[name]} and {kind.__name__}'s TABLE; "
                                  "keep one of the two")
            merged[name], home[name] = family, kind.__name__
    return merged


FAMILIES: dict[str, Family] = _merged(llama_like, gemma, layer_norm, classic, latent, moe, hybrid, mamba,
                                      heterogeneous, rwkv)
