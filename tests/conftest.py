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


@pytest.fixture(scope="session")
def built_once():
    """``built_once(build, tmp_path_factory)``: ``build(tmp_path_factory)``'s checkpoints, built the first time only,
    so that a family's own module and tests/test_moe_families.py share them in a session."""
    built: dict = {}

    def get(build, tmp_path_factory):
        if build not in built:
            built[build] = build(tmp_path_factory)
        return built[build]

    return get


@pytest.fixture(scope="module")
def checkpoints(request, tmp_path_factory, built_once):
    """The test module's ``build_checkpoints(tmp_path_factory)`` (variant -> (folder, transformers model)), built
    once a session through :func:`built_once`; a module that builds otherwise defines its own ``checkpoints``."""
    return built_once(request.module.build_checkpoints, tmp_path_factory)
