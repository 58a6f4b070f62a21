"""Ferrum's numpy CPU backend: runs anywhere numpy does, float32 compute."""

from __future__ import annotations

from ferrum.backends import BackendProbe
from ferrum.hookspec import API_VERSION, hookimpl


@hookimpl
def backend_probe() -> BackendProbe:
    return BackendProbe(available=True, device="cpu", priority=30, api_version=API_VERSION)


@hookimpl
def backend_load():
    from ferrum_cpu import ops

    return ops
