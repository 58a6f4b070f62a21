"""Settings the MLX backend makes only on Metal, checked here with MLX's device calls recorded
(this machine has no Metal: the real calls run on a Mac)."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")
ops = pytest.importorskip("ferrum_mlx.ops")


@pytest.fixture
def metal(monkeypatch):
    """Pretend to be on Metal with 12 GB recommended; returns the wired limits set."""
    wired: list[int] = []
    monkeypatch.setattr(ops, "_METAL", True)
    monkeypatch.setattr(ops, "_wired", False)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 12 * 2**30}, raising=False)
    monkeypatch.setattr(mx, "set_wired_limit", lambda size: wired.append(size) or 0, raising=False)
    return wired


def test_the_recommended_working_set_is_wired_once_a_model_allocates_its_cache(metal):
    assert metal == []
    ops.kv_alloc(1, 2, 4, 1, 8, "float32")
    ops.kv_alloc(1, 2, 4, 1, 8, "float32")
    assert metal == [12 * 2**30]
    assert ops.backend_info().memory_bytes == 12 * 2**30


def test_nothing_is_wired_without_a_recommended_size(metal, monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {})
    ops._wire_recommended_memory()
    assert metal == []


def test_nothing_is_wired_on_a_cpu(monkeypatch):
    wired: list[int] = []
    monkeypatch.setattr(ops, "_METAL", False)
    monkeypatch.setattr(ops, "_wired", False)
    monkeypatch.setattr(mx, "set_wired_limit", lambda size: wired.append(size) or 0, raising=False)
    ops.kv_alloc(1, 2, 4, 1, 8, "float32")
    assert wired == []
