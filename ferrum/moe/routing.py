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
(so on CUDA it breaks ties as transformers does there); MLX, which has no such
rule, lets ``argsort`` decide boundary ties.

Dtype. The weights stay float32 up to the weighted sum. transformers' Qwen
routers round them to the compute dtype first: identical in float32, within
one rounding of each weight in bfloat16.
"""

from __future__ import annotations

import numpy as np


def _softmax_f32(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float32, as ``torch.softmax(x.float())``."""
    x = np.asarray(logits, dtype=np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def route(logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [T, k], weights float32 [T, k])`` from router logits ``[T, E]``."""
    probs = _softmax_f32(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")
    ids = order[:, :top_k]
    if top_k < probs.shape[1]:
        ranked = np.take_along_axis(probs, order[:, top_k - 1 : top_k + 1], axis=-1)
        for row in np.flatnonzero(ranked[:, 0] == ranked[:, 1]):  # a tie straddles the boundary
            ids[row] = _torch_cpu_topk(probs[row], top_k)
    weights = np.take_along_axis(probs, ids, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids.astype(np.int32), weights.astype(np.float32)


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
