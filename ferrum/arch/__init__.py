"""Architecture as data: what each model family's decoder block is made of, read from config.json by one key table."""

from ferrum.arch.families import FAMILIES
from ferrum.arch.rope import Rope
from ferrum.arch.spec import Architecture, LayerSpec

__all__ = ["FAMILIES", "Architecture", "LayerSpec", "Rope"]
