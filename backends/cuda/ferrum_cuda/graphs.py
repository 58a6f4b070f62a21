"""CUDA graphs of each decoder block's work around attention (the ``compile_fn`` op).

A small model's decode step on a fast GPU is bound by the host launching kernels one by one
(a 1B model on an H200: ~0.6 ms of weight reads in an 8.5 ms eager step). A captured graph replays a
block half's dozen-odd kernels with one launch. The model hands over pure, row-wise functions
(see the hookspec), so a batch of ``n`` tokens runs the graph captured for the next size up:
its inputs are copied into the graph's static input rows, the rows beyond ``n`` keep whatever
they held (rows never mix), and the caller gets views of the first ``n`` rows of the static
outputs. Those views stay valid until the same graph runs again, which on the one stream every
op runs on is after everything issued before it has read them.

The graphs captured on one thread share a memory pool, held for the process's life (a pool
whose graphs all died is released, and capturing into a released pool fails). Sharing is safe
because every graph's outputs are read (copied into the next graph's inputs, or used by the eager
ops between two halves) before any other graph of that pool replays, so no replay can overwrite
outputs still needed: an engine runs one forward at a time, and two models stepping at once on two
threads capture into two pools. A
function that cannot be captured (it reads values on the host, as MoE expert dispatch does)
runs eagerly from its first failed capture on. ``FERRUM_CUDA_GRAPHS=0`` turns graphs off.
"""

from __future__ import annotations

import gc
import os
import threading
import warnings
from typing import Any, Callable

import torch

#: Token counts graphs are captured for: decode-sized batches. Longer batches (prefill chunks) run
#: eagerly, where kernels are large enough that launching them is not the cost.
GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64)
ENABLED = os.environ.get("FERRUM_CUDA_GRAPHS", "1") != "0"
#: Warm-up calls before a capture: the first call may allocate library workspaces or pick kernels,
#: which a capture cannot do.
_WARMUP = 2

_pools: dict[int, Any] = {}  # thread id -> the torch.cuda.MemPool its captures share


def _pool_id() -> Any:
    pool = _pools.get(threading.get_ident())
    if pool is None:
        pool = _pools[threading.get_ident()] = torch.cuda.MemPool()
    return pool.id


class _Graph:
    """One captured call of ``fn`` on ``size`` rows: static inputs, the graph, static outputs."""

    __slots__ = ("inputs", "graph", "outputs")

    def __init__(self, fn: Callable[..., tuple], args: tuple[torch.Tensor, ...], size: int):
        self.inputs = [torch.zeros((size, *a.shape[1:]), dtype=a.dtype, device=a.device) for a in args]
        self._load(args)
        with torch.cuda.device(args[0].device):  # streams and the capture on the model's GPU, not the current one
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(_WARMUP):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            # Copied again, the inputs change version: an op's cache keyed by their identity and version
            # (rope's tables) misses, so what it derives is computed in the graph, not read from the warm-up.
            self._load(args)
            self.graph = torch.cuda.CUDAGraph()
            self.outputs = _capture(self.graph, fn, self.inputs)

    def _load(self, args: tuple[torch.Tensor, ...]) -> None:
        for static, arg in zip(self.inputs, args):
            static[: arg.shape[0]].copy_(arg)

    def __call__(self, args: tuple[torch.Tensor, ...], n: int) -> tuple:
        self._load(args)
        self.graph.replay()
        return tuple(out[:n] for out in self.outputs)


def _capture(graph: torch.cuda.CUDAGraph, fn: Callable[..., tuple], inputs: list[torch.Tensor]) -> tuple:
    """``fn(*inputs)`` captured into ``graph``, with nothing of the process's own able to spoil the capture.

    A capture that CUDA invalidates ends without torch closing its pool's recording (torch 2.11), and every
    later capture into that pool fails, leaving every block captured after it eager. Two such spoilers are
    shut out: the collector, which may free a dead model's graphs mid-capture (destroying a graph is a CUDA
    call a capture forbids), and other threads' CUDA work (a second model stepping), by thread-local errors.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=_pool_id(), capture_error_mode="thread_local"):
            return fn(*inputs)
    finally:
        if collecting:
            gc.enable()


def _first_cause(exc: BaseException) -> BaseException:
    """The error that started a failed capture: a spoiled capture's end raises its own, over the first."""
    while exc.__context__ is not None:
        exc = exc.__context__
    return exc


def graphed(fn: Callable[..., tuple]) -> Callable[..., tuple]:
    """``fn`` replayed from CUDA graphs for batches of up to ``GRAPH_SIZES[-1]`` tokens."""
    if not ENABLED:
        return fn
    graphs: dict[tuple, _Graph] = {}
    eager = False

    def call(*args: torch.Tensor) -> tuple:
        nonlocal eager
        n = args[0].shape[0]
        if eager or n > GRAPH_SIZES[-1]:
            return fn(*args)
        size = next(s for s in GRAPH_SIZES if s >= n)
        key = (size, *((a.shape[1:], a.dtype) for a in args))
        graph = graphs.get(key)
        if graph is None:
            try:
                graph = graphs[key] = _Graph(fn, args, size)
            except Exception as exc:  # an op that reads the host, or one a graph cannot hold: run it as it is
                torch.cuda.synchronize()
                eager = True
                graphs.clear()
                warnings.warn(f"ferrum cuda backend: a block runs without CUDA graphs ({_first_cause(exc)})",
                              RuntimeWarning, stacklevel=2)
                return fn(*args)
        return graph(args, n)

    return call
