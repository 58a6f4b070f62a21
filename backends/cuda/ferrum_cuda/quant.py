"""Packed affine weights (:mod:`ferrum.quant.affine`) on the torch backend, kept packed on the device.

Two device forms, built by :func:`upload` from the MLX packed form:

* **row form**: the MLX bit stream as bytes, ``uint8 [N, K * bits / 8]``, with
  the scales and biases as stored (``[N, K / group_size]``). Any set of rows
  can be gathered and dequantized with torch integer ops.
* **int4pack form**: torch's weight-only int4 kernels
  (``_convert_weight_to_int4pack[_for_cpu]`` + ``_weight_int4pack_mm[_for_cpu]``,
  pytorch's "tinygemm"), which compute ``w = (q - 8) * scale + zero`` with
  bfloat16 ``x``, scales and zeros. An MLX group ``w = s * q + b`` is that with
  ``scale = s`` and ``q`` shifted so that ``zero`` is near the group's midpoint:
  ``q' = q + 8 - 2**(bits-1)``, ``zero = b + 2**(bits-1) * s``. (The plain
  ``zero = b + 8s`` is far from the weights at 2 bits, and its bfloat16
  rounding, shared by the whole group, then dominates the error.) Rows are
  padded to a multiple of 16 (the kernels' requirement) and the output sliced.

Which path :func:`linear` takes
-------------------------------
==================  ============  ===========  ==================================================
compute dtype       bits          group size   path
==================  ============  ===========  ==================================================
bfloat16            2, 3, 4       32, 64, 128  int4pack, one plane: ``q < 16`` is an int4 directly
bfloat16            5, 6, 8       32, 64, 128  int4pack, two planes: ``q = 16 hi + lo`` gives
                                               ``w = 16s * hi + (s * lo + b)``, two int4 affine
                                               forms on the same groups, concatenated along K
                                               (``x`` duplicated: ``[x, x]``) so one call sums them;
                                               the hi plane's zero is 0 and the lo plane's carries
                                               the whole offset, again near the midpoint
float32, float16    any           any          dequantize, then the dense ``F.linear``
any                 any           16           dequantize
==================  ============  ===========  ==================================================

Why: the int4 kernels are only vectorized for bfloat16 (on x86 their float32 and
float16 paths are scalar loops, 60-100x slower) and round scales and zeros to
bfloat16, so a float32 user would get neither speed nor float32 accuracy from
them. They take group sizes 32-256 only; 16 exists for GGUF's Q6_K sub-blocks.
A shape a kernel refuses (CUDA needs the packed K to be a multiple of 32) also
takes the dequantize path.

The dequantize path unpacks one matrix at a time with torch ops on the device
into a buffer shared by every matrix of the same shape (row chunks bound the
temporaries), then runs the dense GEMM. In float32 it is bit-exact against
:func:`ferrum.quant.affine.dequantize` (the same float32 multiply, then add);
in bfloat16 and float16 the float32 result is rounded once, as the core's
reference does. The buffers make the path single-threaded per backend, as the
core's reference is.

Speed (torch 2.13 CPU, one thread, SmolLM2-135M shapes): int4pack beats dense
bfloat16 about 2x for one row (decode; two planes about match it), but the CPU
kernel is a GEMV whose cost grows with the rows. So from ``_DENSE_ROWS`` rows
(prefill chunks) a bfloat16 matmul reads the int4pack weight back into a
reused bfloat16 buffer, transposed, and runs the dense GEMM: 1.6-3.6x faster
at 300 rows. Reading the int4pack layout relies on its CPU form (blocks of 64
rows, see :func:`_int4_blocks`), which :func:`int4_layout_readable` checks on
each device first; elsewhere the int4 kernel runs every size. The dequantize
path costs 0.1-3 ms per matrix, far more than the GEMM it feeds.

CUDA
----
The CUDA kernels (bfloat16, sm80+) cannot be tested on a machine without a GPU,
so :func:`int4_status` runs once per device: it builds a small random matrix
through the int4pack form in row chunks and compares a product with the
dequantize path. If anything raises or differs, bfloat16 weights take the
dequantize path for the session and the backend's ``note`` says why. The CPU
device runs the same check on its ``_for_cpu`` kernels; no CUDA-only op runs there.

Roles and memory
----------------
``"linear"`` keeps only the matmul form (int4pack, or the row form for the
dequantize path); ``"embedding"`` keeps the row form; ``"tied"`` (a tied
embedding and LM head) reads its lookups from the int4pack form where that
layout is readable, and otherwise keeps both forms: the row form for lookups
costs ``bits / 8`` bytes per weight (plus scales) on top of the int4pack
form's ``planes / 2``. :attr:`TorchQuantized.nbytes` reports the total.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ferrum.errors import BackendError
from ferrum.quant.affine import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

#: Every (bits, group size) of the packed form: the dequantize path covers them all.
FORMATS: tuple[tuple[int, int], ...] = tuple((b, g) for b in SUPPORTED_BITS for g in SUPPORTED_GROUP_SIZES)
#: Group sizes both the format and the int4pack kernels take.
INT4_GROUP_SIZES = (32, 64, 128)
ROLES = ("linear", "embedding", "tied")

#: int4pack kernels need N % 16 == 0.
_N_MULTIPLE = 16
#: Rows packed per int4pack conversion: a multiple of the kernels' row blocks
#: (64 on AVX-512, 32 on AVX2, 8 on CUDA), so chunks concatenate into the whole
#: (checked by :func:`int4_status`) and a large matrix's int32 temporaries stay small.
_PACK_ROWS = 4096
#: Elements dequantized at once, bounding the temporaries of the dequantize path.
_CHUNK_ELEMENTS = 1 << 20
#: From this many rows a bfloat16 matmul dequantizes the int4pack weight and runs the dense GEMM:
#: the CPU int4 kernels are GEMVs whose cost grows with the rows (about 16 us per row on a
#: 1536x576 matrix: 1 ms at 64 rows, 8 ms at 512), while dequantizing it takes about 1 ms
#: and a dense bfloat16 GEMM of 128 rows 0.4 ms.
_DENSE_ROWS = 96
#: Allowed scaled error of the int4 self-test: bfloat16 rounding gives ~5e-3, a layout mistake O(1).
_SELF_TEST_TOLERANCE = 2e-2


@dataclass(frozen=True, eq=False)
class RowForm:
    """The MLX stream as bytes, ``uint8 [N, K * bits / 8]``, and its scales and biases ``[N, K / gs]``."""

    data: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor


@dataclass(frozen=True, eq=False)
class Int4Form:
    """torch's int4pack weight and its bfloat16 ``scales_and_zeros [planes * K / gs, N_padded, 2]``."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    planes: int


@dataclass(frozen=True, eq=False)
class TorchQuantized:
    """A packed ``[N, K]`` matrix on the device: what ``quantized_upload`` returns."""

    shape: tuple[int, int]
    bits: int
    group_size: int
    dtype: torch.dtype
    int4: Int4Form | None
    rows: RowForm | None

    @property
    def path(self) -> str:
        """How :func:`linear` runs this weight: ``"int4pack"``, ``"int4pack x2"`` or ``"dequantize"``."""
        if self.int4 is None:
            return "dequantize"
        return "int4pack" if self.int4.planes == 1 else "int4pack x2"

    @property
    def nbytes(self) -> int:
        """Device bytes held, both forms counted."""
        tensors = []
        if self.int4 is not None:
            tensors += [self.int4.packed, self.int4.scales_and_zeros]
        if self.rows is not None:
            tensors += [self.rows.data, self.rows.scales, self.rows.biases]
        return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------ unpacking


def unpack(data: torch.Tensor, bits: int) -> torch.Tensor:
    """``q uint8 [R, K]`` from the stream bytes ``uint8 [R, K * bits / 8]``.

    The stream repeats every ``bits / gcd(bits, 8)`` bytes (1 for 2, 4, 8 bits;
    3 for 3 and 6; 5 for 5); value ``i`` of such a run starts at bit ``bits * i``.
    Each value position is read with scalar uint8 shifts (a value that
    straddles a byte ORs in the next byte's low bits) and the positions are
    interleaved by one ``stack``: broadcast shifts by a tensor of offsets, or
    widening runs to int32/int64 words, are several times slower in torch.
    """
    if bits == 8:
        return data
    rows = data.shape[0]
    unit = bits // math.gcd(bits, 8)
    runs = data.view(rows, -1, unit)
    mask = (1 << bits) - 1
    values = []
    for i in range(8 * unit // bits):
        byte, offset = divmod(bits * i, 8)
        v = runs[..., byte]
        if offset:
            v = v >> offset
        if offset + bits > 8:
            v = v | (runs[..., byte + 1] << (8 - offset))
        if offset + bits != 8:
            v = v & mask
        values.append(v)
    return torch.stack(values, -1).view(rows, -1)


def _dequantize_into(out: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                     bits: int, group_size: int) -> None:
    """``out [R, K]`` (float32) = ``scales * q + biases``, multiply then add, as the numpy reference."""
    out.copy_(unpack(data, bits))
    groups = out.view(out.shape[0], -1, group_size)
    groups.mul_(scales.float().unsqueeze(-1))
    groups.add_(biases.float().unsqueeze(-1))


_buffers: dict[tuple, torch.Tensor] = {}
_buffers_lock = threading.Lock()


def _buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One scratch matrix per (shape, dtype, device), reused by every weight of that shape."""
    key = (shape, dtype, device)
    with _buffers_lock:
        buf = _buffers.get(key)
        if buf is None:
            buf = _buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf


def dense(weight: TorchQuantized, dtype: torch.dtype) -> torch.Tensor:
    """The whole matrix in ``dtype``, in the shared buffer of its shape (valid until the next call)."""
    rows = weight.rows
    if rows is None:
        raise BackendError(
            f"this {weight.bits}-bit weight was uploaded for bfloat16 int4 kernels only; "
            f"it cannot run in {str(dtype).removeprefix('torch.')}"
        )
    n, k = weight.shape
    device = rows.data.device
    out = _buffer((n, k), dtype, device)
    step = max(1, _CHUNK_ELEMENTS // k)
    scratch = None if dtype == torch.float32 else _buffer((min(step, n), k), torch.float32, device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        target = out[start:stop] if scratch is None else scratch[: stop - start]
        _dequantize_into(target, rows.data[start:stop], rows.scales[start:stop], rows.biases[start:stop],
                         weight.bits, weight.group_size)
        if scratch is not None:
            out[start:stop].copy_(target)
    return out


# ------------------------------------------------------------------ int4pack


def _pack_int4(q: torch.Tensor) -> torch.Tensor | None:
    """torch's packed weight for ``q [N, K]`` (values 0..15, N % 16 == 0); ``None`` if the kernel cannot take K."""
    if q.device.type == "cuda":
        k = q.shape[1]
        tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
        if tiles is None:
            return None
        q = q.to(torch.uint8)
        # CUDA wants two values per byte, the first in the high nibble.
        return torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).contiguous(), tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)


def _int4_form(rows: RowForm, bits: int, group_size: int, pack_rows: int = _PACK_ROWS) -> Int4Form | None:
    """The int4pack form of a row form, converted ``pack_rows`` rows at a time; ``None`` if refused."""
    n = rows.data.shape[0]
    s, b = rows.scales.float(), rows.biases.float()
    half = 1 << (bits - 1)
    if bits <= 4:  # q' = q + 8 - half: w = s * (q' - 8) + (b + half * s)
        planes, shift, scale, zero = 1, 8 - half, s, b + half * s
    else:  # hi' = hi + shift: w = 16s * (hi' - 8) + s * (lo - 8) + (b + (half + 8) * s)
        planes, shift = 2, 8 - (half >> 4)
        scale, zero = torch.cat([16 * s, s], 1), torch.cat([torch.zeros_like(s), b + (half + 8) * s], 1)
    pad = -n % _N_MULTIPLE
    scales_and_zeros = F.pad(torch.stack([scale, zero], -1), (0, 0, 0, 0, 0, pad))  # padded rows: w = 0
    scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)
    chunks = []
    for start in range(0, n, pack_rows):
        q = unpack(rows.data[start : start + pack_rows], bits)
        q = q + shift if planes == 1 else torch.cat([(q >> 4) + shift, q & 15], 1)
        if start + pack_rows >= n and pad:
            q = F.pad(q, (0, 0, 0, pad))
        packed = _pack_int4(q)
        if packed is None:
            return None
        chunks.append(packed)
    return Int4Form(torch.cat(chunks) if len(chunks) > 1 else chunks[0], scales_and_zeros, planes)


def _int4_blocks(packed: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4pack weight seen as ``[N / 64, K, 32]`` bytes.

    With AVX-512 the weight is blocks of 64 output rows; each block holds, for
    each input k, 32 bytes whose low nibbles are rows 0-31 and high nibbles rows
    32-63. :func:`int4_layout_readable` checks this per device before anything
    relies on it.
    """
    return packed.view(packed.shape[0] // 64, packed.shape[1] * 2, 32)


def _int4_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The int4 values (``uint8 [len(rows), K]``) of some output rows."""
    picked = _int4_blocks(packed)[rows // 64, :, rows % 32]
    return torch.where((rows % 64 >= 32)[:, None], picked >> 4, picked & 15)


def _int4_columns(packed: torch.Tensor) -> torch.Tensor:
    """All int4 values transposed, ``uint8 [K, N]``: whole 64-row blocks move at once."""
    blocks = _int4_blocks(packed)
    nb, k, _ = blocks.shape
    out = torch.empty((k, nb, 64), dtype=torch.uint8, device=packed.device)
    out[..., :32] = (blocks & 15).transpose(0, 1)
    out[..., 32:] = (blocks >> 4).transpose(0, 1)
    return out.view(k, nb * 64)


@lru_cache(maxsize=None)
def int4_layout_readable(device: torch.device) -> bool:
    """Whether this device's int4pack layout is the one :func:`_int4_blocks` reads (checked on a random matrix)."""
    if device.type != "cpu":
        return False
    q = torch.randint(0, 16, (128, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    try:
        packed = _pack_int4(q)
        rows = torch.tensor([0, 33, 64, 127])
        return bool(torch.equal(_int4_columns(packed).int(), q.T) and torch.equal(_int4_rows(packed, rows).int(), q[rows]))
    except RuntimeError:  # another layout (e.g. AVX2's blocks): the views do not fit
        return False


def _readable(form: Int4Form) -> bool:
    return form.packed.shape[0] % 64 == 0 and int4_layout_readable(form.packed.device)


def _int4_embedding(weight: TorchQuantized, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the matrix from its int4pack form: ``(q - 8) * scale + zero``, planes summed, in float32."""
    form, k, gs = weight.int4, weight.shape[1], weight.group_size
    scales_and_zeros = form.scales_and_zeros[:, rows].float()  # [groups, len(rows), 2]
    w = _int4_rows(form.packed, rows).float().view(len(rows), -1, gs).sub_(8)
    w = w.mul_(scales_and_zeros[..., 0].T.unsqueeze(-1)).add_(scales_and_zeros[..., 1].T.unsqueeze(-1))
    w = w.view(len(rows), -1)
    return w if form.planes == 1 else w[:, :k] + w[:, k:]


def _int4_dense_t(weight: TorchQuantized) -> torch.Tensor:
    """The whole matrix transposed, ``[K, N_padded]`` bfloat16, in the shared buffer of its shape.

    Built in the int4pack layout's own order (inputs outermost), so ``x @ W.T``
    is a plain GEMM with it; evaluated in float32 and rounded once.
    """
    form, (_, k), gs = weight.int4, weight.shape, weight.group_size
    n_padded = form.packed.shape[0]
    scale, zero = form.scales_and_zeros[..., 0].float(), form.scales_and_zeros[..., 1].float()  # [groups, N]
    w = _int4_columns(form.packed).float().view(-1, gs, n_padded).sub_(8)
    w = w.mul_(scale[:, None]).add_(zero[:, None]).view(-1, n_padded)
    out = _buffer((k, n_padded), torch.bfloat16, form.packed.device)
    if form.planes == 1:
        return out.copy_(w)
    return torch.add(w[:k], w[k:], out=out)


def _int4_mm(x: torch.Tensor, form: Int4Form, group_size: int) -> torch.Tensor:
    """``x @ W_padded.T`` in bfloat16 through the int4pack kernel (both planes at once)."""
    x = x.contiguous()
    if form.planes == 2:
        x = torch.cat([x, x], 1)
    mm = torch.ops.aten._weight_int4pack_mm if x.device.type == "cuda" else torch.ops.aten._weight_int4pack_mm_for_cpu
    return mm(x, form.packed, group_size, form.scales_and_zeros)


@lru_cache(maxsize=None)
def int4_status(device: torch.device) -> tuple[bool, str]:
    """``(usable, note)``: whether torch's int4pack kernels match the dequantize path on ``device``.

    Run once per device, on random matrices with a padded tail, converted in
    several row chunks, at one and two planes and at packed widths that take
    each of CUDA's tile counts (K' = 288, 576, 512: 2, 4 and 8 tiles).
    """
    gen = torch.Generator().manual_seed(0)
    n, gs = 200, 32
    fallback = "bfloat16 quantized weights are dequantized instead"
    try:
        for bits, k in ((4, 288), (8, 288), (4, 512)):
            rows = RowForm(
                torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8, generator=gen).to(device),
                (torch.rand(n, k // gs, generator=gen) * 0.02 + 0.005).to(torch.bfloat16).to(device),
                (torch.rand(n, k // gs, generator=gen) - 0.5).to(torch.bfloat16).to(device),
            )
            form = _int4_form(rows, bits, gs, pack_rows=64)
            if form is None:
                return False, f"torch's int4 kernels refused a [{n}, {k}] test matrix on {device}; {fallback}"
            x = torch.randn(3, k, generator=gen).to(torch.bfloat16).to(device)
            got = _int4_mm(x, form, gs)[:, :n].float()
            ref = torch.empty(n, k, device=device)
            _dequantize_into(ref, rows.data, rows.scales, rows.biases, bits, gs)
            ref = x.float() @ ref.T
            error = float((got - ref).abs().max() / max(1.0, float(ref.abs().max())))
            if not error <= _SELF_TEST_TOLERANCE:
                return False, (
                    f"torch's int4 kernels differ from the dequantized weights on {device} "
                    f"({bits}-bit [{n}, {k}] test, scaled error {error:.3g}); {fallback}"
                )
    except Exception as exc:  # any failure (missing op, old GPU, ...) only means: not usable here
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return False, f"torch's int4 kernels are unusable on {device} ({type(exc).__name__}: {first_line}); {fallback}"
    return True, ""


# ------------------------------------------------------------------ the ops


def upload(data: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int,
           dtype: torch.dtype, role: str) -> TorchQuantized:
    """The device form of one packed matrix (``data`` = its stream bytes, already on the device).

    bfloat16 linear weights at int4pack group sizes take the int4 kernels when
    :func:`int4_status` allows; the row form is kept only where a role needs it.
    """
    if role not in ROLES:
        raise BackendError(f"unknown quantized weight role {role!r}; expected one of {ROLES}")
    n = data.shape[0]
    shape = (n, scales.shape[1] * group_size)
    rows = RowForm(data, scales, biases)
    int4 = None
    if (role != "embedding" and dtype == torch.bfloat16 and group_size in INT4_GROUP_SIZES
            and int4_status(data.device)[0]):
        int4 = _int4_form(rows, bits, group_size)
    keep_rows = int4 is None or (role == "tied" and not _readable(int4))
    return TorchQuantized(shape, bits, group_size, dtype, int4, rows if keep_rows else None)


def linear(x: torch.Tensor, weight: TorchQuantized, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias``: the int4 kernel for bfloat16 ``x`` when built, else dequantize + dense GEMM."""
    if weight.int4 is not None and x.dtype == torch.bfloat16:
        n = weight.shape[0]
        if x.shape[0] >= _DENSE_ROWS and _readable(weight.int4):
            y = x @ _int4_dense_t(weight)[:, :n]
            return y if bias is None else y + bias
        y = _int4_mm(x, weight.int4, weight.group_size)
        if y.shape[1] != n:
            y = y[:, :n]
            if bias is None:
                return y.contiguous()
        return y if bias is None else y + bias
    return F.linear(x, dense(weight, x.dtype), bias)


def embedding(weight: TorchQuantized, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the matrix, dequantized from the gathered packed rows only."""
    rows = weight.rows
    if rows is None and weight.int4 is not None and _readable(weight.int4):
        return _int4_embedding(weight, ids.long()).to(weight.dtype)
    if rows is None:
        raise BackendError("this quantized weight was uploaded with role 'linear'; it has no rows to look up")
    out = torch.empty((ids.shape[0], weight.shape[1]), dtype=torch.float32, device=rows.data.device)
    _dequantize_into(out, rows.data.index_select(0, ids), rows.scales.index_select(0, ids),
                     rows.biases.index_select(0, ids), weight.bits, weight.group_size)
    return out if weight.dtype == torch.float32 else out.to(weight.dtype)
