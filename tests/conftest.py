"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from ferrum import backends


@pytest.fixture
def registered():
    names = []

    def register(name, plugin):
        backends.register_plugin(name, plugin)
        names.append(name)

    yield register
    for name in names:
        backends.unregister_plugin(name)
