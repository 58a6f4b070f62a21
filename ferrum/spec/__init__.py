"""Speculative decoding: drafters propose tokens, the engine verifies them in its unified batch."""

from ferrum.spec.config import SpeculativeConfig, resolve as resolve_speculative

__all__ = ["SpeculativeConfig", "resolve_speculative"]
