"""Ferrum's MLX backend: Metal on Apple Silicon, CPU elsewhere.

Importing this module is cheap; ``mlx`` is imported only when the backend is
loaded (or, on macOS, to ask whether Metal is there).
"""

from __future__ import annotations

import importlib.util
import platform

from ferrum.backends import BackendProbe
from ferrum.hookspec import API_VERSION, hookimpl


@hookimpl
def backend_probe() -> BackendProbe:
    if importlib.util.find_spec("mlx") is None:
        return BackendProbe(
            available=False,
            reason="mlx is not installed: pip install 'mlx[cpu]' (Linux) or mlx (macOS)",
        )
    if platform.system() == "Darwin":
        import mlx.core as mx

        if mx.metal.is_available():
            return BackendProbe(available=True, device="metal", priority=0, api_version=API_VERSION)
    # MLX's CPU matmul is 10-20x slower than numpy's BLAS (benchmarks/README.md), so
    # without Metal the numpy backend (priority 30) is the better automatic choice; its
    # CPU quantized matmul is a plain loop, slower than torch's int4 kernels (priority 90).
    return BackendProbe(
        available=True, device="cpu", priority=40, quantized_priority=95, api_version=API_VERSION,
        reason="MLX on the CPU (no Metal here); numpy is faster, torch for quantized weights",
    )


@hookimpl
def backend_load():
    from ferrum_mlx import ops

    return ops
