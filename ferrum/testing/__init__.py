"""Test kit for backend plugin authors: conformance of every op and of a whole model."""

from ferrum.testing.conformance import ConformanceReport, assert_conformance, check_backend

__all__ = ["ConformanceReport", "assert_conformance", "check_backend"]
