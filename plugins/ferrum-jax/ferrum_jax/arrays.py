"""Transfers, dtypes and the layout ops: thin, since XLA fuses what follows them."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ferrum import hookimpl
from ferrum.backends import BackendInfo
from ferrum.errors import UnsupportedFeatureError
from ferrum.quant import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

from ferrum_jax import API_VERSION

DEVICE = jax.devices()[0]
ON_CPU = DEVICE.platform == "cpu"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int32": jnp.int32}
#: bfloat16 matmuls on XLA:CPU run 12-15x slower than float32, so float32 is the CPU default.
_DEFAULT_DTYPE = "float32" if ON_CPU else "bfloat16"


def _memory_bytes() -> int | None:
    stats = DEVICE.memory_stats() if hasattr(DEVICE, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@hookimpl
def backend_info() -> BackendInfo:
    device = "cpu" if ON_CPU else f"{DEVICE.platform}:{DEVICE.id}"
    return BackendInfo(
        name="jax", device=device, dtypes=("float32", "bfloat16"), default_dtype=_DEFAULT_DTYPE,
        memory_bytes=_memory_bytes(), api_version=API_VERSION,
        quant_formats=tuple((b, g) for b in SUPPORTED_BITS for g in SUPPORTED_GROUP_SIZES),
        note=f"jax {jax.__version__} on {DEVICE.device_kind}",
    )


def dtype_of(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise UnsupportedFeatureError(
            f"the jax backend computes in float32 or bfloat16, not {name!r}; pass one of those as dtype"
        ) from None


@hookimpl
def from_numpy(array, dtype):
    # Converting on the host (ml_dtypes rounds to nearest even, as XLA does) costs no compile per shape.
    host = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype_of(dtype))
    return jax.device_put(host, DEVICE)


@hookimpl
def to_numpy(x):
    host = np.asarray(x)
    return host.astype(np.float32) if jnp.issubdtype(host.dtype, jnp.floating) else host


@hookimpl
def cast(x, dtype):
    return x.astype(dtype_of(dtype))


@hookimpl
def upload_weight(name, array, dtype):
    # Kept as [out, in]: linear contracts on dim 1 (x @ W.T would materialise a transpose on XLA:CPU).
    return from_numpy(array, dtype)


@hookimpl
def reshape(x, shape):
    return jnp.reshape(x, shape)


@hookimpl
def take_rows(x, indices):
    return jnp.take(x, indices, axis=0)


@hookimpl
def concat(parts):
    return jnp.concatenate(parts, axis=0)


@hookimpl
def split(x, sizes):
    return jnp.split(x, np.cumsum(sizes[:-1]), axis=-1)


@hookimpl
def add(a, b):
    return a + b
