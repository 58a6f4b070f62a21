"""The serving engine: continuous batching, prefix caching, preemption, sampling, streaming."""

from ferrum.engine.async_engine import AsyncEngine, RequestHandle, RequestStream
from ferrum.engine.engine import Engine, EngineConfig
from ferrum.engine.metrics import EngineMetrics
from ferrum.engine.request import FinishReason, RequestMetrics, RequestOutput

__all__ = [
    "AsyncEngine",
    "RequestHandle",
    "Engine",
    "EngineConfig",
    "EngineMetrics",
    "FinishReason",
    "RequestMetrics",
    "RequestOutput",
    "RequestStream",
]
