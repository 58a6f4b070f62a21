"""torch implementations of the Ferrum ops, on one device picked at import.

The same code runs on ``cuda:N`` and on torch's CPU device; only the device
differs (plus pinned, non-blocking host-to-device copies of small arrays on
CUDA). Nothing here builds autograd graphs: no tensor is created with
``requires_grad``, so ops run without ``torch.inference_mode`` (entering it
costs about as much per op as it saves, and KV pools made inside it could not
be updated in place outside it).

Quantized weights stay packed on the device; :mod:`ferrum_cuda.quant` says
which path (torch's int4 kernels, or dequantizing one matrix at a time) each
bit width, group size and compute dtype takes.

Paged attention
---------------
A batch in which every item decodes one token attends over per-sequence
contiguous copies of the pool (:mod:`ferrum.kv_mirror`): each step copies the
positions written since the last one into an arena ``[rows, kv_heads,
capacity, head_dim]`` and runs one SDPA over it, so its cost does not grow
with a gather of the whole context. The arena holds at most as many positions
as the pool; a decode batch it cannot hold, and every other batch, goes the
gathering way below.

:func:`prepare_attention_batch` turns an :class:`~ferrum.attention.AttentionBatch`
into a :class:`PreparedBatch` once per forward pass (on first use for a decode
batch): every index array the
layers need is packed into one int64 host buffer and copied to the device in
one transfer. :func:`paged_attention` then runs without touching the host:

* one item: gather its blocks (or take a zero-copy slice when its blocks are
  consecutive), then one SDPA call: ``is_causal`` for a whole prompt, no mask
  for a decode step (the sliding window trims the keys), an end-aligned mask
  otherwise (chunked prefill);
* decode items (``q_len == 1``): gather ``[n, max_kv]`` keys/values, fold the
  query heads of each KV head into the query axis (``[n, kv_heads, group, d]``)
  so GQA needs no key repetition, and mask ``[n, 1, 1, max_kv]`` by length;
* prefill items: pad queries to ``[n, heads, max_q, d]``, gather keys/values
  to ``[n, kv_heads, max_kv, d]``, one SDPA with a boolean mask built on the
  device from each query's position (causal, end-aligned, sliding window);
* a long prefill item (``AttentionBatch.alone``: from ``ALONE_PAIRS`` query x key pairs)
  attends in a call of its own, as a single item does, rather than padding every
  other prompt to its length;
* on a GPU with FlashAttention 2 (compute capability 8.0 on, half precision, head
  size a multiple of 8 up to 256, no soft cap), the items of a batch with more
  than one query token, and a lone item whose queries follow cached keys, instead
  attend in one variable-length flash call over their keys gathered token by
  token: a step of eight prompts is one kernel per layer, not one SDPA per prompt,
  and a later chunk needs no mask (``FERRUM_CUDA_VARLEN=0`` turns it off);
* a batch of several kinds runs each call and restores token order with one
  ``index_select``; its items that decode one token attend over the mirrors
  (below) where the book planned them.

Masks depend on the layer's sliding window, so each prepared batch builds
them lazily once per distinct window and reuses them across layers.

A soft cap or attention sinks (gpt-oss) take every other path above with the SDPA call
written out (:func:`_written_sdpa`): no fused kernel takes either. The flash call takes
sinks all the same: its log-sum-exp says how much of each row's softmax a sink takes.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ferrum.arch import alibi
from ferrum.backends import BackendInfo
from ferrum.hookspec import API_VERSION, hookimpl
from ferrum.kv_mirror import MirrorBook, MirrorPlan
from ferrum.moe.activation import Situ
from ferrum.recurrent import batched
from ferrum.sampling import DeviceSample, SampleResult
from ferrum_cuda import graphs, guess_device, requested_device, quant

# --------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------


def _pick_device() -> tuple[torch.device, str]:
    """The device every op runs on, and a note when it is not the one asked for."""
    wanted, _ = guess_device()
    explicit = requested_device() is not None
    if not explicit and torch.cuda.is_available():
        # torch knows better than the probe's file check (e.g. ROCm builds).
        wanted = "cuda:0"
    try:
        device = torch.device(wanted)
    except RuntimeError as exc:
        return torch.device("cpu"), f"invalid torch device {wanted!r} ({exc}); running on the CPU"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "torch.cuda.is_available() is False"
            return torch.device("cpu"), f"{wanted} was requested but {why}; running on the torch CPU device"
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            return (
                torch.device("cpu"),
                f"{wanted} was requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
                "running on the torch CPU device",
            )
        return torch.device("cuda", index), ""
    if device.type != "cpu":
        return torch.device("cpu"), f"device {wanted!r} is not supported by this backend; running on the CPU"
    return device, ""


DEVICE, DEVICE_NOTE = _pick_device()
IS_CUDA = DEVICE.type == "cuda"
if DEVICE_NOTE:
    warnings.warn(f"ferrum cuda backend: {DEVICE_NOTE}", RuntimeWarning, stacklevel=2)

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2] if p.isdigit())
#: ``enable_gqa`` in SDPA (torch >= 2.5).
_HAS_GQA = _TORCH_VERSION >= (2, 5)
#: CPU SDPA handles GQA with a mask natively; CUDA's mask-capable kernel
#: (memory-efficient attention) does not, so there keys are repeated instead.
_GQA_WITH_MASK = _HAS_GQA and not IS_CUDA
_HAS_RMS_NORM = hasattr(F, "rms_norm")


@functools.cache
def _flash_varlen_available() -> bool:
    """FlashAttention 2's variable-length kernel, through the aten op SDPA itself uses (torch's public
    ``varlen_attn`` changed its arguments between 2.11 and 2.13; the op did not). Asked on first use: reading
    the device's compute capability initializes CUDA, which an import must not do (a fork after it breaks)."""
    if not IS_CUDA or torch.version.hip or os.environ.get("FERRUM_CUDA_VARLEN", "1") == "0":
        return False
    flash_built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    return (flash_built and hasattr(torch.ops.aten, "_flash_attention_forward")
            and torch.cuda.get_device_capability(DEVICE) >= (8, 0))

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
}
_NUMPY_OK = {
    np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64),
    np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.int16), np.dtype(np.int8),
    np.dtype(np.uint8), np.dtype(np.bool_),
}
#: Host arrays up to this size are staged in pinned memory and copied
#: without blocking the host (CUDA only).
_PIN_LIMIT = 1 << 20


def _torch_dtype(dtype: str) -> torch.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"the torch backend has no dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


# --------------------------------------------------------------------------
# Info and host transfers
# --------------------------------------------------------------------------


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@hookimpl
def backend_info() -> BackendInfo:
    # Quantized weights run here in every format (ferrum_cuda.quant); bfloat16 is
    # their default dtype where torch's int4 kernels passed their self-test.
    int4_ok, int4_note = quant.int4_status(DEVICE)
    common = dict(
        name="cuda",
        api_version=API_VERSION,  # a built-in speaks the version of the core it ships with
        note="; ".join(n for n in (DEVICE_NOTE, int4_note) if n),
        quant_formats=quant.FORMATS,
        quantized_dtype="bfloat16" if int4_ok else None,
    )
    if IS_CUDA:
        _, total = torch.cuda.mem_get_info(DEVICE)
        return BackendInfo(
            device=str(DEVICE),
            dtypes=("float32", "float16", "bfloat16"),
            default_dtype="bfloat16",
            memory_bytes=int(total),
            **common,
        )
    return BackendInfo(
        device="cpu",
        dtypes=("float32", "bfloat16"),
        default_dtype="float32",
        memory_bytes=_host_memory_bytes(),
        **common,
    )


def _host_tensor(array: Any) -> tuple[torch.Tensor, bool]:
    """A CPU tensor over ``array`` and whether it owns fresh memory (not an alias)."""
    a = np.asarray(array)
    owned = False
    if a.dtype.name == "bfloat16":  # ml_dtypes: reinterpret the bits, exact
        if not (a.flags.c_contiguous and a.flags.writeable):
            a, owned = np.array(a, order="C"), True
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16), owned
    if a.dtype not in _NUMPY_OK:  # float8, uint32, ... go through float32/int64
        a, owned = a.astype(np.int64 if a.dtype.kind in "iu" else np.float32), True
    if not (a.flags.c_contiguous and a.flags.writeable):
        a, owned = np.array(a, order="C"), True
    return torch.from_numpy(a), owned


def _upload(array: Any, dtype: str | None, alias_ok: bool = False) -> torch.Tensor:
    host, owned = _host_tensor(array)
    target = host.dtype if dtype is None else _torch_dtype(dtype)
    if not IS_CUDA:
        if host.dtype == target and not owned and not alias_ok:
            return host.clone()  # from_numpy copies: never alias the caller's array
        return host.to(target)
    if host.numel() * host.element_size() <= _PIN_LIMIT:
        return host.pin_memory().to(DEVICE, non_blocking=True).to(target)
    return host.to(DEVICE).to(target)


@hookimpl
def from_numpy(array, dtype):
    return _upload(array, dtype)


@hookimpl
def upload_weight(name, array, dtype):
    # Checkpoint arrays are ours once read: on the CPU the weight may alias it.
    weight = _upload(array, dtype, alias_ok=True)
    if not IS_CUDA and weight.dtype == torch.float32 and weight.dim() in (2, 3):
        # Same shape [out, in] (per expert for a [E, out, in] stack), column-major memory:
        # MKL's float32 GEMM with a contiguous [in, out] operand is 10-40% faster for
        # decode-sized batches (measured with torch 2.13). bfloat16 (oneDNN) prefers rows.
        weight = weight.mT.contiguous().mT
    return weight


@hookimpl
def to_numpy(x):
    if x.is_floating_point() and x.dtype != torch.float32:
        x = x.float()
    return x.detach().cpu().numpy()


@hookimpl
def cast(x, dtype):
    return x.to(_torch_dtype(dtype))


def _small(array: np.ndarray) -> torch.Tensor:
    return _upload(np.ascontiguousarray(array), None)


def _sample_graph(logits, batch) -> tuple[torch.Tensor, ...]:
    """``ferrum.sampling.sample_numpy`` in torch on the logits' device: ``(tokens, unusable)``, plus
    ``(chosen, top, top_logp)`` when logprobs are wanted; nothing is copied to the host."""
    unusable = logits.isnan().any(dim=-1)
    x = logits.float()
    if batch.adjust_rows.size:
        rows, tokens = _small(batch.adjust_rows).long(), _small(batch.adjust_tokens).long()
        scale, biased = _small(batch.adjust_scale), x[rows, tokens] + _small(batch.adjust_offset)
        x = x.clone()
        x[rows, tokens] = torch.where(biased > 0, biased / scale, biased * scale) + _small(batch.adjust_shift)
    tokens = x.argmax(dim=-1)
    order = None
    if not batch.all_greedy or batch.num_logprobs:
        temperature = _small(np.where(batch.temperature > 0, batch.temperature, 1.0).astype(np.float32))
        probs = torch.softmax(x / temperature[:, None], dim=-1)
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        sorted_probs = probs.gather(-1, order)
    if not batch.all_greedy:
        vocab = x.shape[-1]
        rank = torch.arange(vocab, device=x.device)[None, :]
        keep = rank < _small(np.where(batch.top_k > 0, batch.top_k, vocab))[:, None]
        top_k_mass = torch.where(keep, sorted_probs, 0.0).sum(dim=-1, keepdim=True)
        keep &= (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < _small(batch.top_p)[:, None] * top_k_mass
        keep &= sorted_probs >= _small(batch.min_p)[:, None] * sorted_probs[:, :1]
        keep |= rank == 0
        cdf = torch.cumsum(torch.where(keep, sorted_probs, 0.0), dim=-1)
        pick = (cdf <= _small(batch.uniform)[:, None] * cdf[:, -1:]).sum(dim=-1)
        sampled = order.gather(-1, pick.clamp(max=vocab - 1)[:, None])[:, 0]
        tokens = torch.where(_small(batch.temperature > 0), sampled, tokens)
    if not batch.num_logprobs:
        return tokens, unusable
    logp = torch.log_softmax(x, dim=-1)
    top = order[:, : batch.num_logprobs]
    return tokens, unusable, logp.gather(-1, tokens[:, None])[:, 0], top, logp.gather(-1, top)


def _to_host(graph: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Start copying the results to the host; on CUDA into pinned memory, without waiting."""
    if not IS_CUDA:
        return graph
    return tuple(t.to("cpu", non_blocking=True) for t in graph)


def _sample_result(host: tuple[torch.Tensor, ...]) -> SampleResult:
    tokens, unusable, *logprobs = (part.numpy() for part in host)
    if not logprobs:
        return SampleResult(tokens.astype(np.int64), unusable=unusable)
    chosen, top, top_logp = logprobs
    return SampleResult(tokens.astype(np.int64), chosen, top.astype(np.int64), top_logp, unusable)


@hookimpl
def sample(logits, batch):
    """``ferrum.sampling.sample_numpy`` in torch on the logits' device; only [n]-sized results are copied back."""
    return _sample_result(tuple(t.cpu() for t in _sample_graph(logits, batch)))


@hookimpl
def sample_on_device(logits, batch):
    """:func:`sample` without a host synchronisation: the ids stay on the device for the next step's
    embedding; on CUDA the copy to the host is queued behind the step and ``read`` waits for it."""
    graph = _sample_graph(logits, batch)
    host = _to_host(graph)
    done = torch.cuda.Event() if IS_CUDA else None
    if done is not None:
        done.record()

    def read() -> SampleResult:
        if done is not None:
            done.synchronize()
        return _sample_result(host)

    return DeviceSample(graph[0].int(), read)


# --------------------------------------------------------------------------
# Elementwise and dense ops
# --------------------------------------------------------------------------


@hookimpl
def reshape(x, shape):
    return x.reshape(shape)


@hookimpl
def take_rows(x, indices):
    return x.index_select(0, indices)


@hookimpl
def embedding(weight, ids):
    return weight.index_select(0, ids)


@hookimpl
def concat(parts):
    return torch.cat(list(parts), dim=0)


@hookimpl
def compile_fn(fn):
    """On a GPU, each block half replays from CUDA graphs (:mod:`ferrum_cuda.graphs`); on the CPU there are
    no launches to save."""
    return graphs.graphed(fn) if IS_CUDA else fn


@hookimpl
def split(x, sizes):
    return list(torch.split(x, list(sizes), dim=-1))


@hookimpl
def add(a, b):
    return a + b


@hookimpl
def linear(x, weight, bias):
    return F.linear(x, weight, bias)


# --------------------------------------------------------------------------
# Quantized weights (paths and forms: ferrum_cuda.quant)
# --------------------------------------------------------------------------


@hookimpl
def quantized_upload(name, weight, dtype, role):
    # The uint32 stream viewed as its little-endian bytes: rows stay gatherable.
    data = _upload(np.ascontiguousarray(weight.packed, dtype="<u4").view(np.uint8), None, alias_ok=True)
    scales = _upload(weight.scales, None, alias_ok=True)
    biases = _upload(weight.biases, None, alias_ok=True)
    return quant.upload(data, scales, biases, weight.bits, weight.group_size, _torch_dtype(dtype), role)


@hookimpl
def quantized_linear(x, weight, bias):
    return quant.linear(x, weight, bias)


@hookimpl
def quantized_embedding(weight, ids):
    return quant.embedding(weight, ids)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise and scale in float32 (the hookspec's rule), return x's dtype.
    # Hugging Face instead casts before scaling by the weight; in bfloat16 the
    # two differ by about one rounding step.
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if _HAS_RMS_NORM:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight  # pragma: no cover
    xf, wf = x.float(), weight.float()
    if _HAS_RMS_NORM:
        out = F.rms_norm(xf, (xf.shape[-1],), wf, eps)
    else:  # pragma: no cover - torch < 2.4
        out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * wf
    return out.to(x.dtype)


@hookimpl
def rms_norm(x, weight, eps):
    return _rms_norm(x, weight, eps)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    summed = x + residual
    return _rms_norm(summed, weight, eps), summed


@hookimpl
def add_rms_norm(x, residual, weight, eps):
    return _add_rms_norm(x, residual, weight, eps)


class _IdentityCache:
    """One entry keyed by the identity (and version) of a few tensors.

    The model hands every layer the same ``positions`` and ``slot_mapping``
    arrays, so what is derived from them (rope's cos/sin, int64 slots) is
    computed once per forward pass instead of once per layer. The entry holds
    its keys, so their ids cannot be reused while cached, and ``_version``
    catches in-place changes. Inference tensors have no version counter, so
    they are never cached.
    """

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry: tuple = ()

    def get(self, *keys: Any) -> Any:
        entry = self.entry  # one read: safe if another thread replaces it
        if len(entry) != len(keys) + 2:
            return None
        for cached, key in zip(entry, keys):
            if cached is not key:
                return None
        if keys[0].is_inference() or entry[-2] != keys[0]._version:
            return None
        return entry[-1]

    def put(self, value: Any, *keys: Any) -> Any:
        if not keys[0].is_inference():
            self.entry = (*keys, keys[0]._version, value)
        return value


_rope_cache = _IdentityCache()
_long_cache = _IdentityCache()


def _rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    hit = _rope_cache.get(positions, inv_freq, dtype)
    if hit is not None:
        return hit
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # [T, d/2]
    cos, sin = angles.cos(), angles.sin()
    cos_full = torch.cat([cos, cos], dim=-1)[:, None, :].to(dtype)  # [T, 1, d]
    sin_signed = torch.cat([-sin, sin], dim=-1)[:, None, :].to(dtype)
    return _rope_cache.put((cos_full, sin_signed), positions, inv_freq, dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate_half(x) * sin == roll(x, d/2) * [-sin, sin]
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


@hookimpl
def rope(x, positions, inv_freq):
    return _rotate(x, *_rope_tables(positions, inv_freq, x.dtype))


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


@hookimpl
def silu_mul(gate, up):
    return _silu_mul(gate, up)


@hookimpl
def gelu_tanh_mul(gate, up):
    return _gelu_tanh_mul(gate, up)


@hookimpl
def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@hookimpl
def gelu(x, tanh):
    return F.gelu(x, approximate="tanh" if tanh else "none")


@hookimpl
def relu_squared(x):
    return torch.relu(x).square()


@hookimpl
def relu(x):
    return torch.relu(x)


@hookimpl
def quantize_activations(x, levels):
    rows = x.float()
    scale = levels / rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((rows * scale).round().clamp(-levels - 1, levels) / scale).to(x.dtype)


@hookimpl
def fake_quantize(x, scale, low, high):
    step = torch.tensor(scale, dtype=torch.float32, device=x.device)
    return ((x.float() / step).round().clamp(low, high) * step).to(x.dtype)


@hookimpl
def xielu(x, alpha_p, alpha_n, beta, eps):
    # transformers' XIELUActivation._xielu_python, op for op, its parameters in x's dtype
    ap, an, b, e = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in (alpha_p, alpha_n, beta, eps))
    return torch.where(x > 0, ap * x * x + b * x, (torch.expm1(torch.minimum(x, e)) - x) * an + b * x)


@hookimpl
def mul_scalar(x, factor):
    return x * torch.tensor(factor, dtype=x.dtype, device=x.device)


@hookimpl
def softcap(x, cap):
    return (torch.tanh(x.float() / cap) * cap).to(x.dtype)


@hookimpl
def mul(a, b):
    return (a * b).to(a.dtype)


@hookimpl
def clip(x, limit):
    return x.clamp(-limit, limit)


# --------------------------------------------------------------------------
# Recurrent mixers (ferrum.recurrent.batched in torch ops)
# --------------------------------------------------------------------------

#: torch as ``ferrum.recurrent.batched`` and ``ferrum.arch.alibi`` write their ops (over numpy-like frameworks)
_FRAMEWORK = batched.Framework(torch, _small, lambda x, dtype: x.to(dtype), softmax=lambda x: x.softmax(-1),
                               take=lambda a, i: a.index_select(0, i.reshape(-1)).reshape(*i.shape, *a.shape[1:]))


@hookimpl
def sigmoid_mul(gate, x):
    return (x.float() * torch.sigmoid(gate.float())).to(x.dtype)


@hookimpl
def softplus_mul(gate, x):
    return (x.float() * torch.nn.functional.softplus(gate.float())).to(x.dtype)


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


# --------------------------------------------------------------------------
# Paged KV pool
# --------------------------------------------------------------------------


class KVPool:
    """Per-layer K and V tensors ``[num_blocks, block_size, kv_heads, head_dim]``."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.k = [torch.zeros(shape, dtype=dtype, device=DEVICE) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=DEVICE) for _ in range(num_layers)]
        # Token-major views of the same memory: [num_blocks * block_size, kvh, d].
        self.k_flat = [t.view(-1, num_kv_heads, head_dim) for t in self.k]
        self.v_flat = [t.view(-1, num_kv_heads, head_dim) for t in self.v]
        # Head-major views for SDPA: [1, kv_heads, num_blocks * block_size, head_dim].
        self.k_heads = [t.permute(1, 0, 2).unsqueeze(0) for t in self.k_flat]
        self.v_heads = [t.permute(1, 0, 2).unsqueeze(0) for t in self.v_flat]
        self.writes = [0] * num_layers  # kv_write calls per layer, for the mirror book
        # Decode's contiguous copies hold at most as many positions as the pool itself.
        self.mirrors = MirrorBook(num_layers, block_size, max_positions=num_blocks * block_size)
        self.arena = _Arena(num_layers)


class _Arena:
    """Decoding sequences' K/V kept contiguous (see :mod:`ferrum.kv_mirror`): per layer
    ``[rows, kv_heads, capacity, head_dim]``, sized as the mirror book's plans say."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows = self.capacity = 0

    def fit(self, pool: "KVPool", rows: int, capacity: int) -> None:
        """Resize to ``rows x capacity``, keeping what both shapes hold."""
        if (rows, capacity) == (self.rows, self.capacity):
            return
        keep_rows, keep_capacity = min(rows, self.rows), min(capacity, self.capacity)
        shape = (rows, pool.num_kv_heads, capacity, pool.head_dim)
        resized = []
        for old in self.k + self.v or [None] * (2 * self.num_layers):
            new = torch.zeros(shape, dtype=pool.dtype, device=DEVICE)
            if old is not None:
                new[:keep_rows, :, :keep_capacity] = old[:keep_rows, :, :keep_capacity]
            resized.append(new)
        self.k, self.v = resized[: self.num_layers], resized[self.num_layers :]
        self.rows, self.capacity = rows, capacity


@hookimpl
def kv_alloc(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype):
    return KVPool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, _torch_dtype(dtype))


def _as_long(index: torch.Tensor) -> torch.Tensor:
    if index.dtype == torch.int64:
        return index
    hit = _long_cache.get(index)
    if hit is not None:
        return hit
    return _long_cache.put(index.long(), index)


@hookimpl
def kv_write(pool, layer, k, v, slot_mapping):
    slots = _as_long(slot_mapping)
    if k.dtype != pool.dtype:
        k, v = k.to(pool.dtype), v.to(pool.dtype)
    pool.k_flat[layer].index_copy_(0, slots, k)
    pool.v_flat[layer].index_copy_(0, slots, v)
    pool.writes[layer] += 1


def _block_index(block_ids: Any) -> torch.Tensor:
    return _upload(np.asarray(block_ids, dtype=np.int64), None)


@hookimpl
def kv_gather(pool, layer, block_ids, length):
    index = _block_index(block_ids)
    kvh, d = pool.num_kv_heads, pool.head_dim
    k = pool.k[layer].index_select(0, index).view(-1, kvh, d)[:length]
    v = pool.v[layer].index_select(0, index).view(-1, kvh, d)[:length]
    return k, v


# --------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------


#: Queries a written-out call attends at once: its float32 scores are ``heads x this x keys`` (gpt-oss's 64
#: heads over 8,192 keys: 512 MiB), where a whole long prompt's would not fit.
_WRITTEN_QUERIES = 256


def _written_sdpa(q, k, v, scale, mask, causal, cap, sinks):
    """``_sdpa`` with what no fused kernel takes: Gemma 2's ``cap * tanh(scores / cap)`` on the scores, and
    gpt-oss's sinks, one more logit per row that joins the softmax and leaves without a value (as in
    transformers' eager attention). ``mask`` is boolean; ``sinks`` broadcasts against ``[B, H, Lq, 1]``.
    Long query runs go ``_WRITTEN_QUERIES`` at a time, each with its rows of the mask."""
    b, heads, lq, d = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    if causal:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if lq > _WRITTEN_QUERIES and (sinks is None or sinks.shape[2] == 1):  # not a decode step's folded heads
        def rows(start):
            end = start + _WRITTEN_QUERIES
            part = mask if mask is None or mask.shape[-2] == 1 else mask[..., start:end, :]
            return _written_sdpa(q[:, :, start:end], k, v, scale, part, False, cap, sinks)

        return torch.cat([rows(start) for start in range(0, lq, _WRITTEN_QUERIES)], dim=2)
    qg = q.reshape(b, kv_heads, heads // kv_heads, lq, d)
    scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)).float().reshape(b, heads, lq, lk).mul_(scale)
    if cap is not None:
        scores = torch.tanh(scores.div_(cap)).mul_(cap)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.expand(b, heads, lq, 1)], dim=-1)
    probs = scores.softmax(-1)[..., :lk].to(v.dtype).reshape(b, kv_heads, heads // kv_heads, lq, lk)
    return torch.matmul(probs, v[:, :, None]).reshape(b, heads, lq, d)


def _sdpa(q, k, v, scale, mask=None, causal=False, softcap=None, sinks=None):
    """SDPA with GQA: ``q [B, H, Lq, d]``, ``k, v [B, KVH, Lk, d]`` -> ``[B, H, Lq, d]``.

    ``sinks``, one logit per query head of the model, is laid over ``q``'s two head-carrying axes: as
    ``[1, H, 1, 1]``, or as ``[1, KVH, group, 1]`` where a decode step folds each KV head's query heads into
    the query axis (``q [B, KVH, group, d]``)."""
    if softcap is not None or sinks is not None:
        sinks = None if sinks is None else sinks.float().view(1, q.shape[1], -1, 1)
        return _written_sdpa(q, k, v, scale, mask, causal, softcap, sinks)
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        if _HAS_GQA and (causal or _GQA_WITH_MASK):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
            )
        b, _, lk, d = k.shape
        group = heads // kv_heads
        k = k[:, :, None].expand(b, kv_heads, group, lk, d).reshape(b, heads, lk, d)
        v = v[:, :, None].expand(b, kv_heads, group, lk, d).reshape(b, heads, lk, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _end_aligned_mask(q_len: int, kv_len: int, window: int | None, key_start: int = 0) -> torch.Tensor:
    """``[q_len, kv_len - key_start]`` bool: query ``i`` sees key ``j`` (absolute)
    when ``j <= kv_len - q_len + i`` and, with a window, ``j > that - window``."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=DEVICE)[:, None]
    kpos = torch.arange(key_start, kv_len, device=DEVICE)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    return allowed


def _window_start(q_len: int, kv_len: int, window: int | None) -> int:
    """First key any query can see (keys before it are dropped, not masked)."""
    if window is None:
        return 0
    return max(0, kv_len - q_len - window + 1)


def _attend_one(q, k, v, scale, window, mask_cache=None, softcap=None, sinks=None):
    """Dense causal attention of one sequence: ``q [q_len, H, d]``, ``k, v [kv_len, KVH, d]``."""
    q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[0], k.shape[1]
    start = _window_start(q_len, kv_len, window)
    if start:
        k, v = k[start:], v[start:]
    kt = k.transpose(0, 1)[None]  # [1, KVH, L, d]
    vt = v.transpose(0, 1)[None]
    if q_len == 1:
        # Every remaining key is visible; fold the query heads sharing a KV head
        # into the query axis: [1, KVH, group, d], no mask, no key repetition.
        out = _sdpa(q.view(1, kv_heads, heads // kv_heads, d), kt, vt, scale, softcap=softcap, sinks=sinks)
        return out.reshape(1, heads, d)
    qt = q.transpose(0, 1)[None]  # [1, H, q_len, d]
    if q_len == kv_len and start == 0 and (window is None or window >= kv_len):
        out = _sdpa(qt, kt, vt, scale, causal=True, softcap=softcap, sinks=sinks)
    else:
        mask = None if mask_cache is None else mask_cache.get(window)
        if mask is None:
            mask = _end_aligned_mask(q_len, kv_len, window, start)
            if mask_cache is not None:
                mask_cache[window] = mask
        out = _sdpa(qt, kt, vt, scale, mask=mask, softcap=softcap, sinks=sinks)
    return out[0].transpose(0, 1)  # [q_len, H, d]


@hookimpl
def attention(q, k, v, scale, sliding_window, softcap=None, sinks=None, alibi_slopes=None):
    if alibi_slopes is not None:  # BLOOM's, MPT's: neither caps nor sinks
        return alibi.attend(_FRAMEWORK, q, k, v, scale, sliding_window, alibi_slopes, _WRITTEN_QUERIES)
    return _attend_one(q, k, v, scale, sliding_window, softcap=softcap, sinks=sinks)


class _Group:
    """Items attended together by one SDPA call, with their device indices."""

    __slots__ = ("n", "blocks", "block_index", "seq_lens", "q_rows", "max_q", "qpos", "q_valid", "masks")

    def __init__(self, n: int, blocks: int, max_q: int):
        self.n, self.blocks, self.max_q = n, blocks, max_q
        self.block_index = self.seq_lens = self.q_rows = self.qpos = self.q_valid = None
        self.masks: dict[int | None, torch.Tensor] = {}


class _Varlen:
    """Items attended by one variable-length flash call: their query rows, the prefix sums of
    their query and key lengths (int32, as the kernel takes them) and their keys' pool slots."""

    __slots__ = ("q_rows", "cu_q", "cu_k", "kv_slots", "max_q", "max_k")

    def __init__(self, max_q: int, max_k: int):
        self.max_q, self.max_k = max_q, max_k
        self.q_rows = self.cu_q = self.cu_k = self.kv_slots = None


class PreparedBatch:
    """Device-side metadata of one forward pass (see the module docs)."""

    __slots__ = ("kind", "block_size", "single", "alone", "decode", "prefill", "varlen", "out_index", "num_tokens",
                 "without_flash")

    def __init__(self, kind: str, block_size: int, num_tokens: int):
        self.kind = kind  # "single" | "groups"
        self.block_size = block_size
        self.num_tokens = num_tokens
        # (first token slot or None, block index or None, kv length, masks by window)
        self.single: tuple | None = None
        self.alone: list[tuple] = []  # per long prefill item: (first token, last + 1, *its ``single`` tuple)
        self.decode: _Group | None = None
        self.prefill: _Group | None = None
        self.varlen: _Varlen | None = None
        self.out_index: torch.Tensor | None = None
        self.without_flash: PreparedBatch | None = None  # for a call the flash kernel cannot take


def _item_kv(ids: np.ndarray, bs: int, length: int, packer: "_Packer") -> tuple:
    """An item's ``(first slot or None, packed block index or None, length, masks)``: its blocks, when
    consecutive, are a zero-copy slice of the pool; otherwise they are gathered by a packed index."""
    if len(ids) == 0 or np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        return (int(ids[0]) * bs if len(ids) else 0, None, length, {})
    return (None, packer.add(ids), length, {})


class _Packer:
    """Collects host int arrays and uploads them as one buffer."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.shapes: list[tuple[int, ...]] = []

    def add(self, array: np.ndarray) -> int:
        array = np.asarray(array, dtype=np.int64)
        self.parts.append(array.reshape(-1))
        self.shapes.append(array.shape)
        return len(self.parts) - 1

    def upload(self) -> list[torch.Tensor]:
        if not self.parts:
            return []
        flat = _upload(np.concatenate(self.parts), None, alias_ok=True)
        out, offset = [], 0
        for part, shape in zip(self.parts, self.shapes):
            out.append(flat[offset : offset + part.size].view(shape))
            offset += part.size
        return out


def _prepare(batch, flash: bool | None = None) -> PreparedBatch:
    cu = np.asarray(batch.cu_seqlens_q, dtype=np.int64)
    seq_lens = np.asarray(batch.seq_lens, dtype=np.int64)
    tables = np.asarray(batch.block_tables, dtype=np.int64)
    bs = int(batch.block_size)
    n_items = len(seq_lens)
    q_lens = np.diff(cu)
    n_blocks = -(-seq_lens // bs)
    num_tokens = int(cu[-1])
    packer = _Packer()
    flash = _flash_varlen_available() if flash is None else flash

    # A lone item attends in one SDPA call (over a slice of the pool where its blocks are consecutive), unless
    # its queries follow keys already cached (a prefix-cache hit, a later chunk, verification): SDPA needs a
    # mask there, and on CUDA repeats the keys of a GQA model; the flash kernel takes it as it is.
    if n_items == 1 and not (flash and 1 < q_lens[0] < seq_lens[0]):
        prepared = PreparedBatch("single", bs, num_tokens)
        first, index, length, masks = _item_kv(tables[0, : int(n_blocks[0])], bs, int(seq_lens[0]), packer)
        tensors = packer.upload()
        prepared.single = (first, None if index is None else tensors[index], length, masks)
        return prepared

    decode_items, none = np.flatnonzero(q_lens == 1), np.empty(0, dtype=np.int64)
    if flash:  # every item of several query tokens in one call
        varlen_items, alone_items, prefill_items = np.flatnonzero(q_lens != 1), none, none
    else:
        alone = batch.alone()
        varlen_items, alone_items, prefill_items = none, np.flatnonzero(alone), np.flatnonzero((q_lens != 1) & ~alone)
    calls = len(alone_items) + bool(len(decode_items)) + bool(len(prefill_items)) + bool(len(varlen_items))
    prepared = PreparedBatch("groups", bs, num_tokens)
    slots: dict[str, int] = {}
    alone_kv = [_item_kv(tables[i, : int(n_blocks[i])], bs, int(seq_lens[i]), packer) for i in alone_items]

    if len(decode_items):
        items = decode_items
        nb = int(n_blocks[items].max())
        prepared.decode = _Group(len(items), nb, 1)
        slots["d_blocks"] = packer.add(tables[items, :nb])
        slots["d_lens"] = packer.add(seq_lens[items])
        if calls > 1:
            slots["d_rows"] = packer.add(cu[items])

    if len(varlen_items):
        items = varlen_items
        vq, vk = q_lens[items], seq_lens[items]
        cu_q, cu_k = np.concatenate([[0], np.cumsum(vq)]), np.concatenate([[0], np.cumsum(vk)])
        prepared.varlen = _Varlen(int(vq.max()), int(vk.max()))
        varlen_rows = np.repeat(cu[items] - cu_q[:-1], vq) + np.arange(cu_q[-1])
        pos = np.arange(cu_k[-1]) - np.repeat(cu_k[:-1], vk)  # each key's position in its item
        owner = np.repeat(items, vk)
        slots["v_cu_q"], slots["v_cu_k"] = packer.add(cu_q), packer.add(cu_k)
        slots["v_kv"] = packer.add(tables[owner, pos // bs] * bs + pos % bs)
        if calls > 1:
            slots["v_rows"] = packer.add(varlen_rows)

    padded = False
    if len(prefill_items):
        items = prefill_items
        nb = int(n_blocks[items].max())
        max_q = int(q_lens[items].max())
        prepared.prefill = _Group(len(items), nb, max_q)
        local = np.arange(max_q)[None, :]
        valid = local < q_lens[items][:, None]  # [n, max_q]
        rows = cu[items][:, None] + local  # token row of each padded query slot
        padded = not bool(valid.all())
        if padded or calls > 1:
            slots["p_rows"] = packer.add(np.where(valid, rows, 0))
        slots["p_blocks"] = packer.add(tables[items, :nb])
        slots["p_qpos"] = packer.add((seq_lens[items] - q_lens[items])[:, None] + local)
        if padded:
            slots["p_valid"] = packer.add(valid)

    if calls > 1 or padded:
        # Token t's row in cat([each alone item's outputs, decode outputs, padded prefill outputs]).
        where = np.empty(num_tokens, dtype=np.int64)
        row = 0
        for i in alone_items:
            where[cu[i] : cu[i + 1]] = row + np.arange(q_lens[i])
            row += int(q_lens[i])
        where[cu[decode_items]] = row + np.arange(len(decode_items))
        if len(varlen_items):
            where[varlen_rows] = row + len(decode_items) + np.arange(len(varlen_rows))
        if len(prefill_items):
            where[rows[valid]] = row + len(decode_items) + np.flatnonzero(valid.reshape(-1))
        slots["out"] = packer.add(where)

    tensors = packer.upload()
    get = lambda key: tensors[slots[key]] if key in slots else None  # noqa: E731
    for i, (first, index, length, masks) in zip(alone_items, alone_kv):
        prepared.alone.append((int(cu[i]), int(cu[i + 1]), first, None if index is None else tensors[index],
                               length, masks))
    if prepared.decode is not None:
        g = prepared.decode
        g.block_index, g.seq_lens, g.q_rows = get("d_blocks"), get("d_lens"), get("d_rows")
    if prepared.varlen is not None:
        g = prepared.varlen
        g.q_rows, g.kv_slots = get("v_rows"), get("v_kv")
        g.cu_q, g.cu_k = get("v_cu_q").to(torch.int32), get("v_cu_k").to(torch.int32)
    if prepared.prefill is not None:
        g = prepared.prefill
        g.block_index, g.q_rows, g.qpos = get("p_blocks"), get("p_rows"), get("p_qpos")
        valid = get("p_valid")
        g.q_valid = None if valid is None else valid.bool()
    prepared.out_index = get("out")
    return prepared


@hookimpl
def prepare_attention_batch(batch):
    # A batch of decode steps is attended over the mirrors (``_mirrored_decode``); should the
    # book refuse it a plan, ``paged_attention`` prepares it on first use.
    return None if batch.num_items and len(batch.decoding) == batch.num_items else _prepare(batch)


def _gather_kv(pool: KVPool, layer: int, group: _Group):
    """``[n, KVH, blocks * block_size, d]`` keys and values of a group's items."""
    n, length = group.n, group.blocks * pool.block_size
    kvh, d = pool.num_kv_heads, pool.head_dim
    index = group.block_index.view(-1)
    k = pool.k[layer].index_select(0, index).view(n, length, kvh, d).transpose(1, 2)
    v = pool.v[layer].index_select(0, index).view(n, length, kvh, d).transpose(1, 2)
    return k, v


def _decode_group(q, pool, layer, group: _Group, scale, window, softcap=None, sinks=None):
    """``q [n, H, d]`` one token per item -> ``[n, H, d]``."""
    n, heads, d = q.shape
    kvh = pool.num_kv_heads
    k, v = _gather_kv(pool, layer, group)
    mask = group.masks.get(window)
    if mask is None:
        kpos = torch.arange(k.shape[2], device=DEVICE)[None, :]
        lens = group.seq_lens[:, None]
        mask = kpos < lens
        if window is not None:
            mask &= kpos >= lens - window
        mask = group.masks[window] = mask[:, None, None, :]  # [n, 1, 1, L]
    out = _sdpa(q.view(n, kvh, heads // kvh, d), k, v, scale, mask=mask, softcap=softcap, sinks=sinks)
    return out.reshape(n, heads, d)


def _prefill_group(q, pool, layer, group: _Group, scale, window, softcap=None, sinks=None):
    """Padded ``q [n * max_q, H, d]`` -> ``[n * max_q, H, d]`` (padding rows are junk)."""
    n, max_q = group.n, group.max_q
    heads, d = q.shape[1], q.shape[2]
    k, v = _gather_kv(pool, layer, group)
    mask = group.masks.get(window)
    if mask is None:
        kpos = torch.arange(k.shape[2], device=DEVICE)[None, None, :]
        qpos = group.qpos[:, :, None]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        if group.q_valid is not None:  # padding rows see everything: no NaN rows
            mask |= ~group.q_valid[:, :, None]
        mask = group.masks[window] = mask[:, None]  # [n, 1, max_q, L]
    qt = q.view(n, max_q, heads, d).transpose(1, 2)
    out = _sdpa(qt, k, v, scale, mask=mask, softcap=softcap, sinks=sinks)  # [n, H, max_q, d]
    return out.transpose(1, 2).reshape(n * max_q, heads, d)


def _flash_takes(q: torch.Tensor, pool: KVPool, softcap, sinks) -> bool:
    """What FlashAttention 2 computes: half precision, head size a multiple of 8 up to 256, no soft cap (sinks
    are laid on afterwards, see :func:`_flash_varlen`)."""
    d = q.shape[-1]
    return softcap is None and q.dtype in (torch.float16, torch.bfloat16) \
        and pool.dtype == q.dtype and d % 8 == 0 and d <= 256


def _flash_kernel(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, window: int | None):
    """FlashAttention 2 over packed items: ``q [tokens, H, d]``, ``k, v [keys, KVH, d]``, item ``i`` the rows
    ``cu[i]:cu[i + 1]`` of each. Causal, or a band of ``window`` keys, aligned to each item's last key (a
    later chunk's queries sit at the end of its keys). Returns the output and ``lse [H, tokens]`` (float32),
    the log-sum-exp of each row's scores."""
    left = -1 if window is None else window - 1
    return tuple(torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, window is None, False,
        scale=scale, window_size_left=left, window_size_right=0,
    )[:2])


def _flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, window: int | None, sinks=None):
    """:func:`_flash_kernel`'s output. ``sinks`` (gpt-oss: a logit per head that joins each row's softmax
    without a value) scale each row by ``sigmoid(lse - sink)``, the share of the softmax its keys keep."""
    out, lse = _flash_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, window)
    if sinks is None:
        return out
    kept = torch.sigmoid(lse.float().transpose(0, 1) - sinks.float())  # [tokens, H]
    return (out.float() * kept[..., None]).to(out.dtype)


def _varlen_attention(q, pool: KVPool, layer: int, group: _Varlen, scale, window, sinks=None):
    """``q [tokens, H, d]`` of the group's items -> ``[tokens, H, d]``, keys gathered from the pool by slot."""
    k = pool.k_flat[layer].index_select(0, group.kv_slots)
    v = pool.v_flat[layer].index_select(0, group.kv_slots)
    return _flash_varlen(q.contiguous(), k, v, group.cu_q, group.cu_k, group.max_q, group.max_k, scale, window,
                         sinks)


def _arena_rows(pool: KVPool, layer: int, plan: MirrorPlan, sync: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's arena K and V ``[rows, KVH, capacity, d]``, brought up to date: only the positions written since
    the last step are copied from the pool (``ferrum.kv_mirror``)."""
    dev = plan.device
    if sync not in dev:
        packer = _Packer()
        for part in (plan.src, plan.dst_row, plan.dst_pos) if sync == "step" else plan.full():
            packer.add(part)
        if "rows" not in dev:
            packer.add(plan.rows)
        uploaded = packer.upload()
        dev[sync] = uploaded[:3]
        if "rows" not in dev:
            dev["rows"] = uploaded[3]
            dev["masks"] = {}
    arena = pool.arena
    arena.fit(pool, *plan.arena_shape)
    src, dst_row, dst_pos = dev[sync]
    k_rows, v_rows = arena.k[layer], arena.v[layer]
    if src.numel():
        k_rows[dst_row, :, dst_pos] = pool.k_flat[layer].index_select(0, src)
        v_rows[dst_row, :, dst_pos] = pool.v_flat[layer].index_select(0, src)
    return k_rows, v_rows


def _mirrored_decode(q, pool: KVPool, layer: int, plan: MirrorPlan, sync: str, scale, window, softcap=None,
                     sinks=None):
    """Decode items attended over their arena rows (:func:`_arena_rows`)."""
    dev = plan.device
    k_rows, v_rows = _arena_rows(pool, layer, plan, sync)
    n, heads, d = q.shape
    kvh = pool.num_kv_heads
    qg = q.view(n, kvh, heads // kvh, d)
    if n == 1:  # one row: a slice of it, no mask
        row, start, end = int(plan.rows[0]), int(plan.first_keys(window)[0]), int(plan.lengths[0])
        k, v = k_rows[row : row + 1, :, start:end], v_rows[row : row + 1, :, start:end]
        return _sdpa(qg, k, v, scale, softcap=softcap, sinks=sinks).reshape(1, heads, d)
    rows = dev["rows"]
    fused = softcap is None and sinks is None  # SDPA itself, not the written-out path
    key = (window, fused)
    masks = dev["masks"].get(key)
    if masks is None:  # over the columns [offset, capacity) (a chunked view's or a window's items see no others)
        offset, first, end = plan.row_spans(window)
        first, end = _upload(np.stack([first, end])[:, :, None], None, alias_ok=True)  # [rows, 1] each
        kpos = torch.arange(offset, plan.capacity, device=DEVICE)[None, :]
        allowed = ((kpos >= first) & (kpos < end))[:, None, None, :]
        # Additive where SDPA takes it: the CPU kernel runs ~1.5x faster than with a boolean mask
        # (torch 2.13, 8 rows x 576 keys); the written-out path masks its scores itself.
        if fused:
            allowed = torch.zeros(allowed.shape, dtype=q.dtype, device=DEVICE).masked_fill_(~allowed, float("-inf"))
        masks = dev["masks"][key] = (offset, allowed)  # [rows, 1, 1, L]
    offset, mask = masks
    k = k_rows[: plan.num_rows, :, offset : plan.capacity]
    v = v_rows[: plan.num_rows, :, offset : plan.capacity]
    if plan.in_order:
        return _sdpa(qg, k, v, scale, mask=mask, softcap=softcap, sinks=sinks).reshape(n, heads, d)
    q_rows = qg.new_zeros((plan.num_rows, kvh, heads // kvh, d)).index_copy_(0, rows, qg)
    out = _sdpa(q_rows, k, v, scale, mask=mask, softcap=softcap, sinks=sinks)
    return out.index_select(0, rows).reshape(n, heads, d)


@hookimpl
def paged_attention(q, pool, layer, batch, scale, sliding_window, softcap=None, sinks=None, alibi_slopes=None):
    plan, sync = pool.mirrors.begin(batch, layer, pool.writes[layer])
    if alibi_slopes is not None:  # BLOOM's, MPT's: their biases written out, over the mirrors or gathered keys
        rows = None if plan is None else _arena_rows(pool, layer, plan, sync)
        return alibi.paged_attend(_FRAMEWORK, q, pool.k_flat[layer], pool.v_flat[layer], batch, scale,
                                  sliding_window, alibi_slopes, _WRITTEN_QUERIES, plan, rows)
    features = (softcap, sinks)
    if plan is not None and plan.whole:
        return _mirrored_decode(q, pool, layer, plan, sync, scale, sliding_window, *features)
    prepared = batch.prepared
    if not isinstance(prepared, PreparedBatch):
        prepared = batch.prepared = _prepare(batch)
    window = sliding_window
    if prepared.varlen is not None and not _flash_takes(q, pool, *features):
        if prepared.without_flash is None:
            prepared.without_flash = _prepare(batch, flash=False)
        prepared = prepared.without_flash
    if prepared.kind == "single":
        first, index, length, masks = prepared.single
        if index is None and q.shape[0] == 1:  # decode step over consecutive blocks: no mask
            end = first + length
            start = first if window is None else max(first, end - window)
            q_len, heads, d = q.shape
            kvh = pool.num_kv_heads
            out = _sdpa(
                q.view(1, kvh, heads // kvh, d),
                pool.k_heads[layer][:, :, start:end],
                pool.v_heads[layer][:, :, start:end],
                scale,
                softcap=softcap,
                sinks=sinks,
            )
            return out.reshape(1, heads, d)
        return _attend_one(q, *_single_kv(pool, layer, first, index, length), scale, window, masks, *features)
    parts = [_attend_one(q[start:end], *_single_kv(pool, layer, first, index, length), scale, window, masks,
                         *features)
             for start, end, first, index, length, masks in prepared.alone]
    if prepared.decode is not None:  # the items decoding one token: over the mirrors where the book planned them
        group = prepared.decode
        q_in = q if group.q_rows is None else q.index_select(0, group.q_rows)
        parts.append(_decode_group(q_in, pool, layer, group, scale, window, *features) if plan is None else
                     _mirrored_decode(q_in, pool, layer, plan, sync, scale, window, *features))
    if prepared.varlen is not None:
        group = prepared.varlen
        q_in = q if group.q_rows is None else q.index_select(0, group.q_rows)
        parts.append(_varlen_attention(q_in, pool, layer, group, scale, window, sinks))
    if prepared.prefill is not None:
        group = prepared.prefill
        q_in = q if group.q_rows is None else q.index_select(0, group.q_rows.view(-1))
        parts.append(_prefill_group(q_in, pool, layer, group, scale, window, *features))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out if prepared.out_index is None else out.index_select(0, prepared.out_index)


def _single_kv(pool: KVPool, layer: int, first: int | None, index: torch.Tensor | None, length: int):
    """One item's ``(k, v)``, each ``[length, KVH, d]``: a view of the pool, or gathered by block."""
    if index is None:
        return pool.k_flat[layer][first : first + length], pool.v_flat[layer][first : first + length]
    kvh, d = pool.num_kv_heads, pool.head_dim
    k = pool.k[layer].index_select(0, index).view(-1, kvh, d)[:length]
    v = pool.v[layer].index_select(0, index).view(-1, kvh, d)[:length]
    return k, v


# --------------------------------------------------------------------------
# Multi-LoRA
# --------------------------------------------------------------------------


#: Up to this many tokens (decode-sized passes), every token is multiplied by every slot's factors at once
#: and a mask selects its own slot's rank block: two plain GEMMs over ``[S * r]`` columns, each factor
#: read once, no gather or scatter. Above, one GEMM pair per adapter segment (punica's SGMV).
_DENSE_TOKENS = 64


def _slot_mask(batch, slots: int, rank: int) -> torch.Tensor:
    """``[T, slots * rank]``: True in the rank block of each token's slot (none for tokens without one)."""
    key = ("torch-mask", slots, rank)
    mask = batch.prepared.get(key)
    if mask is None:
        one_hot = batch.token_slots[:, None] == np.arange(slots)[None, :]
        mask = batch.prepared[key] = _small(np.repeat(one_hot, rank, axis=1))
    return mask


@hookimpl
def lora_apply(y, x, a, b, batch):
    """Adds into ``y`` in place. Segment bounds come from the host, so nothing here waits for the device."""
    s, r, n_in = a.shape
    if len(batch.segments) == 1 and len(batch.order) == y.shape[0]:  # one adapter for every row
        slot = batch.segments[0][0]
        return y.add_(F.linear(x, a[slot]) @ b[slot])
    if y.shape[0] <= _DENSE_TOKENS:
        # selected, not multiplied by a 0/1 mask: one row's overflow (inf) in its slot's columns would be NaN
        # (inf * 0) in every other row
        shrunk = torch.where(_slot_mask(batch, s, r), F.linear(x, a.reshape(s * r, n_in)), 0)
        return y.add_(shrunk @ b.reshape(s * r, -1))
    rows = batch.prepared.get("torch")
    if rows is None:
        rows = batch.prepared["torch"] = _small(batch.order).long()
    for slot, start, count in batch.segments:
        seg = rows[start : start + count]
        y.index_add_(0, seg, F.linear(x.index_select(0, seg), a[slot]) @ b[slot])
    return y


# --------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------


@hookimpl
def moe_route(logits, shared_logit, top_k, normalize, routing=None):
    # torch.topk itself, so ties break exactly as in transformers on the same device. ``routing`` has a
    # default: direct callers written before API 1.12 pass four arguments and mean softmax routing.
    if routing is not None:
        return _route_grouped(logits, top_k, normalize, routing)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if shared_logit is not None:
        weights = torch.cat([weights, torch.sigmoid(shared_logit.float())], dim=-1)
    return ids.to(torch.int32), weights


def _route_grouped(logits, top_k, normalize, routing):
    """Grouped routing (``ferrum.moe.routing.route_grouped``, its ``routing.rule``: DeepSeek-V3's and V2's) as
    transformers' ``DeepseekV3TopkRouter`` and ``DeepseekV2TopkRouter`` write it, in float32 on the device: no
    host copy, so CUDA graphs capture it."""
    rule = routing.rule
    scores = torch.softmax(logits.float(), dim=-1) if rule.scoring == "softmax" else torch.sigmoid(logits.float())
    basis = logits.float() if rule.choice == "logits" else scores  # Kolibri-1 chooses on the logits (API 1.23)
    choice = basis + routing.bias if rule.corrected else basis
    if routing.n_group > 1:
        tokens, experts = choice.shape
        grouped = choice.view(tokens, routing.n_group, experts // routing.n_group)  # tokens may be 0
        group_scores = (grouped.amax(dim=-1) if rule.group_score == "max" else
                        grouped.topk(2, dim=-1).values.sum(dim=-1))
        kept = torch.zeros_like(group_scores, dtype=torch.bool)
        kept.scatter_(1, torch.topk(group_scores, routing.topk_group, dim=-1).indices, True)
        kept = kept.repeat_interleave(experts // routing.n_group, dim=1)
        choice = choice.masked_fill(~kept, rule.masked)
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if routing.n_group > 1 and not rule.dropped_weighed:  # a dropped expert picked by its masked 0 weighs 0 (1.28)
        weights = weights.masked_fill(~kept.gather(1, ids), 0.0)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routing.scale
    if rule.expert_scaled:  # Gemma 4: each chosen expert's own scale (API 1.16)
        weights = weights * routing.expert_scale[ids]
    return ids.to(torch.int32), weights


class ExpertStack:
    """One stacked projection: a float ``[E, out, in]`` tensor, or one packed matrix per expert."""

    __slots__ = ("w", "quantized")

    def __init__(self, w, quantized: bool):
        self.w, self.quantized = w, quantized

    def __len__(self) -> int:
        return len(self.w)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.w) if self.quantized else self.w.numel() * self.w.element_size()

    def __call__(self, e: int, x, biases=None):
        """Expert ``e``'s projection of ``x``, plus row ``e`` of ``biases [E, out]`` when given."""
        bias = None if biases is None else biases[e]
        return quant.linear(x, self.w[e], bias) if self.quantized else F.linear(x, self.w[e], bias)


@hookimpl
def upload_experts(name, weight, dtype):
    if isinstance(weight, np.ndarray):
        return ExpertStack(upload_weight(name, weight, dtype), quantized=False)
    return ExpertStack([quantized_upload(f"{name}.{e}", weight.expert(e), dtype, "linear")
                        for e in range(weight.num_experts)], quantized=True)


def _clamped_swiglu(activation, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gpt-oss's, Hy4's and Step 3.5's :class:`ferrum.moe.activation.ClampedSwiGLU` (the gate or, API 1.29, the swish
    clamped), in float32 as its host reference."""
    g = gate.float()
    g = g.clamp(max=activation.limit) if activation.clamp == "gate" else g
    swish = g * torch.sigmoid(activation.alpha * g)
    swish = swish.clamp(max=activation.limit) if activation.clamp == "swish" else swish
    u = up.float().clamp(-activation.limit, activation.limit)
    return ((u + activation.up_offset) * swish).to(gate.dtype)


def _situ(activation, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Kimi K3's :class:`ferrum.moe.activation.Situ` (API 1.33): ``softcap(u, linear_beta) * softcap(g, beta) *
    sigmoid(g)``, in float32 as its host reference."""
    g, u = gate.float(), up.float()
    a = activation.beta * torch.tanh(g / activation.beta) * torch.sigmoid(g)
    if activation.linear_beta is not None:
        u = activation.linear_beta * torch.tanh(u / activation.linear_beta)
    return (a * u).to(gate.dtype)


#: The experts' activations (``activation.op``) this backend runs with its own op: Gemma 4's GeGLU (API 1.16), and
#: Nemotron 3 Nano's ungated squared ReLU (API 1.18) and Phixtral's ungated GELU (API 1.32), which read the up
#: projection alone.
_EXPERT_ACTIVATIONS = {"gelu_tanh_mul": _gelu_tanh_mul, "relu_squared": relu_squared}


def _expert_activation(activation):
    """The function of ``activation`` (an expert activation record): its op, the GELU of its form, SiTU, else the
    clamped SwiGLU."""
    if isinstance(activation, Situ):
        return functools.partial(_situ, activation)
    if activation.op == "gelu":
        return functools.partial(gelu, tanh=activation.tanh)
    return _EXPERT_ACTIVATIONS.get(activation.op) or functools.partial(_clamped_swiglu, activation)


def _ungated(act, gate, up: torch.Tensor) -> torch.Tensor:
    """An ungated expert's activation (``gate`` None): of the up projection alone."""
    return act(up)


@functools.lru_cache(maxsize=None)
def _grouped_gemm_runs(dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` (a private op: one GEMM per run of rows, the runs' ends on the device)
    runs here in ``dtype``; asked once, with a tiny product, on first use."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        rows = torch.ones((2, 16), dtype=dtype, device=DEVICE)
        stack = torch.ones((2, 16, 16), dtype=dtype, device=DEVICE)
        ends = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)
        return bool((torch._grouped_mm(rows, stack.transpose(1, 2), offs=ends) == 16).all())
    except (RuntimeError, NotImplementedError):
        return False


def _aligned(weights, dtype: torch.dtype) -> bool:
    """Whether the grouped GEMM takes these ``[E, out, in]`` weights: its operands' rows must span a multiple of
    16 bytes (an expert 37 wide is not; real checkpoints' are)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return all(size * itemsize % 16 == 0 for size in weights.shape[1:])


def _grouped(stack: ExpertStack, rows, ends, expert_of_row, biases):
    """Each expert's projection of its run of ``rows`` (sorted by expert; run ``e`` ends at ``ends[e]``)."""
    y = torch._grouped_mm(rows, stack.w.transpose(1, 2), offs=ends)
    return y if biases is None else y + biases.index_select(0, expert_of_row)


@hookimpl
def moe_experts(x, expert_ids, expert_weights, gate, up, down, shared, biases=None, activation=None):
    """Pairs (token, expert) sorted by expert; ``biases`` (gpt-oss) join each projection, ``activation``
    replaces ``silu(g) * u`` (an ungated one, ``gate`` None, reads ``u`` alone).

    Float stacks go through one grouped GEMM per projection, the runs' ends computed on the device: no
    sync, so a decode step's block stays inside its CUDA graph. Where any stack is packed (a checkpoint may
    pack some and not others), or torch lacks the grouped GEMM, each used expert takes its own GEMMs, whose
    segment sizes cross to the host once per call.
    """
    gate_b, up_b, down_b = (None, None, None) if biases is None else biases
    act = _silu_mul if activation is None else _expert_activation(activation)
    if gate is None:  # ungated experts: the activation of the up projection alone
        act = functools.partial(_ungated, act)
    tokens, top_k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    rows = x.index_select(0, order // top_k)
    y = torch.empty((tokens * top_k, x.shape[1]), dtype=x.dtype, device=x.device)
    stacks = [stack for stack in (gate, up, down) if stack is not None]
    if not any(stack.quantized for stack in stacks) and _grouped_gemm_runs(x.dtype) and all(
            _aligned(stack.w, x.dtype) for stack in stacks):
        expert_of_row = flat.index_select(0, order)
        experts = torch.arange(len(up), device=x.device)
        ends = torch.searchsorted(expert_of_row, experts, right=True).to(torch.int32)
        gated = None if gate is None else _grouped(gate, rows, ends, expert_of_row, gate_b)
        hidden = act(gated, _grouped(up, rows, ends, expert_of_row, up_b))
        y.index_copy_(0, order, _grouped(down, hidden, ends, expert_of_row, down_b))
    else:
        start = 0
        for e, n in enumerate(torch.bincount(flat, minlength=len(up)).tolist()):
            if n:
                seg = rows[start : start + n]
                hidden = act(None if gate is None else gate(e, seg, gate_b), up(e, seg, up_b))
                y[order[start : start + n]] = down(e, hidden, down_b)
                start += n
    out = (y.view(tokens, top_k, -1).float() * expert_weights[:, :top_k, None]).sum(dim=1)
    if shared is not None:
        out += expert_weights[:, top_k:] * shared.float()
    return out.to(x.dtype)


__all__ = ["DEVICE", "DEVICE_NOTE", "KVPool", "PreparedBatch"]
