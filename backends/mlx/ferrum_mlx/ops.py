"""MLX implementations of the Ferrum ops.

Everything stays lazy: ops only build the graph, and the graph (with the KV
writes it contains) is evaluated once, when ``to_numpy`` or ``sample`` needs
a result on the host.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ferrum.arch import alibi
from ferrum.backends import BackendInfo
from ferrum.hookspec import API_VERSION, hookimpl
from ferrum.kv_mirror import MirrorBook, MirrorPlan
from ferrum.moe.activation import Situ
from ferrum.quant.affine import pack, unpack
from ferrum.quant.config import FLOAT_MODES
from ferrum.recurrent import batched
from ferrum.sampling import DeviceSample, SampleResult

_METAL = mx.metal.is_available()
if not _METAL:
    mx.set_default_device(mx.cpu)

#: Matrices are kept as ``[in, out]`` on the CPU: MLX's CPU matmul runs about twice
#: as fast on a contiguous right operand as on the transposed view ``W.T`` (2.5 vs
#: 5-6 GFLOPS here, see benchmarks/README.md). Metal kernels read ``W.T`` at full
#: speed, so there the checkpoint's ``[out, in]`` layout stays.
_WEIGHTS_TRANSPOSED = not _METAL

_DTYPES = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "int32": mx.int32,
    "int64": mx.int64,
}


#: ``mx.quantized_matmul`` runs every affine bit width at MLX's kernel group sizes, and group
#: size 16 (GGUF's K-quant sub-blocks) as 32 with each group padded (see ``QuantizedMatrix``).
_QUANT_FORMATS = tuple((bits, gs) for bits in (2, 3, 4, 5, 6, 8) for gs in (16, 32, 64, 128))


def _recommended_working_set() -> int | None:
    """Metal's recommended working set in bytes (``mx.device_info``; ``mx.metal.device_info``,
    deprecated since, on MLX releases before it)."""
    device_info = getattr(mx, "device_info", None) or mx.metal.device_info
    return device_info().get("max_recommended_working_set_size")


_wired = False


def _wire_recommended_memory() -> None:
    """On Metal, let MLX keep up to the recommended working set wired (resident), once per process:
    what mlx-lm's generator and server do, so weights are not paged out between steps. MLX's default
    wires nothing; on a CPU there is no such limit."""
    global _wired
    if _wired or not _METAL or not hasattr(mx, "set_wired_limit"):
        return
    size = _recommended_working_set()
    if size:
        mx.set_wired_limit(size)
    _wired = True


@hookimpl
def backend_info() -> BackendInfo:
    dtypes = ("float32", "float16", "bfloat16")
    if _METAL:
        memory = _recommended_working_set()
        return BackendInfo("mlx", "metal", dtypes, "bfloat16", memory, quant_formats=_QUANT_FORMATS,
                           computes_apart=True, api_version=API_VERSION)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return BackendInfo("mlx", "cpu", dtypes, "float32", memory, quant_formats=_QUANT_FORMATS, computes_apart=True,
                       api_version=API_VERSION)  # a built-in speaks the version of the core it ships with


# ----------------------------------------------------------- host transfer
#: Pools with KV writes not yet evaluated, per thread. MLX keeps a stream per thread and a graph
#: is evaluated by the thread that built it: an engine stepping on its own thread must never have
#: its writes evaluated by another thread's ``to_numpy`` (that crashed MLX's CPU build).
_written = threading.local()


class _StreamsOfThisThread:
    """Held in a thread-local slot of a thread other than the main one that runs a model: freed as that
    thread ends, in that thread, it waits for the thread's MLX streams and destroys them. Left to process
    exit, the stream of a thread that traced a compiled block aborted the interpreter now and then
    ("terminate called without an active exception", MLX 0.32's CPU build). Freed on any other thread (the
    garbage collector's, later), it does nothing: there those calls would reach that thread's own streams,
    perhaps mid-step."""

    def __init__(self) -> None:
        self.owner = threading.get_ident()

    def __del__(self) -> None:
        if threading.get_ident() != self.owner:
            return
        try:
            mx.synchronize()
            mx.clear_streams()
        except Exception:  # the interpreter may be shutting down; nothing is left to protect then
            pass


def _written_pools() -> dict[int, KVPool]:
    pools = getattr(_written, "pools", None)
    if pools is None:
        pools = _written.pools = {}
        if threading.current_thread() is not threading.main_thread():
            _written.streams = _StreamsOfThisThread()
    return pools


def _take_pending() -> list[mx.array]:
    """This thread's unevaluated KV writes, handed over once."""
    pools = _written_pools()
    if not pools:
        return []
    taken = [a for pool in pools.values() for a in pool.take_pending()]
    pools.clear()
    return taken


def _materialise(*arrays: mx.array) -> None:
    """Evaluate results together with pending KV writes, so graphs never chain across steps."""
    mx.eval(*arrays, *_take_pending())


@hookimpl
def from_numpy(array, dtype):
    if array.dtype.kind == "V" or array.dtype.name == "bfloat16":  # ml_dtypes bfloat16
        array = array.astype(np.float32)
    out = mx.array(array)
    if dtype is None:
        return out
    # Evaluated now: a lazy cast would stay tied to this thread's stream, and evaluating it from
    # another thread (the asyncio engine's) fails with "There is no Stream(cpu, 0) in current thread".
    out = out.astype(_DTYPES[dtype])
    mx.eval(out)
    return out


@hookimpl
def to_numpy(x):
    _materialise(x)
    if mx.issubdtype(x.dtype, mx.floating) and x.dtype != mx.float32:
        x = x.astype(mx.float32)
    return np.array(x)


@hookimpl
def upload_weight(name, array, dtype):
    if _WEIGHTS_TRANSPOSED and array.ndim == 2:
        array = array.T
    return from_numpy(np.ascontiguousarray(array), dtype)


@hookimpl
def cast(x, dtype):
    return x.astype(_DTYPES[dtype])


def _cumsum(x: mx.array, block: int = 512) -> mx.array:
    """A float32 cumulative sum along the last axis as two short ones, within blocks then across them: MLX's CPU
    scan adds a row in turn, ~1e-4 off float64 by the end of a 152k vocabulary (~2e-7 this way)."""
    n, vocab = x.shape
    inner = mx.cumsum(mx.pad(x, [(0, 0), (0, -vocab % block)]).reshape(n, -1, block), axis=-1)
    ends = inner[..., -1]
    return (inner + (mx.cumsum(ends, axis=-1) - ends)[..., None]).reshape(n, -1)[:, :vocab]


def _sample_graph(logits, batch) -> tuple[mx.array, ...]:
    """``ferrum.sampling.sample_numpy`` as a lazy graph: ``(tokens, unusable)``, plus ``(chosen, top, top_logp)``
    when logprobs are wanted."""
    unusable = mx.isnan(logits).any(axis=-1)
    x = logits.astype(mx.float32)
    if batch.adjust_rows.size:
        rows, tokens = mx.array(batch.adjust_rows), mx.array(batch.adjust_tokens)
        old = x[rows, tokens]
        scale, biased = mx.array(batch.adjust_scale), old + mx.array(batch.adjust_offset)
        new = mx.where(biased > 0, biased / scale, biased * scale) + mx.array(batch.adjust_shift)
        x = x.at[rows, tokens].add(new - old)
    tokens = mx.argmax(x, axis=-1)
    order = None
    if not batch.all_greedy or batch.num_logprobs:
        temperature = mx.array(np.where(batch.temperature > 0, batch.temperature, 1.0))[:, None]
        probs = mx.softmax(x / temperature, axis=-1)
        order = mx.argsort(-x, axis=-1)
    if not batch.all_greedy:
        vocab = x.shape[-1]
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        rank = mx.arange(vocab)[None, :]
        keep = rank < mx.array(np.where(batch.top_k > 0, batch.top_k, vocab))[:, None]
        running = _cumsum(mx.where(keep, sorted_probs, 0.0))  # its end is the top-k mass, summed the same way
        keep = keep & ((running - sorted_probs) < mx.array(batch.top_p)[:, None] * running[:, -1:])
        keep = (keep & (sorted_probs >= mx.array(batch.min_p)[:, None] * sorted_probs[:, :1])) | (rank == 0)
        cdf = _cumsum(mx.where(keep, sorted_probs, 0.0))
        pick = (cdf <= mx.array(batch.uniform)[:, None] * cdf[:, -1:]).sum(axis=-1)
        sampled = mx.take_along_axis(order, mx.minimum(pick, vocab - 1)[:, None], axis=-1)[:, 0]
        tokens = mx.where(mx.array(batch.temperature > 0), sampled, tokens)
    tokens = tokens.astype(mx.int32)
    if not batch.num_logprobs:
        return tokens, unusable
    logp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    top = order[:, : batch.num_logprobs]
    chosen = mx.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    return tokens, unusable, chosen, top, mx.take_along_axis(logp, top, axis=-1)


def _sample_result(graph: tuple[mx.array, ...]) -> SampleResult:
    """The evaluated graph's [n]-sized results, copied to the host."""
    tokens, unusable, *logprobs = (np.array(part) for part in graph)
    if not logprobs:
        return SampleResult(tokens.astype(np.int64), unusable=unusable)
    chosen, top, top_logp = logprobs
    return SampleResult(tokens.astype(np.int64), chosen, top.astype(np.int64), top_logp, unusable)


@hookimpl
def sample(logits, batch):
    """``ferrum.sampling.sample_numpy`` in MLX: one evaluation, only [n]-sized results copied."""
    graph = _sample_graph(logits, batch)
    _materialise(*graph)
    return _sample_result(graph)


@hookimpl
def flush():
    _materialise()


#: How ``sample_on_device`` starts a step: ``mx.async_eval`` returns while MLX evaluates (on the GPU, or
#: on its own thread on a CPU), so the host builds the next step meanwhile. On this project's 2-core
#: Linux box a tiny model decoded 541-577 tok/s so against 427-432 with ``mx.eval``; with another
#: process holding a core the two were level (309-411 against 320-404).
_START = mx.async_eval


@hookimpl
def sample_on_device(logits, batch):
    """:func:`sample` started with the step's KV writes and left on the device; the next step's
    graph takes the ids, the host reads them later."""
    graph = _sample_graph(logits, batch)
    _START(*graph, *_take_pending())
    return DeviceSample(graph[0], lambda: _sample_result(graph))


# ------------------------------------------------------------- dense ops
@hookimpl
def reshape(x, shape):
    return x.reshape(shape)


@hookimpl
def take_rows(x, indices):
    return mx.take(x, indices, axis=0)


@hookimpl
def concat(parts):
    return mx.concatenate(parts, axis=0)


@hookimpl
def split(x, sizes):
    return mx.split(x, list(itertools.accumulate(sizes[:-1])), axis=-1)


#: Token counts each block's work is compiled for (``compile_fn``): decode-sized batches, where issuing
#: the graph op by op and running it kernel by kernel is much of the step. A batch is padded with zero rows
#: up to the next size (the functions are row-wise), so at most this many traces per function; longer
#: batches (prefill chunks, of any length) run eagerly.
_COMPILED_SIZES = (1, 2, 4, 8, 16, 32)


@hookimpl
def compile_fn(fn):
    """``fn`` through ``mx.compile`` for decode-sized batches. A function that cannot be traced (one of
    its ops is a core fallback that reads values on the host, e.g. experts in a format MLX declines)
    runs eagerly from its first failed trace on."""
    compiled = [mx.compile(fn)]

    def call(*args):
        n = args[0].shape[0]
        if not compiled or n > _COMPILED_SIZES[-1]:
            return fn(*args)
        size = next(s for s in _COMPILED_SIZES if s >= n)
        if size != n:
            args = [mx.pad(a, [(0, size - n)] + [(0, 0)] * (a.ndim - 1)) for a in args]
        try:
            out = compiled[0](*args)
        except ValueError as exc:
            if "during function transformations" not in str(exc):
                raise
            compiled.clear()
            return fn(*(a[:n] for a in args))
        return out if size == n else tuple(o[:n] for o in out)

    return call


@hookimpl
def add(a, b):
    return a + b


@hookimpl
def linear(x, weight, bias):
    w = weight if _WEIGHTS_TRANSPOSED else weight.T
    return x @ w if bias is None else mx.addmm(bias, x, w)


@hookimpl
def embedding(weight, ids):
    return mx.take(weight, ids, axis=1).T if _WEIGHTS_TRANSPOSED else weight[ids]


@hookimpl
def rms_norm(x, weight, eps):
    return mx.fast.rms_norm(x, weight, eps)


_periods: dict[int, tuple[mx.array, mx.array]] = {}


def _periods_of(inv_freq: mx.array) -> mx.array:
    """``1 / inv_freq`` computed on the host once per table, not as a lazy array: the first call may
    come while a block is traced (``compile_fn``), and a lazy array stays tied to that thread's
    stream (see ``from_numpy``)."""
    key = id(inv_freq)
    cached = _periods.get(key)
    if cached is None or cached[0] is not inv_freq:
        cached = _periods[key] = (inv_freq, mx.array(1.0 / np.array(inv_freq, dtype=np.float32)))
    return cached[1]


def _rope_metal(x, positions, inv_freq):
    # mx.fast.rope takes periods (1 / inv_freq); per-token positions go in as
    # per-"batch" offsets of a [T, heads, 1, head_dim] view.
    t, heads, dim = x.shape
    out = mx.fast.rope(
        x.reshape(t, heads, 1, dim), dim, traditional=False, base=None, scale=1.0,
        offset=positions, freqs=_periods_of(inv_freq),
    )
    return out.reshape(t, heads, dim)


def _rope_cpu(x, positions, inv_freq):
    # MLX's CPU build runs mx.fast.rope as its generic fallback, about a dozen graph nodes per call
    # (each costs microseconds to schedule); written out, the rotation is five, and a compiled block
    # computes the angles' cos and sin once for its q and k.
    half = x.shape[-1] // 2
    angles = (positions.astype(mx.float32)[:, None] * inv_freq[None, :])[:, None, :]  # inv_freq: float32
    cos, sin = mx.cos(angles), mx.sin(angles)  # float32, as mx.fast.rope computes
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([(x1 * cos - x2 * sin).astype(x.dtype), (x2 * cos + x1 * sin).astype(x.dtype)], axis=-1)


@hookimpl
def rope(x, positions, inv_freq):
    return (_rope_metal if _METAL else _rope_cpu)(x, positions, inv_freq)


@hookimpl
def silu_mul(gate, up):
    return gate * mx.sigmoid(gate) * up


@hookimpl
def gelu_tanh_mul(gate, up):
    return nn.gelu_approx(gate) * up


@hookimpl
def layer_norm(x, weight, bias, eps):
    return mx.fast.layer_norm(x, weight, bias, eps)


@hookimpl
def gelu(x, tanh):
    return nn.gelu_approx(x) if tanh else nn.gelu(x)


@hookimpl
def relu_squared(x):
    return mx.square(nn.relu(x))


@hookimpl
def relu(x):
    return nn.relu(x)


@hookimpl
def xielu(x, alpha_p, alpha_n, beta, eps):
    ap, an, b, e = (mx.array(v, dtype=x.dtype) for v in (alpha_p, alpha_n, beta, eps))
    return mx.where(x > 0, ap * x * x + b * x, (mx.expm1(mx.minimum(x, e)) - x) * an + b * x)


@hookimpl
def mul_scalar(x, factor):
    return x * mx.array(factor, dtype=x.dtype)


@hookimpl
def softcap(x, cap):
    return (mx.tanh(x.astype(mx.float32) / cap) * cap).astype(x.dtype)


@hookimpl
def mul(a, b):
    return (a * b).astype(a.dtype)


@hookimpl
def quantize_activations(x, levels):
    rows = x.astype(mx.float32)
    scale = levels / mx.maximum(mx.abs(rows).max(axis=-1, keepdims=True), 1e-5)
    return (mx.clip(mx.round(rows * scale), -levels - 1, levels) / scale).astype(x.dtype)


@hookimpl
def fake_quantize(x, scale, low, high):
    step = mx.array(scale, dtype=mx.float32)
    return (mx.clip(mx.round(x.astype(mx.float32) / step), low, high) * step).astype(x.dtype)


@hookimpl
def clip(x, limit):
    return mx.clip(x, -limit, limit)


# ------------------------------------------------------- recurrent mixers (ferrum.recurrent.batched: lazy mx ops)

def _compiled_for_decode(fn, static_argnames):
    """``fn`` through ``mx.compile`` (one trace per static arguments and shapes) for decode-sized batches, whose
    two dozen small ops it fuses (on the CPU: 137 -> 60 us for a layer's rule); prompts, of any length, run eagerly."""
    traces = {}

    def call(*args, **static):
        if args[0].shape[0] > _COMPILED_SIZES[-1]:
            return fn(*args, **static)
        key = tuple(sorted(static.items()))
        if key not in traces:
            traces[key] = mx.compile(functools.partial(fn, **static))
        return traces[key](*args)

    return call


#: MLX as ``ferrum.recurrent.batched`` and ``ferrum.arch.alibi`` write their ops (over numpy-like frameworks)
_FRAMEWORK = batched.Framework(mx, mx.array, lambda x, dtype: x.astype(dtype), jit=_compiled_for_decode,
                               softmax=lambda x: mx.softmax(x, axis=-1, precise=True))


@hookimpl
def sigmoid_mul(gate, x):
    return (x.astype(mx.float32) * mx.sigmoid(gate.astype(mx.float32))).astype(x.dtype)


@hookimpl
def softplus_mul(gate, x):
    return (x.astype(mx.float32) * nn.softplus(gate.astype(mx.float32))).astype(x.dtype)


@hookimpl
def causal_conv1d(x, weight, state, cu_seqlens, silu):
    return batched.causal_conv1d(_FRAMEWORK, x, weight, state, cu_seqlens, silu)


@hookimpl
def gated_delta_rule(q, k, v, a, b, a_log, dt_bias, state, cu_seqlens, beta_scale=1.0, lower_bound=None):
    return batched.gated_delta_rule(_FRAMEWORK, q, k, v, a, b, a_log, dt_bias, state, cu_seqlens, beta_scale,
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


# ------------------------------------------------------- quantized weights
def _float_codes(codes) -> tuple[mx.array, mx.array, int, int]:
    """A float mode's codes and uint8 scales as MLX's ``mode=`` kernels take them, with the mode's bits and group."""
    return (mx.array(codes.packed), mx.array(codes.scales), *FLOAT_MODES[codes.mode])


class QuantizedMatrix:
    """Packed affine weights as MLX's kernels take them (checkpoint orientation, groups along K).

    Scales and biases are cast to the compute dtype: ``quantized_matmul`` returns
    ``promote(x, scales)``, so f16 scales under bf16 activations would turn
    every projection's output into float32.

    Group size 16, which MLX's kernels lack, is stored as group size 32: each
    group of 16 values is followed by 16 zeros under the same scale and bias, and
    inputs get matching zero columns, so the padding adds exactly nothing. Such
    a matrix takes twice its packed memory and matmul work.

    A matrix loaded from one of MLX's float modes (``weight.float_codes``) keeps the
    file's codes and uint8 scales and runs MLX's kernels for that ``mode`` (no biases):
    the same values in fewer bytes.
    """

    __slots__ = ("q", "scales", "biases", "bits", "group_size", "padded", "mode", "dtype")

    def __init__(self, weight, dtype):
        self.dtype = _DTYPES[dtype]  # the compute dtype: a float mode dequantizes to bfloat16 on its own
        codes = weight.float_codes
        self.mode = "affine" if codes is None else codes.mode
        self.padded = codes is None and weight.group_size == 16
        if codes is not None:
            self.q, self.scales, self.bits, self.group_size = _float_codes(codes)
            self.biases = None
            return
        self.q = mx.array(_padded_codes(weight.packed, weight.bits) if self.padded else weight.packed)
        self.scales = from_numpy(weight.scales, dtype)
        self.biases = from_numpy(weight.biases, dtype)
        self.bits, self.group_size = weight.bits, 32 if self.padded else weight.group_size

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes + (0 if self.biases is None else self.biases.nbytes)


def _padded_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed codes ``[..., K * bits / 32]`` in groups of 16 as groups of 32: 16 zero codes after every 16 (the
    inputs are padded alike, so the padding adds nothing whatever its scale and bias)."""
    q = unpack(packed, bits)
    *lead, k = q.shape
    q = q.reshape(*lead, k // 16, 16)
    return pack(np.concatenate([q, np.zeros_like(q)], axis=-1).reshape(*lead, 2 * k), bits)


def _pad_groups_of_16(x):
    """``[..., K]`` -> ``[..., 2K]``: 16 zeros after every 16 values."""
    *lead, k = x.shape
    pads = [(0, 0)] * len(lead) + [(0, 0), (0, 16)]
    return mx.pad(x.reshape(*lead, k // 16, 16), pads).reshape(*lead, 2 * k)


@hookimpl
def quantized_upload(name, weight, dtype, role):
    return QuantizedMatrix(weight, dtype)


@hookimpl
def quantized_linear(x, weight, bias):
    if weight.padded:
        x = _pad_groups_of_16(x)
    out = mx.quantized_matmul(
        x, weight.q, weight.scales, weight.biases, transpose=True,
        group_size=weight.group_size, bits=weight.bits, mode=weight.mode,
    )
    return out if bias is None else out + bias


@hookimpl
def quantized_embedding(weight, ids):
    rows = mx.dequantize(
        weight.q[ids], weight.scales[ids], None if weight.biases is None else weight.biases[ids],
        group_size=weight.group_size, bits=weight.bits, mode=weight.mode,
    ).astype(weight.dtype)
    if weight.padded:
        n, padded_k = rows.shape
        rows = rows.reshape(n, padded_k // 32, 32)[..., :16].reshape(n, padded_k // 2)
    return rows


# --------------------------------------------------------------- KV pool
class KVPool:
    """Per-layer K/V, stored flat as ``[num_blocks * block_size, kv_heads, head_dim]``."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype):
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.k = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        mx.eval(*self.k, *self.v)
        self._pending: set[int] = set()
        self.shape = (num_kv_heads, head_dim, dtype)
        self.writes = [0] * num_layers  # kv_write calls per layer, for the mirror book
        self.written: list[tuple[mx.array, mx.array] | None] = [None] * num_layers  # the last write's k, v
        # Decode's contiguous copies hold at most as many positions as the pool itself.
        self.mirrors = MirrorBook(num_layers, block_size, max_positions=num_blocks * block_size)
        self.arena_k: list[mx.array] = []  # per layer [rows, kv_heads, capacity, head_dim]
        self.arena_v: list[mx.array] = []

    def write(self, layer, k, v, slots):
        self.k[layer][slots] = k
        self.v[layer][slots] = v
        self.written[layer] = (k, v)  # a plan whose copies are these rows takes them from here
        self.writes[layer] += 1
        self._pending.add(layer)
        _written_pools()[id(self)] = self

    def take_pending(self) -> list[mx.array]:
        layers, self._pending = self._pending, set()
        arenas = [self.arena_k, self.arena_v] if self.arena_k else []
        return [a for layer in layers for a in (self.k[layer], self.v[layer], *(x[layer] for x in arenas))]

    def fit_arena(self, rows: int, capacity: int) -> None:
        """Resize the mirror arena (see :mod:`ferrum.kv_mirror`) to the plan's shape, keeping what both hold."""
        old_rows, old_cap = (self.arena_k[0].shape[0], self.arena_k[0].shape[2]) if self.arena_k else (0, 0)
        if (rows, capacity) == (old_rows, old_cap):
            return
        kvh, d, dtype = self.shape
        keep_rows, keep_cap = min(rows, old_rows), min(capacity, old_cap)
        resized = []
        for old in self.arena_k + self.arena_v or [None] * (2 * len(self.k)):
            new = mx.zeros((rows, kvh, capacity, d), dtype=dtype)
            if old is not None:
                new[:keep_rows, :, :keep_cap] = old[:keep_rows, :, :keep_cap]
            resized.append(new)
        mx.eval(*resized)
        self.arena_k, self.arena_v = resized[: len(self.k)], resized[len(self.k) :]


@hookimpl
def kv_alloc(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype):
    _wire_recommended_memory()  # a model is about to run: before any step is in flight
    return KVPool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, _DTYPES[dtype])


@hookimpl
def kv_write(pool, layer, k, v, slot_mapping):
    pool.write(layer, k, v, slot_mapping)


def _slots_of(block_ids: np.ndarray, length: int, block_size: int) -> np.ndarray:
    pos = np.arange(length)
    return (np.asarray(block_ids)[pos // block_size] * block_size + pos % block_size).astype(np.int32)


@hookimpl
def kv_gather(pool, layer, block_ids, length):
    slots = mx.array(_slots_of(block_ids, length, pool.block_size))
    return pool.k[layer][slots], pool.v[layer][slots]


# ------------------------------------------------------------- attention
def _end_aligned_mask(q_len: np.ndarray, kv_len: np.ndarray, max_q: int, max_kv: int, window):
    """``[items, 1, max_q, max_kv]`` bool: causal from the end of each item's keys."""
    i = np.arange(max_q)[None, :, None]
    j = np.arange(max_kv)[None, None, :]
    query_pos = (kv_len - q_len)[:, None, None] + i
    allowed = (j <= query_pos) & (j < kv_len[:, None, None])
    if window is not None:
        allowed &= j > query_pos - window
    allowed |= (i >= q_len[:, None, None]) & (j == 0)  # padded query rows: keep softmax finite
    return allowed[:, None]


#: Scores are taken in base 2 where attention is written out: ``2 ** x`` is one MLX op, like ``exp``.
_LOG2_E = 1.4426950408889634
#: On the CPU, calls with fewer scores than this keep the fused call: its few graph nodes cost less than
#: the cheaper ``2 ** x`` saves (one sequence over 100 keys: 60 against 110 us; over 1,000: level).
_WRITTEN_OUT_SCORES = 8192
#: A written-out causal call attends in chunks of this many queries, each over only the keys it can see,
#: so the masked half of the score matrix is never computed.
_CAUSAL_CHUNK = 64


def _sdpa(q, k, v, scale, mask, softcap, sinks=None):
    """Attention of ``q [B, H, Lq, d]`` over ``k, v [B, KVH, Lk, d]``; ``sinks`` float32 ``[H]`` or None.

    MLX's fused kernel on Metal, and on the CPU for calls under ``_WRITTEN_OUT_SCORES``, unless Gemma 2's
    ``cap * tanh(scores / cap)`` applies (the kernel does not take it). Otherwise written out
    (:func:`_written_out`): MLX's CPU build runs the fused call as generic ops, computing every masked
    score and a softmax whose ``exp`` costs ~25 ns an element here.
    """
    b, heads, lq, _ = q.shape
    lk = k.shape[2]
    if softcap is None and (_METAL or b * heads * lq * lk < _WRITTEN_OUT_SCORES):
        # The kernel takes sinks in q's dtype (a bfloat16 checkpoint's sinks are bfloat16 values anyway).
        sinks = None if sinks is None else sinks.astype(q.dtype)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    if isinstance(mask, str) and lq > _CAUSAL_CHUNK:  # "causal", end-aligned: chunk i sees keys up to its end
        seen = lk - lq
        return mx.concatenate([
            _written_out(q[:, :, start : start + _CAUSAL_CHUNK], k[:, :, : seen + start + _CAUSAL_CHUNK],
                         v[:, :, : seen + start + _CAUSAL_CHUNK], scale, mask, softcap, sinks)
            for start in range(0, lq, _CAUSAL_CHUNK)
        ], axis=2)
    return _written_out(q, k, v, scale, mask, softcap, sinks)


def _written_out(q, k, v, scale, mask, softcap, sinks):
    """:func:`_sdpa` as plain ops, the scores scaled into base 2: ``2 ** x`` costs ~10 ns an element on
    MLX's CPU build against ~25 for ``exp`` (32 sequences decoding over 1,000 keys attend ~1.4x faster;
    see benchmarks/README.md). A KV head's query heads are the rows of one product (``[G * Lq, d]`` by
    ``[d, Lk]``), not a batch broadcast over its keys."""
    b, heads, lq, d = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qg = q.reshape(b, kv_heads, group * lq, d)
    if softcap is None:
        scores = (qg * (scale * _LOG2_E)) @ k.swapaxes(-1, -2)
    else:
        scores = mx.tanh((qg @ k.swapaxes(-1, -2)).astype(mx.float32) * (scale / softcap)) * (softcap * _LOG2_E)
    scores = scores.astype(mx.float32).reshape(b, kv_heads, group, lq, lk)
    if isinstance(mask, str):  # "causal", end-aligned
        mask = mx.arange(lk)[None, :] <= mx.arange(lk - lq, lk)[:, None]
    if mask is not None:
        scores = mx.where(mask[:, :, None] if mask.ndim == 4 else mask, scores, -mx.inf)
    top = scores.max(axis=-1, keepdims=True)
    if sinks is not None:  # each head's value-less logit, in the same base 2
        sinks = (sinks * _LOG2_E).reshape(kv_heads, group, 1, 1)
        top = mx.maximum(top, sinks)
    weights = mx.power(2.0, scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + mx.power(2.0, sinks - top)
    probs = (weights / total).astype(v.dtype)
    return (probs.reshape(b, kv_heads, group * lq, lk) @ v).reshape(b, heads, lq, d)


@hookimpl
def attention(q, k, v, scale, sliding_window, softcap=None, sinks=None, alibi_slopes=None):
    if alibi_slopes is not None:  # BLOOM's, MPT's: neither caps nor sinks
        return alibi.attend(_FRAMEWORK, q, k, v, scale, sliding_window, alibi_slopes, _CAUSAL_CHUNK)
    q_len, kv_len = q.shape[0], k.shape[0]
    qh, kh, vh = (a.transpose(1, 0, 2)[None] for a in (q, k, v))
    if sliding_window is None:
        mask = "causal" if q_len > 1 else None
    else:
        mask = mx.array(
            _end_aligned_mask(np.array([q_len]), np.array([kv_len]), q_len, kv_len, sliding_window)
        )
    out = _sdpa(qh, kh, vh, scale, mask, softcap, sinks)
    return out[0].transpose(1, 0, 2)


class _Group:
    """Items attended in one call: ``[items, heads, max_q, d]`` queries padded, keys gathered by
    ``kv_slots``, an end-aligned mask; one item alone needs no padding and a causal mask only."""

    def __init__(self, batch, items: np.ndarray):
        q_len = batch.query_lengths[items].astype(np.int64)
        kv_len = batch.seq_lens[items].astype(np.int64)
        starts = batch.cu_seqlens_q[:-1][items].astype(np.int64)
        self.single = len(items) == 1
        self.decoding = bool((q_len == 1).all())  # attended over the mirrors where the book planned it
        self.max_q, self.max_kv = int(q_len.max()), int(kv_len.max())
        self.tokens = (int(starts[0]), int(starts[0] + q_len[0])) if self.single else None
        self._tables, self._block_size, self._kv_slots = batch.block_tables[items], batch.block_size, None
        self._q_len, self._kv_len = q_len, kv_len
        self._masks: dict = {}
        if not self.single:
            i = np.arange(self.max_q)
            q_rows = np.where(i[None, :] < q_len[:, None], starts[:, None] + i[None, :], 0)
            self.q_rows = mx.array(q_rows.astype(np.int32))  # [items, max_q]
            valid = i[None, :] < q_len[:, None]
            self.out_rows = mx.array(np.flatnonzero(valid).astype(np.int32))  # row-major: item by item, in order

    @property
    def kv_slots(self) -> mx.array:
        """``[items, max_kv]`` pool slot of every key, built on first use."""
        if self._kv_slots is None:
            bs, tables = self._block_size, self._tables
            j = np.arange(self.max_kv)
            slots = tables[:, np.minimum(j // bs, tables.shape[1] - 1)] * bs + j % bs
            slots = np.where(j[None, :] < self._kv_len[:, None], slots, 0)
            self._kv_slots = mx.array(slots.astype(np.int32))
        return self._kv_slots

    def mask(self, window):
        """Built once per window size per forward pass."""
        if self.single and window is None:
            return "causal" if self.max_q > 1 else None
        if window not in self._masks:
            self._masks[window] = mx.array(
                _end_aligned_mask(self._q_len, self._kv_len, self.max_q, self.max_kv, window)
            )
        return self._masks[window]

    def queries(self, q):
        """This group's query rows, for a group of one item or of items decoding one token each."""
        if not self.single:
            return q[self.q_rows.reshape(-1)]
        start, end = self.tokens
        return q if end - start == q.shape[0] else q[start:end]

    def attend(self, q, pool, layer, scale, window, softcap, sinks):
        """This group's rows of the attention output, item by item."""
        k = pool.k[layer][self.kv_slots]  # [items, max_kv, kvh, d]
        v = pool.v[layer][self.kv_slots]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        mask = self.mask(window)
        if self.single:
            out = _sdpa(self.queries(q).transpose(1, 0, 2)[None], k, v, scale, mask, softcap, sinks)
            return out[0].transpose(1, 0, 2)
        qp = q[self.q_rows].transpose(0, 2, 1, 3)  # [items, heads, max_q, d]
        out = _sdpa(qp, k, v, scale, mask, softcap, sinks)
        out = out.transpose(0, 2, 1, 3).reshape(-1, q.shape[1], q.shape[2])  # [items * max_q, heads, d]
        return out[self.out_rows]


class PreparedBatch:
    """Device-side index arrays of one forward pass, shared by every layer: its attention calls
    and the order that puts their rows back."""

    def __init__(self, batch):
        calls, order = batch.attention_calls()
        self.groups = [_Group(batch, items) for items in calls]
        self.order = None if order is None else mx.array(order.astype(np.int32))


@hookimpl
def prepare_attention_batch(batch):
    # A batch of decode steps is attended over the mirrors (``_mirrored_decode``); should the
    # book refuse it a plan, ``paged_attention`` prepares it on first use.
    return None if len(batch.decoding) == batch.num_items else PreparedBatch(batch)


def _arena_copies(pool: KVPool, layer: int, plan: MirrorPlan, sync: str) -> tuple[mx.array, ...]:
    """``(rows, heads, positions)`` arena coordinates, each ``[copies, kv_heads]`` (indexing with whole
    grids costs MLX one scatter node, a ``:`` for the heads nine), and the K and V values to put
    there: this step's own rows when the plan copies only those (``plan.fresh``), else the pool's."""
    dev = plan.device
    if sync not in dev:
        src, dst_row, dst_pos = (plan.src, plan.dst_row, plan.dst_pos) if sync == "step" else plan.full()
        grids = np.empty((3, len(src), pool.shape[0]), dtype=np.int32)  # (row, head, position) of each copy
        grids[0], grids[1], grids[2] = dst_row[:, None], np.arange(pool.shape[0]), dst_pos[:, None]
        dev[sync] = (mx.array(src.astype(np.int32)), *(mx.array(g) for g in grids))
    src, *where = dev[sync]
    if sync == "step" and plan.fresh:
        k, v = pool.written[layer]
        if plan.whole:
            return (*where, k, v)
        if "tokens" not in dev:
            dev["tokens"] = mx.array(plan.tokens.astype(np.int32))
        return (*where, k[dev["tokens"]], v[dev["tokens"]])
    return (*where, pool.k[layer][src], pool.v[layer][src])


def _arena_rows(pool: KVPool, layer: int, plan: MirrorPlan, sync: str) -> tuple[mx.array, mx.array]:
    """The layer's arena K and V ``[rows, KVH, capacity, d]``, brought up to date: only the positions written since
    the last step are copied in (``_arena_copies``, ``ferrum.kv_mirror``)."""
    pool.fit_arena(*plan.arena_shape)
    k_rows, v_rows = pool.arena_k[layer], pool.arena_v[layer]
    if plan.src.size or sync != "step":
        rows, heads_at, positions, k_new, v_new = _arena_copies(pool, layer, plan, sync)
        k_rows[rows, heads_at, positions] = k_new
        v_rows[rows, heads_at, positions] = v_new
    return k_rows, v_rows


def _mirrored_decode(q, pool: KVPool, layer: int, plan: MirrorPlan, sync: str, scale, window, softcap=None,
                     sinks=None):
    """Decode items attended over their arena rows (:func:`_arena_rows`). A KV head's query heads
    are the rows of one product, except with ``sinks``, which are per head: one query row per head."""
    dev = plan.device
    k_rows, v_rows = _arena_rows(pool, layer, plan, sync)
    n, heads, d = q.shape
    kvh = k_rows.shape[1]
    qg = q.reshape(n, kvh, heads // kvh, d) if sinks is None else q.reshape(n, heads, 1, d)
    if n == 1:  # one row: a slice of it, no mask
        row, start, end = int(plan.rows[0]), int(plan.first_keys(window)[0]), int(plan.lengths[0])
        k, v = k_rows[row : row + 1, :, start:end], v_rows[row : row + 1, :, start:end]
        return _sdpa(qg, k, v, scale, None, softcap, sinks).reshape(1, heads, d)
    if "rows" not in dev:
        dev["rows"], dev["masks"] = mx.array(plan.rows.astype(np.int32)), {}
    masks = dev["masks"].get(window)
    if masks is None:  # over the columns [offset, capacity) (a chunked view's or a window's items see no others)
        offset, first, end = plan.row_spans(window)
        kpos = np.arange(offset, plan.capacity)[None, :]
        allowed = (kpos >= first[:, None]) & (kpos < end[:, None])
        masks = dev["masks"][window] = (offset, mx.array(allowed[:, None, None, :]))  # [rows, 1, 1, L]
    offset, mask = masks
    k = k_rows[: plan.num_rows, :, offset : plan.capacity]
    v = v_rows[: plan.num_rows, :, offset : plan.capacity]
    if plan.in_order:
        return _sdpa(qg, k, v, scale, mask, softcap, sinks).reshape(n, heads, d)
    rows = dev["rows"]
    q_rows = mx.zeros((plan.num_rows, *qg.shape[1:]), dtype=q.dtype)
    q_rows[rows] = qg
    out = _sdpa(q_rows, k, v, scale, mask, softcap, sinks)
    return out[rows].reshape(n, heads, d)


@hookimpl
def paged_attention(q, pool, layer, batch, scale, sliding_window, softcap=None, sinks=None, alibi_slopes=None):
    plan, sync = pool.mirrors.begin(batch, layer, pool.writes[layer])
    if alibi_slopes is not None:  # BLOOM's, MPT's: their biases written out, over the mirrors or gathered keys
        rows = None if plan is None else _arena_rows(pool, layer, plan, sync)
        return alibi.paged_attend(_FRAMEWORK, q, pool.k[layer], pool.v[layer], batch, scale, sliding_window,
                                  alibi_slopes, _CAUSAL_CHUNK, plan, rows)
    features = (sliding_window, softcap, sinks)
    if plan is not None and plan.whole:
        return _mirrored_decode(q, pool, layer, plan, sync, scale, *features)
    prep = batch.prepared
    if prep is None:
        prep = batch.prepared = PreparedBatch(batch)
    parts = [_mirrored_decode(group.queries(q), pool, layer, plan, sync, scale, *features)
             if plan is not None and group.decoding else group.attend(q, pool, layer, scale, *features)
             for group in prep.groups]
    return parts[0] if prep.order is None else mx.concatenate(parts)[prep.order]


# ------------------------------------------------------- mixture of experts
def _top_ids(values, k):
    """The columns of each row's ``k`` largest values. MLX has no ``torch.topk`` tie rule (ferrum.moe.routing):
    ``argsort`` is stable (on the CPU at least), so boundary ties go to the lowest indices."""
    return mx.argsort(-values, axis=-1)[:, :k]


@hookimpl
def moe_route(logits, shared_logit, top_k, normalize, routing=None):
    if routing is not None:
        return _route_grouped(logits, top_k, normalize, routing)
    probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
    ids = _top_ids(probs, top_k)
    weights = mx.take_along_axis(probs, ids, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    if shared_logit is not None:
        weights = mx.concatenate([weights, mx.sigmoid(shared_logit.astype(mx.float32))], axis=-1)
    return ids.astype(mx.int32), weights


def _route_grouped(logits, top_k, normalize, routing):
    """Grouped routing (``ferrum.moe.routing.route_grouped``, its ``routing.rule``), in float32, lazily."""
    rule, logits = routing.rule, logits.astype(mx.float32)
    scores = mx.softmax(logits, axis=-1, precise=True) if rule.scoring == "softmax" else mx.sigmoid(logits)
    basis = logits if rule.choice == "logits" else scores  # Kolibri-1 chooses on the logits (API 1.23)
    choice = basis + routing.bias if rule.corrected else basis
    if routing.n_group > 1:
        tokens, experts = choice.shape
        grouped = choice.reshape(tokens, routing.n_group, experts // routing.n_group)  # tokens may be 0
        group_scores = grouped.max(axis=-1) if rule.group_score == "max" else mx.topk(grouped, 2, axis=-1).sum(axis=-1)
        kept = mx.put_along_axis(mx.zeros(group_scores.shape, dtype=mx.bool_),
                                 _top_ids(group_scores, routing.topk_group), mx.array(True), axis=-1)
        kept = mx.repeat(kept, experts // routing.n_group, axis=1)
        choice = mx.where(kept, choice, rule.masked)
    ids = _top_ids(choice, top_k)
    weights = mx.take_along_axis(scores, ids, axis=-1)
    if routing.n_group > 1 and not rule.dropped_weighed:  # a dropped expert picked by its masked 0 weighs 0 (1.28)
        weights = mx.where(mx.take_along_axis(kept, ids, axis=-1), weights, 0.0)
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    weights = weights * routing.scale
    if rule.expert_scaled:  # Gemma 4: each chosen expert's own scale (API 1.16)
        weights = weights * routing.expert_scale[ids]
    return ids.astype(mx.int32), weights


@hookimpl
def lora_apply(y, x, a, b, batch):
    """Per token, its slot's factors picked by ``mx.gather_mm`` (punica's BGMV), rows sorted by slot;
    the products are scattered back into ``y`` with one ``.at[].add``."""
    prepared = batch.prepared.get("mlx")
    if prepared is None:
        prepared = batch.prepared["mlx"] = (mx.array(batch.order), mx.array(batch.slots))
    rows, slots = prepared
    dtype = a.dtype if _METAL else mx.float32  # MLX's CPU gather_mm runs float32 only (0.32)
    xs = mx.expand_dims(x[rows], 1).astype(dtype)  # [n, 1, in]
    shrunk = mx.gather_mm(xs, a.astype(dtype).swapaxes(-1, -2), rhs_indices=slots, sorted_indices=True)
    delta = mx.gather_mm(shrunk, b.astype(dtype), rhs_indices=slots, sorted_indices=True)
    return y.at[rows].add(delta.squeeze(1).astype(y.dtype))


class ExpertStack:
    """One stacked projection ``[E, out, in]``: a float array, or packed ``(q, scales, biases)`` (a float mode's
    codes and uint8 scales, without biases, where the stack carries them: ``StackedQuantized.float_codes``)."""

    __slots__ = ("w", "q", "scales", "biases", "bits", "group_size", "mode", "padded")

    def __init__(self, stack, dtype):
        self.w = self.q = self.scales = self.biases = self.bits = self.group_size = None
        codes = getattr(stack, "float_codes", None)
        self.mode = "affine" if codes is None else codes.mode
        self.padded = False
        if isinstance(stack, np.ndarray):
            # MLX's CPU gather_mm runs float32 only (0.32: "GatherMM::eval Currently only supports float32").
            self.w = from_numpy(np.ascontiguousarray(stack), dtype if _METAL else "float32")
        elif codes is not None:
            self.q, self.scales, self.bits, self.group_size = _float_codes(codes)
        else:  # groups of 16 (GGUF's K-quant sub-blocks) run as 32, padded as a QuantizedMatrix pads them
            self.padded = stack.group_size == 16
            self.q = mx.array(_padded_codes(stack.packed, stack.bits) if self.padded else stack.packed)
            self.scales, self.biases = from_numpy(stack.scales, dtype), from_numpy(stack.biases, dtype)
            self.bits, self.group_size = stack.bits, 32 if self.padded else stack.group_size

    @property
    def nbytes(self) -> int:
        if self.bits is None:
            return self.w.nbytes
        return self.q.nbytes + self.scales.nbytes + (0 if self.biases is None else self.biases.nbytes)

    def __call__(self, x, indices, sorted_indices):
        """``x [..., 1, in] @ W[indices].T`` as mlx-lm's ``SwitchLinear`` / ``QuantizedSwitchLinear`` do."""
        if self.bits is None:
            return mx.gather_mm(x.astype(self.w.dtype), self.w.swapaxes(-1, -2), rhs_indices=indices,
                                sorted_indices=sorted_indices)
        if self.padded:
            x = _pad_groups_of_16(x)
        return mx.gather_qmm(x, self.q, self.scales, self.biases, rhs_indices=indices, transpose=True,
                             group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices)


@hookimpl
def upload_experts(name, weight, dtype):
    return ExpertStack(weight, dtype)


#: From this many (token, expert) pairs the tokens are sorted by expert first (mlx-lm's switch_layers rule).
_SORT_PAIRS = 64


def _clamped_swiglu(activation, gate, up):
    """gpt-oss's, Hy4's and Step 3.5's expert activation (``ferrum.moe.activation.ClampedSwiGLU``: the gate or, API
    1.29, the swish clamped), in float32."""
    g = gate.astype(mx.float32)
    g = mx.minimum(g, activation.limit) if activation.clamp == "gate" else g
    swish = g * mx.sigmoid(activation.alpha * g)
    swish = mx.minimum(swish, activation.limit) if activation.clamp == "swish" else swish
    u = mx.clip(up.astype(mx.float32), -activation.limit, activation.limit)
    return ((u + activation.up_offset) * swish).astype(gate.dtype)


def _situ(activation, gate, up):
    """Kimi K3's expert activation (``ferrum.moe.activation.Situ``, API 1.33): ``softcap(u, linear_beta) *
    softcap(g, beta) * sigmoid(g)``, in float32 as mlx-lm's ``_situ``."""
    g, u = gate.astype(mx.float32), up.astype(mx.float32)
    a = activation.beta * mx.tanh(g / activation.beta) * mx.sigmoid(g)
    if activation.linear_beta is not None:
        u = activation.linear_beta * mx.tanh(u / activation.linear_beta)
    return (a * u).astype(gate.dtype)


@hookimpl
def moe_experts(x, expert_ids, expert_weights, gate, up, down, shared, biases=None, activation=None):
    tokens, top_k = expert_ids.shape
    h = mx.expand_dims(x, (-2, -3))  # [T, 1, 1, hidden]
    do_sort = expert_ids.size >= _SORT_PAIRS
    indices = expert_ids
    if do_sort:  # gather each (token, expert) pair's row in expert order
        flat = expert_ids.flatten()
        order = mx.argsort(flat)
        h, indices, inverse = h.flatten(0, -3)[order // top_k], flat[order], mx.argsort(order)

    def project(stack, rows, bias):
        out = stack(rows, indices, do_sort)
        return out if bias is None else out + mx.expand_dims(bias[indices], -2)

    gate_bias, up_bias, down_bias = biases or (None, None, None)
    u = project(up, h, up_bias)
    if gate is None:  # ungated experts by their op: Nemotron 3 Nano's squared ReLU of up alone (API 1.18), Phixtral's
        # GELU (1.32)
        hidden = relu_squared(u) if activation.op == "relu_squared" else gelu(u, activation.tanh)
    elif activation is None:
        hidden = silu_mul(project(gate, h, gate_bias), u)
    else:  # Gemma 4's GeGLU by its op (API 1.16), Kimi K3's SiTU (1.33), else gpt-oss's clamped SwiGLU
        g = project(gate, h, gate_bias)
        hidden = (gelu_tanh_mul(g, u) if activation.op == "gelu_tanh_mul" else _situ(activation, g, u)
                  if isinstance(activation, Situ) else _clamped_swiglu(activation, g, u))
    y = project(down, hidden, down_bias)
    if do_sort:
        y = mx.unflatten(y[inverse], 0, (tokens, top_k))
    y = y.squeeze(-2).astype(mx.float32)  # [T, k, hidden]
    out = (y * expert_weights[:, :top_k, None]).sum(axis=1)
    if shared is not None:
        out = out + expert_weights[:, top_k:] * shared.astype(mx.float32)
    return out.astype(x.dtype)
