"""Ferrum's torch backend, registered as ``cuda``.

This module is the entry-point object: importing it must stay cheap, so it
never imports torch. :func:`backend_probe` answers from the file system
(is torch installed, is an NVIDIA driver loaded); :func:`backend_load`
imports :mod:`ferrum_cuda.ops`, which imports torch and picks the device once.

Devices
-------
* An NVIDIA GPU: ``cuda:0``, priority 10 (the automatic choice after Metal).
* No GPU: the same ops run on torch's CPU device with priority 90, the last
  automatic choice, so CI machines without a GPU still run the backend's
  parity tests.
* ``FERRUM_TORCH_DEVICE`` (``cpu``, ``cuda``, ``cuda:1`` ...) overrides the
  guess. If a CUDA device is asked for (or guessed) but torch has no CUDA, the
  ops fall back to the CPU and say so (a ``RuntimeWarning`` and
  ``ferrum_cuda.ops.DEVICE_NOTE``).
"""

from __future__ import annotations

import importlib.util
import os

from ferrum.backends import BackendProbe
from ferrum.hookspec import API_VERSION, hookimpl

#: Environment variable that chooses the torch device ("cpu", "cuda:1", ...).
DEVICE_ENV = "FERRUM_TORCH_DEVICE"

#: Files that exist when an NVIDIA kernel driver is loaded.
_NVIDIA_MARKERS = ("/dev/nvidiactl", "/proc/driver/nvidia/version")

GPU_PRIORITY = 10
CPU_PRIORITY = 90


def _torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken or half-imported torch
        return False


def nvidia_gpu_present() -> bool:
    """Cheap guess: is an NVIDIA driver loaded on this machine?"""
    return any(os.path.exists(path) for path in _NVIDIA_MARKERS)


def requested_device() -> str | None:
    """The device named by ``FERRUM_TORCH_DEVICE``, if any (normalised)."""
    value = os.environ.get(DEVICE_ENV, "").strip().lower()
    return value or None


def guess_device() -> tuple[str, str]:
    """``(device, note)`` chosen without importing torch."""
    override = requested_device()
    if override is not None:
        return override, f"device set by {DEVICE_ENV}={override}"
    if nvidia_gpu_present():
        return "cuda:0", ""
    return "cpu", "no NVIDIA GPU found; runs on the torch CPU device"


@hookimpl
def backend_probe() -> BackendProbe:
    if not _torch_installed():
        return BackendProbe(
            available=False,
            reason="torch is not installed; install it with `pip install 'ferrum[torch]'` "
            "(or a CUDA build of torch from pytorch.org)",
        )
    device, note = guess_device()
    priority = GPU_PRIORITY if device.startswith("cuda") else CPU_PRIORITY
    return BackendProbe(available=True, device=device, reason=note, priority=priority, api_version=API_VERSION)


@hookimpl
def backend_load():
    from ferrum_cuda import ops

    return ops
