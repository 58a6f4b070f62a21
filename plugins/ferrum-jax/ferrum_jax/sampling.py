"""Sampling on the device: ``ferrum.sampling.sample_numpy``'s semantics in one jitted function,
so only the chosen ids (and the asked-for logprobs) cross to the host."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ferrum import hookimpl
from ferrum.sampling import SampleResult

from ferrum_jax.buckets import bucket

F32 = jnp.float32


@partial(jax.jit, static_argnames=("greedy", "num_logprobs"))
def _sample(logits, temperature, top_k, top_p, min_p, uniform, rows, tokens, scale, shift, offset, greedy,
            num_logprobs):
    unusable = jnp.isnan(logits).any(axis=-1)
    x = logits.astype(F32)
    old = x[rows, tokens] + offset  # padding entries have row n: clamped here, dropped by the scatter below
    new = jnp.where(old > 0, old / scale, old * scale) + shift
    x = x.at[rows, tokens].set(new, mode="drop")
    vocab = x.shape[-1]
    chosen = jnp.argmax(x, axis=-1)
    order = None
    if not greedy or num_logprobs:
        probs = jax.nn.softmax(x / jnp.where(temperature > 0, temperature, 1.0)[:, None], axis=-1)
        order = jnp.argsort(-x, axis=-1, stable=True)
    if not greedy:
        sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
        rank = jnp.arange(vocab)[None, :]
        keep = rank < jnp.where(top_k > 0, top_k, vocab)[:, None]
        top_k_mass = jnp.where(keep, sorted_probs, 0.0).sum(axis=-1, keepdims=True)
        keep &= (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p[:, None] * top_k_mass
        keep &= sorted_probs >= min_p[:, None] * sorted_probs[:, :1]
        keep |= rank == 0
        cdf = jnp.cumsum(jnp.where(keep, sorted_probs, 0.0), axis=-1)
        pick = (cdf <= uniform[:, None] * cdf[:, -1:]).sum(axis=-1)
        sampled = jnp.take_along_axis(order, jnp.minimum(pick, vocab - 1)[:, None], axis=-1)[:, 0]
        chosen = jnp.where(temperature > 0, sampled, chosen)
    if not num_logprobs:
        return chosen, unusable
    logp = jax.nn.log_softmax(x, axis=-1)
    top = order[:, :num_logprobs]
    return (chosen, unusable, jnp.take_along_axis(logp, chosen[:, None], axis=-1)[:, 0], top,
            jnp.take_along_axis(logp, top, -1))


def _padded(values: np.ndarray, size: int, fill) -> np.ndarray:
    out = np.full(size, fill, dtype=values.dtype)
    out[: len(values)] = values
    return out


@hookimpl
def sample(logits, batch):
    # Penalties touch a few (row, token) pairs whose count grows every step: pad it to a bucket.
    m = bucket(len(batch.adjust_rows), 8)
    adjust = (_padded(batch.adjust_rows, m, logits.shape[0]), _padded(batch.adjust_tokens, m, 0),
              _padded(batch.adjust_scale, m, 1.0), _padded(batch.adjust_shift, m, 0.0),
              _padded(batch.adjust_offset, m, 0.0))
    out = _sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.uniform, *adjust,
                  greedy=bool(batch.all_greedy), num_logprobs=int(batch.num_logprobs))
    tokens, unusable, *logprobs = (np.asarray(part) for part in jax.device_get(out))
    if not logprobs:
        return SampleResult(tokens.astype(np.int64), unusable=unusable)
    chosen, top, top_logp = logprobs
    return SampleResult(tokens.astype(np.int64), chosen.astype(np.float32), top.astype(np.int64),
                        top_logp.astype(np.float32), unusable)
