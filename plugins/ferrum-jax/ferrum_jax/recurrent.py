"""The recurrent mixers' ops (API 1.16; ``selective_scan`` 1.19, ``rg_lru`` 1.25, ``gated_delta_rule``'s
``lower_bound`` 1.27, ``wkv7`` 1.30): :mod:`ferrum.recurrent.batched` in jnp, its device parts jitted and its loops
over time ``lax.scan``. A prompt's rule compiles in about a second, so token, sequence and chunk counts are padded to
powers of two (:mod:`ferrum_jax.buckets`): one compile per bucket, not per prompt length."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

import ferrum.recurrent.batched as batched
from ferrum import hookimpl

from ferrum_jax.arrays import from_numpy
from ferrum_jax.buckets import bucket

F32 = jnp.float32
_FRAMEWORK = batched.Framework(jnp, lambda array: from_numpy(array, None), lambda x, dtype: x.astype(dtype),
                               scan=lax.scan, jit=jax.jit, bucket=bucket)


@partial(jax.jit, static_argnums=2)
def _gated(gate, x, activation):
    """``x`` times ``activation(gate)``, computed in float32, in ``x``'s dtype (one compile per activation)."""
    return (x.astype(F32) * activation(gate.astype(F32))).astype(x.dtype)


@hookimpl
def sigmoid_mul(gate, x):
    return _gated(gate, x, jax.nn.sigmoid)


@hookimpl
def softplus_mul(gate, x):
    return _gated(gate, x, jax.nn.softplus)


@hookimpl
def causal_conv1d(x, weight, state, cu_seqlens, silu):
    return batched.causal_conv1d(_FRAMEWORK, x, weight, state, cu_seqlens, bool(silu))


@hookimpl
def gated_delta_rule(q, k, v, a, b, a_log, dt_bias, state, cu_seqlens, beta_scale=1.0, lower_bound=None):
    return batched.gated_delta_rule(_FRAMEWORK, q, k, v, a, b, a_log, dt_bias, state, cu_seqlens, float(beta_scale),
                                    lower_bound)


@hookimpl
def selective_scan(x, dt, a_log, b, c, d, dt_bias, state, cu_seqlens):
    return batched.selective_scan(_FRAMEWORK, x, dt, a_log, b, c, d, dt_bias, state, cu_seqlens)


@hookimpl
def rg_lru(x, gate_x, gate_a, a_param, state, cu_seqlens, starts):
    return batched.rg_lru(_FRAMEWORK, x, gate_x, gate_a, a_param, state, cu_seqlens, starts)


@hookimpl
def wkv7(r, w, k, v, a, b, state, cu_seqlens):
    return batched.wkv7(_FRAMEWORK, r, w, k, v, a, b, state, cu_seqlens)
