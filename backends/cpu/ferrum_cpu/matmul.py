"""Matrix products spread over the cores: by Ferrum itself with BLAS single-threaded, or by
BLAS's own threads, whichever is measured faster while the process runs.

Why not always BLAS's own threads: a decode step of a small model is ~100 matrix-vector products
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

That robustness costs speed on an idle machine: each product waits for a helper thread to
wake, while OpenBLAS's threads spin between products (a 30-layer decode step measured 33-35
against 38-42 ms idle, but 88-129 against 48-63 ms with another process spinning on one of
two cores). So which of the two spreads the decode-sized products is measured as the process
runs (:class:`ModeChooser`): the faster one per byte of weights, the other re-tried now and
then in case the machine's load changed.

``FERRUM_CPU_THREADS`` sets how many threads share a product (default: the cores this
process may run on); ``FERRUM_CPU_MATMUL`` pins the choice (``split`` or ``blas``; default
``auto``). Where the BLAS that numpy uses cannot be told how many threads to run, products
are left to it whole.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from typing import Callable

import numpy as np
import threadpoolctl

from ferrum.errors import ConfigError

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


def _blas_thread_setter() -> Callable[[int], None] | None:
    """A function that sets how many threads the BLAS libraries in this process (numpy's) run each
    call on, process-wide; None where threadpoolctl finds none it can set (it knows every build numpy
    ships with)."""
    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    if not blas.lib_controllers:
        return None

    def set_threads(count: int) -> None:
        for library in blas.lib_controllers:
            library.set_num_threads(count)

    return set_threads


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


class ModeChooser:
    """Measures which way of spreading decode-sized products is faster here and now: ``split``
    (:class:`Splitter`, BLAS on one thread) or ``blas`` (one call, BLAS on every thread).

    Products are timed in windows of ``window`` of them. The first window runs split (robust on a
    busy machine); after it, and after ``interval`` windows in one mode from then on, a quarter
    window runs in the other (a probe: short, as the losing mode can be twice as slow). The probe
    is kept if its bytes per second beat the window before it by ``margin``, else the mode goes
    back and the next probe waits twice as long (up to ``max_interval`` windows), so that a
    machine whose load keeps one mode ahead pays for few probes.
    """

    MODES = ("split", "blas")

    def __init__(self, apply: Callable[[str], None], window: int = 256, interval: int = 4,
                 max_interval: int = 128, margin: float = 1.03):
        self.mode = "split"
        self._apply, self._window, self._first_interval = apply, window, interval
        self._max_interval, self._margin = max_interval, margin
        self._interval = 1  # the first probe comes after one window
        self._windows_in_mode = 0
        self._probing = False
        self._before_probe = 0.0  # bytes per second of the window before the probe
        self._products, self._seconds, self._bytes = 0, 0.0, 0
        self._lock = threading.Lock()
        apply(self.mode)

    def record(self, seconds: float, nbytes: int) -> None:
        """One product of ``nbytes`` of weights took ``seconds`` in the current mode."""
        with self._lock:
            self._products += 1
            self._seconds += seconds
            self._bytes += nbytes
            if self._products >= (self._window // 4 if self._probing else self._window):
                rate = self._bytes / max(self._seconds, 1e-9)
                self._products, self._seconds, self._bytes = 0, 0.0, 0
                self._end_window(rate)

    def _end_window(self, rate: float) -> None:
        if self._probing:
            self._probing = False
            if rate > self._before_probe * self._margin:
                self._interval = self._first_interval  # switched: the load changed, look again soon
            else:
                self._interval = min(2 * self._interval, self._max_interval)
                self._switch()
            self._windows_in_mode = 0
            return
        self._windows_in_mode += 1
        if self._windows_in_mode >= self._interval:
            self._before_probe, self._probing = rate, True
            self._switch()

    def _switch(self) -> None:
        self.mode = self.MODES[1 - self.MODES.index(self.mode)]
        self._apply(self.mode)


class AdaptiveMatmul:
    """``x @ w.T`` by whichever mode the chooser holds: products large enough to split, with a
    decode-sized ``x``, are timed for it; larger ones (prefill) follow the same mode untimed."""

    def __init__(self, threads: int, set_blas_threads: Callable[[int], None], pinned: str | None = None):
        self.splitter = Splitter(threads)
        self._set_blas_threads, self._threads = set_blas_threads, threads
        self.chooser = ModeChooser(self._apply)
        if pinned is not None:
            self.chooser.mode = pinned
            self._apply(pinned)
        self._timed = pinned is None

    def _apply(self, mode: str) -> None:
        self._set_blas_threads(self._threads if mode == "blas" else 1)

    def __call__(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        timed = self._timed and x.size <= SPLIT_IN_ROWS * x.shape[-1] and w.nbytes >= 2 * CHUNK_BYTES
        start = time.perf_counter() if timed else 0.0
        out = np.matmul(x, w.T) if self.chooser.mode == "blas" else self.splitter.matmul_t(x, w)
        if timed:
            self.chooser.record(time.perf_counter() - start, w.nbytes)
        return out


def _make_matmul_t() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``x @ w.T``: spread over this process's cores where BLAS's threads can be set."""
    threads = _thread_count()
    set_blas_threads = _blas_thread_setter()
    if set_blas_threads is None:
        return _whole
    if threads == 1:
        set_blas_threads(1)
        return _whole
    mode = os.environ.get("FERRUM_CPU_MATMUL", "auto")
    if mode not in ("auto", *ModeChooser.MODES):
        raise ConfigError(f"FERRUM_CPU_MATMUL={mode!r} is not one of auto, split, blas")
    return AdaptiveMatmul(threads, set_blas_threads, None if mode == "auto" else mode)


def _whole(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x @ w.T


matmul_t = _make_matmul_t()
