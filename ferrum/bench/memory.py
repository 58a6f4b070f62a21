"""How close decode comes to the memory-bandwidth limit: batch-1 decode reads every weight once per step
(of a mixture of experts' stacks, only the experts its tokens chose).

The machine's read bandwidth is measured here, with numpy, by a max-reduction over a
buffer far larger than any cache (the cheapest operation that must read every byte),
on one thread and on every core, best of several tries.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

_BUFFER_BYTES = 512 << 20


def measure_read_bandwidth(tries: int = 5) -> float:
    """Bytes per second the CPU reads from memory (best of one thread and all cores)."""
    words = np.ones(_BUFFER_BYTES // 8, dtype=np.uint64)
    best = 0.0
    for threads in sorted({1, os.cpu_count() or 1}):
        parts = np.array_split(words, threads)
        for _ in range(tries):
            workers = [threading.Thread(target=np.maximum.reduce, args=(part,)) for part in parts]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = max(best, words.nbytes / (time.perf_counter() - start))
    return best


def in_host_memory(device: str) -> bool:
    """Whether a backend on ``device`` reads its weights from the memory measured here: a CPU device, or
    Apple's unified memory. Any other accelerator's (``cuda:0``, JAX's ``gpu:0``) is another figure."""
    return device in ("cpu", "metal")


def bandwidth_figures(weight_bytes: int, decode_tok_s: float, sequences: int, bandwidth: float | None,
                      expert_bytes: int = 0, experts_chosen: float = 1.0, lookup_bytes: int = 0) -> dict:
    """Weight bytes streamed per second while decoding, and that as a fraction of ``bandwidth`` (None where
    the memory the weights live in was not measured).

    Each decode step reads the weights once for all ``sequences`` it advances, so
    steps per second are ``decode_tok_s / sequences``. Of ``expert_bytes`` (the expert
    stacks among the weights), a step reads the experts its tokens chose: with each token
    choosing a fraction ``experts_chosen`` of them, independently and evenly (random weights
    route about so), ``1 - (1 - experts_chosen) ** sequences`` of them in expectation. Of
    ``lookup_bytes`` (tables a step looks a few rows up in: an input embedding apart from the LM head),
    it reads next to nothing.
    """
    steps = decode_tok_s / max(sequences, 1)
    read = expert_bytes * (1 - (1 - experts_chosen) ** max(sequences, 1))
    streamed = (weight_bytes - lookup_bytes - expert_bytes + read) * steps
    return {
        "weight_bytes": weight_bytes,
        "read_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
        "decode_weight_gb_s": streamed / 1e9,
        "decode_bandwidth_fraction": streamed / bandwidth if bandwidth else None,
    }
