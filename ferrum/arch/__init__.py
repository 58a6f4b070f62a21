"""Architecture as data: what each model family's decoder block is made of, read from config.json by one key table.

The table itself is :data:`ferrum.arch.families.FAMILIES`, merged from one module per kind of family (imported
from there: it composes these pieces with :mod:`ferrum.moe`, which builds on them, so importing it here made a
cycle).
"""

from ferrum.arch.rope import Rope
from ferrum.arch.spec import Architecture, LayerSpec

__all__ = ["Architecture", "LayerSpec", "Rope"]
