"""Token-wise ops, each one jitted function (one fused XLA kernel per shape); math in float32."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ferrum import hookimpl

from ferrum_jax.arrays import ON_CPU

F32 = jnp.float32


def matmul_t(x, w):
    """``x @ w.T`` for ``w [out, in]``, contracting w's dim 1 in place, accumulating in float32.

    On XLA:CPU both sides go up to float32 first: its bfloat16 GEMM is an order of magnitude slower.
    """
    if ON_CPU:
        x, w = x.astype(F32), w.astype(F32)
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=F32)


@jax.jit
def _linear(x, weight, bias):
    out = matmul_t(x, weight)
    if bias is not None:
        out = out + bias.astype(F32)
    return out.astype(x.dtype)


@hookimpl
def linear(x, weight, bias):
    return _linear(x, weight, bias)


def _normalize(x, weight, eps):
    xf = x.astype(F32)
    return (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * weight.astype(F32)).astype(x.dtype)


_rms_norm = jax.jit(_normalize)


@hookimpl
def rms_norm(x, weight, eps):
    return _rms_norm(x, weight, eps)


@jax.jit
def _add_rms_norm(x, residual, weight, eps):
    summed = x + residual
    return _normalize(summed, weight, eps), summed


@hookimpl
def add_rms_norm(x, residual, weight, eps):
    return _add_rms_norm(x, residual, weight, eps)


@jax.jit
def _rope(x, positions, inv_freq):
    half = x.shape[-1] // 2
    angles = positions.astype(F32)[:, None] * inv_freq.astype(F32)[None, :]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    xf = x.astype(F32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@hookimpl
def rope(x, positions, inv_freq):
    return _rope(x, positions, inv_freq)


@jax.jit
def _silu_mul(gate, up):
    g = gate.astype(F32)
    return (g * jax.nn.sigmoid(g) * up.astype(F32)).astype(gate.dtype)


@hookimpl
def silu_mul(gate, up):
    return _silu_mul(gate, up)


@jax.jit
def _gelu_tanh_mul(gate, up):
    return (jax.nn.gelu(gate.astype(F32), approximate=True) * up.astype(F32)).astype(gate.dtype)


@hookimpl
def gelu_tanh_mul(gate, up):
    return _gelu_tanh_mul(gate, up)


@jax.jit
def _layer_norm(x, weight, bias, eps):
    xf = x.astype(F32)
    centered = xf - xf.mean(axis=-1, keepdims=True)
    out = centered * lax.rsqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    out = out if weight is None else out * weight.astype(F32)
    return (out if bias is None else out + bias.astype(F32)).astype(x.dtype)


@hookimpl
def layer_norm(x, weight, bias, eps):
    return _layer_norm(x, weight, bias, eps)


@functools.partial(jax.jit, static_argnames="tanh")
def _gelu(x, tanh):
    return jax.nn.gelu(x.astype(F32), approximate=tanh).astype(x.dtype)


@hookimpl
def gelu(x, tanh):
    return _gelu(x, tanh=bool(tanh))


@jax.jit
def _relu_squared(x):
    return jnp.square(jax.nn.relu(x))


@hookimpl
def relu_squared(x):
    return _relu_squared(x)


@hookimpl
def relu(x):
    return _relu(x)


@jax.jit
def _relu(x):
    return jax.nn.relu(x)


@jax.jit
def _xielu(x, alpha_p, alpha_n, beta, eps):
    ap, an, b, e = (jnp.asarray(v, dtype=x.dtype) for v in (alpha_p, alpha_n, beta, eps))
    return jnp.where(x > 0, ap * x * x + b * x, (jnp.expm1(jnp.minimum(x, e)) - x) * an + b * x)


@hookimpl
def xielu(x, alpha_p, alpha_n, beta, eps):
    return _xielu(x, alpha_p, alpha_n, beta, eps)


@functools.partial(jax.jit, static_argnames="levels")
def _quantize_activations(x, levels):
    rows = x.astype(F32)  # the grid in float32 whatever x's dtype; jnp.round rounds half to even, as torch does
    scale = levels / jnp.maximum(jnp.abs(rows).max(axis=-1, keepdims=True), 1e-5)
    # XLA turns a division by a broadcast row into a product with its reciprocal, an ulp off the quotient that
    # transformers (torch) computes: the barrier keeps the division.
    scale = lax.optimization_barrier(jnp.broadcast_to(scale, rows.shape))
    return (jnp.clip(jnp.round(rows * scale), -levels - 1, levels) / scale).astype(x.dtype)


@hookimpl
def quantize_activations(x, levels):
    return _quantize_activations(x, levels=int(levels))


@jax.jit
def _mul(a, b):
    return (a * b).astype(a.dtype)


@hookimpl
def mul(a, b):
    return _mul(a, b)


@jax.jit
def _clip(x, limit):
    return jnp.clip(x, -limit, limit).astype(x.dtype)


@hookimpl
def clip(x, limit):
    return _clip(x, float(limit))


@hookimpl
def mul_scalar(x, factor):
    return x * jnp.asarray(factor, dtype=x.dtype)


@jax.jit
def _softcap(x, cap):
    return (cap * jnp.tanh(x.astype(F32) / cap)).astype(x.dtype)


@hookimpl
def softcap(x, cap):
    return _softcap(x, cap)
