"""Expert routing on the device: ``moe_route``'s two rules (the grouped ones with their per-expert scales, API 1.16,
chosen by the logits, 1.23, and weighing chosen experts of dropped groups, 1.28), each one jitted function per token
count.

Boundary ties go to the lowest expert indices (``lax.top_k`` is stable), where ``torch.topk``, and so
Ferrum's host reference, picks by its CPU selection. Ties of float32 router scores are rare outside constructed
inputs, but for A.X-K2's rule (1.28) the dropped groups' experts all tie at the masked 0 whenever they are chosen:
grouped A.X-K2 configs then route apart from the reference, as on MLX (``ferrum.moe.routing.NOAUX_TC_ZERO_MASKED``).
The expert ops themselves stay the core's reference compositions.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from ferrum import hookimpl

F32 = jnp.float32


@partial(jax.jit, static_argnames=("top_k", "normalize"))
def _route_softmax(logits, shared_logit, top_k, normalize):
    weights, ids = lax.top_k(jax.nn.softmax(logits.astype(F32), axis=-1), top_k)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    if shared_logit is not None:
        weights = jnp.concatenate([weights, jax.nn.sigmoid(shared_logit.astype(F32))], axis=-1)
    return ids.astype(jnp.int32), weights


@partial(jax.jit, static_argnames=("top_k", "normalize", "n_group", "topk_group", "rule"))
def _route_grouped(logits, bias, expert_scale, scale, top_k, normalize, n_group, topk_group, rule):
    """A grouped rule (Ferrum's ``route_grouped`` with its ``GroupRule``: DeepSeek-V3's, V2's, Kolibri-1's,
    A.X-K2's), every step in float32."""
    logits = logits.astype(F32)
    scores = jax.nn.softmax(logits, axis=-1) if rule.scoring == "softmax" else jax.nn.sigmoid(logits)
    basis = logits if rule.choice == "logits" else scores  # Kolibri-1 chooses on the logits (API 1.23)
    choice = basis + bias if rule.corrected else basis
    if n_group > 1:
        tokens, experts = choice.shape
        grouped = choice.reshape(tokens, n_group, experts // n_group)  # tokens may be 0
        group_scores = grouped.max(axis=-1) if rule.group_score == "max" else lax.top_k(grouped, 2)[0].sum(axis=-1)
        kept = jax.nn.one_hot(lax.top_k(group_scores, topk_group)[1], n_group, dtype=jnp.bool_).any(axis=1)
        kept = jnp.repeat(kept, experts // n_group, axis=1)
        choice = jnp.where(kept, choice, F32(rule.masked))
    ids = lax.top_k(choice, top_k)[1]
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    # a dropped expert picked by its masked 0 weighs that 0, unless the rule weighs it by its score (A.X-K2, 1.28)
    if n_group > 1 and not rule.dropped_weighed:
        weights = jnp.where(jnp.take_along_axis(kept, ids, axis=-1), weights, F32(0))
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + F32(1e-20))
    weights = weights * scale
    if rule.expert_scaled:  # Gemma 4: each chosen expert's own scale (API 1.16)
        weights = weights * expert_scale[ids]
    return ids.astype(jnp.int32), weights


@hookimpl
def moe_route(logits, shared_logit, top_k, normalize, routing=None):
    if routing is None:
        return _route_softmax(logits, shared_logit, top_k=int(top_k), normalize=bool(normalize))
    return _route_grouped(logits, routing.bias, routing.expert_scale, F32(routing.scale), top_k=int(top_k),
                          normalize=bool(normalize), n_group=int(routing.n_group),
                          topk_group=int(routing.topk_group), rule=routing.rule)
