"""Speculative decoding: drafters propose tokens, the engine verifies them in its unified batch."""

from ferrum.spec.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
