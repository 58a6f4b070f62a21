"""Prompt lookup: draft the continuation of an earlier occurrence of the last n tokens.

Follows transformers' ``PromptLookupCandidateGenerator``: for n from the
longest n-gram down, find earlier windows of prompt + output equal to the
last n tokens and propose what followed the **leftmost** one that has a
continuation. Text that repeats or edits its prompt is drafted well; other
text finds no match and decodes normally at no cost.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def propose_lookup(tokens: Sequence[int], count: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to ``count`` draft tokens continuing ``tokens``; empty when no n-gram recurs."""
    ids = np.asarray(tokens, dtype=np.int64)
    n_total = len(ids)
    for n in range(min(max_ngram, n_total - 1), min_ngram - 1, -1):
        tail = ids[n_total - n :]
        windows = np.lib.stride_tricks.sliding_window_view(ids[: n_total - 1], n)  # starts 0 .. n_total-1-n
        hits = np.flatnonzero((windows == tail).all(axis=1))  # the tail itself is not a window
        if hits.size:
            start = int(hits[0]) + n
            return ids[start : start + count].tolist()
    return []
