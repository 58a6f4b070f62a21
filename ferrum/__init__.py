"""Ferrum: decoder-only LLM inference on pluggable compute backends."""

from ferrum import backends, errors
from ferrum.hookspec import API_VERSION, hookimpl
from ferrum.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["API_VERSION", "SamplingParams", "backends", "errors", "hookimpl", "load", "__version__"]


def load(path=None, backend=None, dtype=None, **options):
    """Load a checkpoint folder (Hugging Face or mlx-community quantized), a GGUF file or a Hugging Face
    repo id, or with no ``path`` the embedded default model; returns a :class:`ferrum.api.LLM`."""
    from ferrum.api import LLM

    return LLM.load(path, backend=backend, dtype=dtype, **options)
