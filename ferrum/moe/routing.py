"""Top-k expert routing on the host: the semantics every backend's ``moe_route`` must match.

All three families route the same way (transformers 5: ``MixtralTopKRouter``,
``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``): router logits in the compute
dtype, softmax in float32, ``torch.topk`` of the probabilities, then, when
asked (always for Mixtral, ``norm_topk_prob`` for Qwen), the chosen
probabilities divided by their sum, still in float32.

Ties. Which experts win a tie at the top-k boundary is decided by
``torch.topk``'s CPU kernel: a ``std::nth_element`` (libstdc++ introselect)
over ``(prob, index)`` pairs, which does not prefer low indices (4 equal
probabilities, k=2 picks experts 2 and 3). Rows without such a tie take a
vectorized stable sort; rows with one replay the introselect exactly
(:func:`_torch_cpu_topk`). The order *within* the chosen k does not matter:
the experts' outputs are summed. The torch backend calls ``torch.topk`` itself
(so on CUDA it breaks ties as transformers does there); MLX's stable ``argsort``
and the JAX plugin's ``lax.top_k``, with no such rule to call, give boundary
ties to the lowest indices, for both rules.

Dtype. The weights stay float32 up to the weighted sum. transformers' Qwen
routers round them to the compute dtype first: identical in float32, within
one rounding of each weight in bfloat16.

Grouped routing (:class:`GroupedRouting`, :func:`route_grouped`) is another
family of rules, told apart by a :class:`GroupRule`: DeepSeek-V3's "noaux_tc"
(``MoeSpec.routing`` ``"sigmoid_grouped"``: GLM-4.5 / 4.6, DeepSeek-V3, Kimi K2)
and DeepSeek-V2's "group_limited_greedy" (``"softmax_grouped"``). A backend's
``moe_route`` runs it only if its signature takes the ``routing`` argument (and,
for rules other than "noaux_tc", its plugin declares API 1.13; torch's, MLX's
and the JAX plugin's do), else the model calls this host reference for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


def _softmax_f32(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float32, as ``torch.softmax(x.float())``."""
    x = np.asarray(logits, dtype=np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def route(logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [T, k], weights float32 [T, k])`` from router logits ``[T, E]``."""
    probs = _softmax_f32(logits)
    ids = _topk_ids(probs, top_k)
    weights = np.take_along_axis(probs, ids, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids.astype(np.int32), weights.astype(np.float32)


#: The router's per-expert correction bias of grouped sigmoid routing, in the router's module.
CORRECTION_BIAS = "e_score_correction_bias"


@dataclass(frozen=True)
class GroupRule:
    """What tells one grouped routing rule from another (see :func:`route_grouped`)."""

    scoring: Literal["sigmoid", "softmax"]  # of the router logits, in float32
    group_score: Literal["top2_sum", "max"]  # a group's two best choice values summed, or its best one
    corrected: bool  # a per-expert correction bias (CORRECTION_BIAS) is added to the scores to choose
    masked: float  # what the experts of dropped groups score when the top_k are chosen (one so chosen weighs 0)
    #: The plugin API version that first hands this rule to a backend's ``moe_route``: a plugin declaring an
    #: older one gets the layers of this rule routed by the core (ferrum.moe.kind.routes_natively).
    since: tuple[int, int] = (1, 12)
    #: The weights, last of all, times each chosen expert's own scale (``GroupedRouting.expert_scale``).
    expert_scaled: bool = False
    #: What chooses (API 1.23): the ``scores`` (plus the correction bias where ``corrected``), or the raw router
    #: ``logits`` (plus the bias: Kolibri-1's router adds it to the logits, not to their sigmoids); the weights
    #: are the scores either way.
    choice: Literal["scores", "logits"] = "scores"
    #: What a chosen expert of a dropped group weighs (API 1.28): False, 0 (DeepSeek-V2's router takes the weights
    #: from the masked choice); True, its score, as any chosen expert (A.X-K2's router gathers them from the unmasked
    #: scores). It matters only where ``masked`` is a number kept choices can fall below: A.X-K2's 0 under sigmoid
    #: scores plus a negative correction bias (softmax scores reach it only by underflow).
    dropped_weighed: bool = False

    def __post_init__(self) -> None:  # every implementation branches on these: a misspelling would pass silently
        if (self.scoring not in ("sigmoid", "softmax") or self.group_score not in ("top2_sum", "max")
                or self.choice not in ("scores", "logits")):
            raise ValueError(f"GroupRule: scoring {self.scoring!r}, group_score {self.group_score!r} or choice "
                             f"{self.choice!r} is not one of sigmoid/softmax, top2_sum/max, scores/logits")

    @property
    def min_group(self) -> int:
        """The experts a group needs for its score."""
        return 2 if self.group_score == "top2_sum" else 1


#: DeepSeek-V3's "noaux_tc" (transformers' ``DeepseekV3TopkRouter``, ``Glm4MoeTopkRouter``).
NOAUX_TC = GroupRule("sigmoid", "top2_sum", corrected=True, masked=float("-inf"))
#: DeepSeek-V2's "group_limited_greedy" (transformers' ``DeepseekV2TopkRouter``): dropped groups' experts score 0,
#: below every kept probability; "greedy" is the same rule with one group.
GROUP_LIMITED_GREEDY = GroupRule("softmax", "max", corrected=False, masked=0.0, since=(1, 13))
#: ERNIE 4.5's MoE router (transformers' ``Ernie4_5_MoeTopKRouter``): softmax probabilities, the correction bias
#: (its ``moe_statics.e_score_correction_bias``) added to choose only, in one group; any backend that runs the rules
#: of API 1.13 by their fields runs it.
SOFTMAX_CORRECTED = GroupRule("softmax", "max", corrected=True, masked=float("-inf"), since=(1, 13))
#: Llama 4's router (transformers' ``Llama4Router``): the top-k logits, each expert weighed by its sigmoid, unnormalized
#: (one group, nothing corrected: the grouped machinery's plainest sigmoid rule). Its choice ties where sigmoids round
#: to 1.0 (logits above ~17 in float32), so the model takes only the weight from it and chooses on the logits
#: (:class:`ferrum.moe.block.MoeMLP`'s ``weigh_input``).
SIGMOID_TOP_K = GroupRule("sigmoid", "max", corrected=False, masked=float("-inf"), since=(1, 13))
#: Mistral 4's router (transformers' ``Mistral4TopkRouter``): softmax probabilities grouped as DeepSeek-V3 groups its
#: sigmoid scores (a group's two best summed), dropped groups' experts scoring 0, nothing corrected.
SOFTMAX_TOP2_GROUPED = GroupRule("softmax", "top2_sum", corrected=False, masked=0.0, since=(1, 13))
#: Gemma 4's MoE router (transformers' ``Gemma4TextRouter``): softmax probabilities, the top-k renormalized, each
#: then times its expert's learned ``per_expert_scale`` (one group, nothing corrected).
SOFTMAX_EXPERT_SCALED = GroupRule("softmax", "max", corrected=False, masked=float("-inf"), since=(1, 16),
                                  expert_scaled=True)
#: Kolibri-1's router (transformers' ``Kolibri1TopKRouter``): the top-k of the logits plus the correction bias choose,
#: each chosen expert weighed by its logit's sigmoid (one group; renormalized where norm_topk_prob, never scaled).
SIGMOID_LOGITS_CORRECTED = GroupRule("sigmoid", "max", corrected=True, masked=float("-inf"), since=(1, 23),
                                     choice="logits")
#: A.X-K2's router (transformers' ``AXK2TopkRouter``): DeepSeek-V3's noaux_tc but for the dropped groups' experts,
#: masked with 0 rather than -inf, so that where the kept experts' corrected scores are negative the top-k choose
#: dropped experts, each weighed by its score. Those dropped experts tie at 0: the host reference replays
#: ``torch.topk`` on the CPU (transformers' choice there), while MLX and JAX give a tie to the lowest expert ids, so
#: grouped A.X-K2 configs route apart on them where the tie decides (releases are ungrouped; CUDA's topk may pick
#: otherwise again).
NOAUX_TC_ZERO_MASKED = GroupRule("sigmoid", "top2_sum", corrected=True, masked=0.0, since=(1, 28),
                                 dropped_weighed=True)
#: ``MoeSpec.routing`` -> its grouped rule.
GROUPED_RULES = {"sigmoid_grouped": NOAUX_TC, "softmax_grouped": GROUP_LIMITED_GREEDY,
                 "softmax_corrected": SOFTMAX_CORRECTED, "sigmoid_top_k": SIGMOID_TOP_K,
                 "softmax_top2_grouped": SOFTMAX_TOP2_GROUPED, "softmax_expert_scaled": SOFTMAX_EXPERT_SCALED,
                 "sigmoid_logits_corrected": SIGMOID_LOGITS_CORRECTED,
                 "sigmoid_grouped_zero_masked": NOAUX_TC_ZERO_MASKED}


@dataclass(frozen=True, eq=False)
class GroupedRouting:
    """One sparse layer's grouped routing, as ``moe_route``'s ``routing`` argument receives it: see
    :func:`route_grouped`.

    ``bias`` is the layer's ``e_score_correction_bias``, a float32 ``[E]`` backend array (``from_numpy``),
    kept in float32 whatever the compute dtype, as transformers keeps it; None where ``rule`` is not
    ``corrected``. ``expert_scale`` (API 1.16) is the layer's per-expert scale of the weights, a float32 ``[E]``
    backend array, where ``rule`` is ``expert_scaled``; else None."""

    n_group: int
    topk_group: int
    scale: float  # routed_scaling_factor
    bias: Any
    rule: GroupRule = NOAUX_TC
    expert_scale: Any = None


#: API 1.12's name of :class:`GroupedRouting`, whose rule was always :data:`NOAUX_TC`.
GroupedSigmoid = GroupedRouting


def route_grouped(logits: np.ndarray, bias: np.ndarray | None, top_k: int, n_group: int, topk_group: int,
                  normalize: bool, scale: float, rule: GroupRule = NOAUX_TC,
                  expert_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [T, k], weights float32 [T, k])`` by a grouped rule, every step in float32:

    1. ``scores`` are the ``rule.scoring`` (sigmoid, or softmax over the experts) of the logits; ``choice`` is
       ``scores`` (the logits themselves where ``rule.choice`` is "logits"), plus ``bias`` (the per-expert
       correction bias) where ``rule.corrected``;
    2. the experts split into ``n_group`` consecutive groups of ``E / n_group``; a group's score is the sum of
       its two largest ``choice`` values ("top2_sum", DeepSeek-V3) or its largest ("max", DeepSeek-V2);
    3. the ``topk_group`` best groups are kept (``torch.topk``, ties as on the CPU), the other groups'
       experts set to ``rule.masked`` (-inf; 0 under softmax, and A.X-K2's); with ``n_group == 1`` nothing is
       masked;
    4. the ``top_k`` largest ``choice`` values pick the experts (``torch.topk`` again; ``top_k`` must not
       exceed the kept experts, which the config check ensures);
    5. the weights are the chosen experts' *uncorrected* ``scores`` (the bias only chooses; a dropped expert
       chosen, which only a 0 of ``rule.masked`` allows, weighs 0 unless ``rule.dropped_weighed``), divided by
       ``their sum + 1e-20`` when ``normalize``, then multiplied by ``scale`` (routed_scaling_factor) and,
       where ``rule.expert_scaled``, by each chosen expert's ``expert_scale``.
    """
    logits = np.asarray(logits, dtype=np.float32)
    scores = _softmax_f32(logits) if rule.scoring == "softmax" else 1.0 / (1.0 + np.exp(-logits))
    basis = logits if rule.choice == "logits" else scores
    choice = basis + np.asarray(bias, dtype=np.float32).reshape(1, -1) if rule.corrected else basis
    tokens, experts = choice.shape
    if n_group > 1:
        grouped = choice.reshape(tokens, n_group, experts // n_group)
        if rule.group_score == "max":
            group_scores = grouped.max(axis=-1)
        else:
            top2 = -np.sort(-grouped, axis=-1)[..., :2]
            group_scores = top2[..., 0] + top2[..., 1]
        kept = np.zeros((tokens, n_group), dtype=bool)
        np.put_along_axis(kept, _topk_ids(group_scores, topk_group), True, axis=-1)
        kept = np.repeat(kept, experts // n_group, axis=1)
        choice = np.where(kept, choice, np.float32(rule.masked))
    ids = _topk_ids(choice, top_k)
    weights = np.take_along_axis(scores, ids, axis=-1)
    if n_group > 1 and not rule.dropped_weighed:  # a dropped expert picked with its masked 0 weighs that 0
        weights = np.where(np.take_along_axis(kept, ids, axis=-1), weights, np.float32(0.0))
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + np.float32(1e-20))
    weights = weights * np.float32(scale)
    if rule.expert_scaled:
        weights = weights * np.asarray(expert_scale, dtype=np.float32).reshape(-1)[ids]
    return ids.astype(np.int32), weights.astype(np.float32)


@dataclass(frozen=True)
class Sparsemixer:
    """Phi-3.5-MoE's top-2 routing (``MoeSpec.routing`` "sparsemixer"): see :func:`route_sparsemixer`. Always
    routed on the host (the core's ``moe_route``): no backend op takes it. Its cut-off test runs in float32, where
    transformers runs it in the compute dtype: in bfloat16 an expert at the cut-off can fall on the other side
    (measured: the same experts on 20,000 random rows, 3 with a weight changed)."""

    jitter_eps: float  # router_jitter_noise


def route_sparsemixer(logits: np.ndarray, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [T, 2], weights float32 [T, 2])`` as transformers' ``sparsemixer`` computes them in eval:

    1. the first expert is the row's largest logit ``m``; every logit ``s`` with ``(m - s) / max(|s|, m) >
       2 * jitter_eps`` is masked out, and its weight is its softmax probability over those left;
    2. the second is the largest logit ``m2`` once the first is masked; again every logit with ``(m2 - s) /
       max(|s|, m2) > 2 * jitter_eps`` is masked out, the first included, and its weight is its probability
       over those left. The weights are not renormalized.
    """
    raw = np.asarray(logits, dtype=np.float32)
    scores, rows = raw, np.arange(len(raw))
    ids, weights = [], []
    for _ in range(2):
        top = scores.max(axis=-1, keepdims=True)
        pick = np.argmax(scores, axis=-1)  # the first of tied maxima, as torch.max on the CPU
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 is NaN, which masks nothing, as in torch
            far = (top - raw) / np.maximum(np.abs(raw), top) > 2 * jitter_eps
        kept = np.where(far, -np.inf, scores)
        probs = np.exp(kept - top)
        weights.append(probs[rows, pick] / probs.sum(axis=-1))
        ids.append(pick)
        scores = scores.copy()
        scores[rows, pick] = -np.inf
    return np.stack(ids, axis=1).astype(np.int32), np.stack(weights, axis=1).astype(np.float32)


def _topk_ids(values: np.ndarray, k: int) -> np.ndarray:
    """The column indices ``torch.topk(values, k)`` picks on the CPU, per row (in no particular order):
    a stable sort, and where a tie straddles the boundary, torch's selection replayed."""
    order = np.argsort(-values, axis=-1, kind="stable")
    ids = order[:, :k]
    if k < values.shape[1]:
        ranked = np.take_along_axis(values, order[:, k - 1 : k + 1], axis=-1)
        for row in np.flatnonzero(ranked[:, 0] == ranked[:, 1]):  # a tie straddles the boundary
            ids[row] = _torch_cpu_topk(values[row], k)
    return ids


def _torch_cpu_topk(values: np.ndarray, k: int) -> list[int]:
    """The indices ``torch.topk(values, k)`` returns on the CPU (aten ``topk_impl_loop``).

    That kernel fills ``(value, index)`` pairs in index order and, unless
    ``k * 64 <= n`` (then ``std::partial_sort``), runs ``std::nth_element`` on
    them with ``a > b`` as "less"; both are replayed here as libstdc++ writes them.
    """
    pairs = [(float(v), i) for i, v in enumerate(values)]
    greater = lambda a, b: a[0] > b[0]  # noqa: E731  (torch's comparator; NaN-free here)
    n = len(pairs)
    if k * 64 <= n:
        # std::partial_sort; a stable sort picked the same experts in randomized tie tests
        return [i for _, i in sorted(pairs, key=lambda p: -p[0])[:k]]
    _introselect(pairs, k - 1, greater)
    return [i for _, i in pairs[:k]]


def _introselect(a: list, nth: int, less) -> None:
    """libstdc++ ``std::__introselect`` on ``a`` in place."""
    first, last = 0, len(a)
    depth = 2 * (len(a).bit_length() - 1)
    while last - first > 3:
        if depth == 0:  # libstdc++ falls back to heap_select; unreachable for expert counts <= 2**15
            a[first:last] = sorted(a[first:last], key=lambda p: -p[0])
            return
        depth -= 1
        cut = _partition_pivot(a, first, last, less)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(a, first, last, less)


def _partition_pivot(a: list, first: int, last: int, less) -> int:
    mid = first + (last - first) // 2
    x, y, z = first + 1, mid, last - 1
    if less(a[x], a[y]):
        pick = y if less(a[y], a[z]) else (z if less(a[x], a[z]) else x)
    else:
        pick = x if less(a[x], a[z]) else (z if less(a[y], a[z]) else y)
    a[first], a[pick] = a[pick], a[first]
    lo, hi, pivot = first + 1, last, a[first]
    while True:
        while less(a[lo], pivot):
            lo += 1
        hi -= 1
        while less(pivot, a[hi]):
            hi -= 1
        if not lo < hi:
            return lo
        a[lo], a[hi] = a[hi], a[lo]
        lo += 1


def _insertion_sort(a: list, first: int, last: int, less) -> None:
    for i in range(first + 1, last):
        val, j = a[i], i
        if less(val, a[first]):
            a[first + 1 : i + 1] = a[first:i]
            a[first] = val
            continue
        while less(val, a[j - 1]):
            a[j] = a[j - 1]
            j -= 1
        a[j] = val
