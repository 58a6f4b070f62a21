"""An OpenAI-compatible HTTP server over the continuous-batching engine (``ferrum serve``)."""

from ferrum.serve.app import ServeConfig, create_app
from ferrum.serve.server import ServeOptions, load_for_serving, serve

__all__ = ["ServeConfig", "ServeOptions", "create_app", "load_for_serving", "serve"]
