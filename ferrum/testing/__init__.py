"""Test kit for backend plugin authors: conformance of every op and of a whole model.

Its names load on first use: Ferrum's pytest plugin (``ferrum.testing.pytest_plugin``) is imported by
every pytest run where Ferrum is installed, and must not import the kit until ``--ferrum-backend`` asks.
"""

from typing import Any

__all__ = ["Check", "ConformanceReport", "assert_conformance", "check_backend", "checks"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ferrum.testing import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module 'ferrum.testing' has no attribute {name!r}")
