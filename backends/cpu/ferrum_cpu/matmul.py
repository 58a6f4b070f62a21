"""Matrix products spread over the cores by Ferrum itself, with BLAS single-threaded.

Why not BLAS's own threads: a decode step of a small model is ~100 matrix-vector products
of a few MB each, and OpenBLAS's threads meet at a barrier after each one. When another
process holds a core, the barrier waits for a descheduled thread; measured on a busy
2-core machine, a decode step took 5-6x longer with 2 OpenBLAS threads than with one.

Here ``x @ w.T`` is cut into chunks that the calling thread and helper threads claim one
at a time; the caller never waits for a helper that has not started, so a busy core costs
at most the chunk in flight. Each chunk is one single-threaded BLAS call (numpy releases
the GIL inside it). Weights are column-major (``upload_weight``): ``w.T`` is a contiguous
``[in, out]`` matrix, whose product with a few rows OpenBLAS streams 10-30% faster than
``w``'s dot products (measured on this project's 2-core Xeon: 16.1 vs 14.7 GB/s on one
thread). Decode-sized products are cut along ``in`` so that each chunk reads one contiguous
block, each thread sums its chunks' partial products, and the caller adds the threads'
sums; larger ones (prefill), and row-major weights, are cut along the output features.

``FERRUM_CPU_THREADS`` sets how many threads share a product (default: the cores this
process may run on). Where the BLAS that numpy uses cannot be told to run single-threaded,
products are left to it whole.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading

import numpy as np
import threadpoolctl

#: Weight bytes per chunk at least: large enough that a chunk's Python cost and a helper's GIL
#: hand-over (microseconds) are small beside its BLAS time (~25 us); smaller weights (a tiny
#: model's) run whole on the calling thread.
CHUNK_BYTES = 1 << 19
MAX_CHUNKS = 64
#: Products of at most this many rows are cut along ``in`` (column-major weights).
SPLIT_IN_ROWS = 16
#: Chunks per thread when cutting along ``in``: each costs one add of a partial ``[rows, out]``
#: product and ends a contiguous stream, so few, large ones (SmolLM2-135M's products: 21-24 GB/s
#: with 2, 20-21 with 4, of a 24.7 GB/s machine), yet more than one so a busy core delays a
#: product by a quarter of it, not half.
IN_CHUNKS_PER_THREAD = 2

def _single_threaded_blas() -> bool:
    """Tell the BLAS libraries in this process (numpy's) to run each call on one thread.

    Process-wide: every numpy product then runs on one thread unless split here.
    threadpoolctl knows every BLAS build numpy ships with; False where it finds none.
    """
    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    if not blas.lib_controllers:
        return False
    blas.limit(limits=1)
    return True


def _thread_count() -> int:
    configured = os.environ.get("FERRUM_CPU_THREADS")
    if configured:
        return max(1, int(configured))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Product:
    """One ``x @ w.T`` cut into chunks of output features, or of ``in`` (``partials`` then holds each
    thread's running sum of its chunks' products); any thread may run any chunk."""

    __slots__ = ("x", "w", "out", "bounds", "partials", "claims", "completions", "done", "error")

    def __init__(self, x: np.ndarray, w: np.ndarray, out: np.ndarray, bounds: list[int], along_in: bool):
        self.x, self.w, self.out, self.bounds = x, w, out, bounds
        self.partials: list[np.ndarray] | None = [] if along_in else None
        self.claims = itertools.count()  # next() is atomic under the GIL: each chunk is claimed once
        self.completions = itertools.count(1)  # ... and exactly one thread completes the last
        self.done = threading.Lock()
        self.done.acquire()  # released by a helper that completes the last chunk
        self.error: BaseException | None = None

    def run(self, helper: bool) -> bool:
        """Run chunks until none is left to claim; True if this thread completed the last one."""
        last, completed_last, total = len(self.bounds) - 1, False, None
        while (i := next(self.claims)) < last:
            start, end = self.bounds[i], self.bounds[i + 1]
            try:
                if self.partials is None:
                    np.matmul(self.x, self.w[start:end].T, out=self.out[..., start:end])
                else:  # summed in place before this chunk counts as complete
                    part = np.matmul(self.x[..., start:end], self.w[:, start:end].T)
                    if total is None:
                        total = part
                        self.partials.append(total)
                    else:
                        total += part
            except BaseException as error:  # handed to the caller, which re-raises it
                self.error = error
            completed_last = next(self.completions) == last
            if helper and completed_last:
                self.done.release()
        return completed_last

    def wait(self, caller_completed_last: bool) -> None:
        """Called by the caller once every chunk is claimed: wait for the helpers' last ones."""
        if not caller_completed_last:
            self.done.acquire()
        if self.error is not None:
            raise self.error


class Splitter:
    """Runs products on the calling thread and ``threads - 1`` helper threads (started lazily).

    The caller posts a product once per helper, runs chunks itself, and once every chunk
    is claimed takes back the posts no helper has taken yet: a helper that was slow to
    wake does not run (nor hold the GIL) for a product that is already done.
    """

    def __init__(self, threads: int):
        self.helpers = threads - 1
        self._jobs: queue.SimpleQueue | None = None
        self._busy = threading.Lock()  # one product at a time; other callers run theirs whole
        self._bounds: dict[tuple[int, int], list[int]] = {}

    def _start(self) -> queue.SimpleQueue:
        jobs: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.helpers):
            threading.Thread(target=self._serve, args=(jobs,), name="ferrum-cpu-matmul", daemon=True).start()
        self._jobs = jobs
        return jobs

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while True:
            jobs.get().run(helper=True)

    def bounds(self, rows: int, row_bytes: int, max_chunks: int = MAX_CHUNKS) -> list[int]:
        key = (rows, row_bytes, max_chunks)
        hit = self._bounds.get(key)
        if hit is None:
            chunks = max(1, min(max_chunks, rows, rows * row_bytes // CHUNK_BYTES))  # one: run it whole
            hit = self._bounds[key] = np.linspace(0, rows, chunks + 1).astype(int).tolist()
        return hit

    def matmul_t(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """``x @ w.T`` for ``x [..., in]`` and a ``w [out, in]`` that is C- or F-contiguous."""
        along_in = w.flags.f_contiguous and x.size <= SPLIT_IN_ROWS * x.shape[-1]
        if along_in:
            bounds = self.bounds(w.shape[1], w.shape[0] * w.itemsize, IN_CHUNKS_PER_THREAD * (self.helpers + 1))
        else:
            bounds = self.bounds(w.shape[0], w.shape[1] * w.itemsize)
        if len(bounds) == 2 or not self._busy.acquire(blocking=False):
            return np.matmul(x, w.T)
        out = None if along_in else np.empty((*x.shape[:-1], w.shape[0]), dtype=np.result_type(x, w))
        try:
            jobs = self._jobs or self._start()
            product = _Product(x, w, out, bounds, along_in)
            for _ in range(self.helpers):
                jobs.put(product)
            completed_last = product.run(helper=False)
            try:
                while True:
                    jobs.get_nowait()
            except queue.Empty:
                pass
            product.wait(completed_last)
        finally:
            self._busy.release()
        if along_in:
            out, *others = product.partials
            for part in others:
                out += part
        return out


def _make_matmul_t():
    """``x @ w.T``: split over this process's cores where BLAS can be made single-threaded."""
    threads = _thread_count()
    if _single_threaded_blas() and threads > 1:
        return Splitter(threads).matmul_t
    return _whole


def _whole(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x @ w.T


matmul_t = _make_matmul_t()
