"""Conformance kit for backend plugins: every op against the float64 oracle, then a whole model.

Usage, for a plugin registered under the ``ferrum.backends`` entry point::

    python -m ferrum.testing mybackend            # prints a table; exit code 1 on failure

    from ferrum.testing import assert_conformance  # in a pytest test
    assert_conformance("mybackend")

    pytest --ferrum-backend mybackend              # one test item per check (ferrum.testing.pytest_plugin)

:func:`checks` lists the checks one by one, each runnable alone; the pytest plugin builds on it.

Each op the plugin implements is checked, and so is the core's fallback for
each optional op it leaves out (it runs on the plugin's required ops). Inputs
have the shapes that catch layout bugs: odd sizes, 7 query heads per KV head
and a single KV head, head_dim 48, KV lengths that are not multiples of the
block size, shuffled block tables, one batch mixing prefill chunks with
decode tokens and one over 70 keys beside a 3-key sequence; rope at positions
bfloat16 cannot hold; sampling of an all-greedy batch whose bias and penalties
(on negative logits) decide the pick. Packed quantized weights are checked at every bit width and
group size (33 outputs, placed as a tied embedding + head so both the matmul
and the row lookup run), through whichever path the backend takes for that
format, against the float64 product with the dequantized matrix. Mixture-of-experts ops: routing
against the host rule, and the expert MLP (float and 4-bit) with every token on one pair of experts
and with tokens spread evenly, against a token-by-token float64 oracle.
Errors are measured relative to the result's scale,
``max|got - ref| / max(1, max|ref|)``, against the tolerance of the dtype.
"""

from __future__ import annotations

import inspect
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ferrum.attention import AttentionBatch
from ferrum.backends import Backend, api_incompatibility, load_backend
from ferrum.hookspec import API_VERSION
from ferrum.quant.affine import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantizedWeight, dequantize, quantize
from ferrum.random_checkpoint import write_random_checkpoint
from ferrum.sampling import RequestSampler, SamplingParams, build_sampling_batch, sample_numpy
from ferrum.testing import oracle
from ferrum.testing.family_checks import family_checks
from ferrum.weights import Placed, place, runs_natively

#: Allowed ``max|got - ref| / max(1, max|ref|)`` per compute dtype: ops, then a whole model's logits.
OP_TOLERANCE = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 4e-2}
MODEL_TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 1.5e-1}

#: The end-to-end model: Qwen3-like, GQA 7:1, head_dim 48 != hidden / heads, q/k norms, untied.
TINY_MODEL = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=96, intermediate_size=80,
    num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1, head_dim=48, vocab_size=97,
    max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    error: float | None = None  # scaled max error, when numbers were compared
    tolerance: float | None = None
    message: str = ""


@dataclass
class ConformanceReport:
    backend: str
    dtype: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.results)

    def failed(self) -> list[str]:
        return [r.name for r in self.results if not r.passed]

    def __str__(self) -> str:
        lines = [f"conformance of backend {self.backend!r} ({self.dtype})"]
        for r in self.results:
            numbers = f"{r.error:.2e} <= {r.tolerance:.0e}" if r.error is not None else ""
            lines.append(f"  {'ok  ' if r.passed else 'FAIL'}  {r.name:<38} {numbers:<20} {r.message}".rstrip())
        lines.append("all checks passed" if self.ok else f"{len(self.failed())} check(s) failed")
        return "\n".join(lines)


class _Context:
    """The backend under test, a seeded generator and helpers to move arrays across."""

    def __init__(self, backend: Backend, dtype: str):
        self.backend, self.ops, self.dtype = backend, backend.ops, dtype
        self.rng = np.random.default_rng(0)

    def random(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32)

    def put(self, array: np.ndarray) -> Any:
        return self.ops.from_numpy(array, self.dtype)

    def put_weight(self, array: np.ndarray) -> Any:
        """A checkpoint tensor in the plugin's weight form (what linear, embedding and the norms receive)."""
        return self.ops.upload_weight("weight", array, self.dtype)

    def put_int(self, array) -> Any:
        return self.ops.from_numpy(np.asarray(array, dtype=np.int32), None)

    def get(self, x: Any) -> np.ndarray:
        return np.asarray(self.ops.to_numpy(x), dtype=np.float64)

    def rounded(self, array: np.ndarray) -> np.ndarray:
        """``array`` as the backend stores it in the compute dtype (the oracle's input)."""
        return self.get(self.put(array))


class _Mismatch(Exception):
    def __init__(self, error: float):
        self.error = error


def _compare(got: np.ndarray, ref: np.ndarray, tolerance: float) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"shape {got.shape}, expected {ref.shape}")
    infinite = np.isinf(ref)  # -inf logprobs (a grammar's forbidden tokens) must be exactly that
    if not np.array_equal(got[infinite], ref[infinite]):
        raise _Mismatch(float("inf"))
    got, ref = got[~infinite], ref[~infinite]
    error = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max()))) if ref.size else 0.0
    if not error <= tolerance:
        raise _Mismatch(error)
    return error


# --------------------------------------------------------------------------- checks
# Each check returns the largest scaled error it measured (None if it compared no
# numbers) and raises on failure.


def check_backend_info(c: _Context) -> None:
    info = c.backend.info
    assert info.api_version is not None, (
        "BackendInfo.api_version is not declared: set it (and BackendProbe.api_version) to the literal version "
        f"the plugin was written for, e.g. {API_VERSION!r}, so an incompatible Ferrum refuses it by name")
    refusal = api_incompatibility(info.api_version)
    assert refusal is None, refusal
    probed = c.backend.probe.api_version
    assert probed is not None, (
        f"BackendProbe.api_version is not declared: set it to {info.api_version!r} too, so discovery refuses the "
        "plugin under an incompatible Ferrum by name before importing its framework")
    assert str(probed) == str(info.api_version), (
        f"BackendProbe.api_version {probed!r} and BackendInfo.api_version {info.api_version!r} differ: "
        "both are the one version the plugin was written for")
    assert info.default_dtype in info.dtypes, f"default dtype {info.default_dtype!r} not in {info.dtypes}"
    assert info.name and info.device, "name and device must be set"


def check_host_round_trip(c: _Context) -> float:
    x = c.random(5, 7)
    assert np.array_equal(c.ops.to_numpy(c.ops.from_numpy(x, "float32")), x), "float32 changed on the way"
    ids = np.arange(-3, 9, dtype=np.int32)
    assert np.array_equal(np.asarray(c.ops.to_numpy(c.ops.from_numpy(ids, None))), ids), "int32 changed"
    return _compare(c.get(c.ops.cast(c.ops.from_numpy(x, "float32"), c.dtype)), c.rounded(x), 0.0)


def check_linear(c: _Context, tol: float) -> float:
    x, w, b = c.rounded(c.random(7, 96)), c.rounded(c.random(80, 96) * 0.1), c.rounded(c.random(80))
    plain = _compare(c.get(c.ops.linear(c.put(x), c.put_weight(w), None)), oracle.linear(x, w), tol)
    biased = c.get(c.ops.linear(c.put(x), c.put_weight(w), c.put_weight(b)))
    return max(plain, _compare(biased, oracle.linear(x, w, b), tol))


def check_embedding(c: _Context) -> float:
    weight = c.rounded(c.random(33, 24))
    ids = [5, 0, 32, 5, 17]
    return _compare(c.get(c.ops.embedding(c.put_weight(weight), c.put_int(ids))), weight[ids], 0.0)


def check_rows_concat_add_reshape(c: _Context, tol: float) -> float:
    a, b = c.rounded(c.random(6, 10)), c.rounded(c.random(6, 10))
    errors = [
        _compare(c.get(c.ops.take_rows(c.put(a), c.put_int([4, 1, 1]))), a[[4, 1, 1]], 0.0),
        _compare(c.get(c.ops.concat([c.put(a), c.put(b[:2])])), np.concatenate([a, b[:2]]), 0.0),
        _compare(c.get(c.ops.add(c.put(a), c.put(b))), a + b, tol),
        _compare(c.get(c.ops.reshape(c.put(a), (3, 2, 10))), a.reshape(3, 2, 10), 0.0),
    ]
    return max(errors)


def check_split(c: _Context) -> float:
    """A fused q/k/v output cut into its parts, for one token and for many; each part is used downstream."""
    rng = np.random.default_rng(5)  # its own draws: the other checks' inputs stay as they were
    sizes = (12, 4, 4)
    errors = []
    for tokens in (1, 7):
        x = c.rounded(rng.standard_normal((tokens, sum(sizes)), dtype=np.float32))
        parts = c.ops.split(c.put(x), sizes)
        assert len(parts) == len(sizes), f"split into {sizes} gave {len(parts)} parts"
        starts = np.cumsum((0, *sizes))
        for part, start, size in zip(parts, starts, sizes):
            got = c.get(c.ops.reshape(part, (tokens, size // 4, 4)))
            errors.append(_compare(got, x[:, start : start + size].reshape(tokens, size // 4, 4), 0.0))
    return max(errors)


def check_rms_norm(c: _Context, tol: float) -> float:
    x, w = c.rounded(c.random(7, 96) * 3), c.rounded(1 + 0.1 * c.random(96))
    heads, hw = c.rounded(c.random(7, 3, 48)), c.rounded(1 + 0.1 * c.random(48))
    small = c.rounded(c.random(7, 96) * 0.05)  # rows whose mean square is near eps: an eps left out shows
    return max(
        _compare(c.get(c.ops.rms_norm(c.put(x), c.put_weight(w), 1e-5)), oracle.rms_norm(x, w, 1e-5), tol),
        _compare(c.get(c.ops.rms_norm(c.put(heads), c.put_weight(hw), 1e-6)), oracle.rms_norm(heads, hw, 1e-6), tol),
        _compare(c.get(c.ops.rms_norm(c.put(small), c.put_weight(w), 1e-3)), oracle.rms_norm(small, w, 1e-3), tol),
    )


def check_add_rms_norm(c: _Context, tol: float) -> float:
    x, r, w = c.rounded(c.random(5, 96)), c.rounded(c.random(5, 96)), c.rounded(1 + 0.1 * c.random(96))
    normed, summed = c.ops.add_rms_norm(c.put(x), c.put(r), c.put_weight(w), 1e-5)
    return max(_compare(c.get(summed), x + r, tol), _compare(c.get(normed), oracle.rms_norm(x + r, w, 1e-5), tol))


def check_rope(c: _Context, tol: float) -> float:
    x = c.rounded(c.random(9, 7, 48))
    positions = np.array([0, 1, 2, 37, 5, 200, 3, 4, 1000], dtype=np.int32)  # several sequences' offsets
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, 48, 2) / 48)).astype(np.float32)
    got = c.get(c.ops.rope(c.put(x), c.put_int(positions), c.ops.from_numpy(inv_freq, "float32")))
    return _compare(got, oracle.rope(x, positions, inv_freq), tol)


def check_rope_past_bfloat16_integers(c: _Context, tol: float) -> float:
    """Positions bfloat16 cannot hold (257, 1023...): a backend rounding them to its compute dtype turns ~half the
    rotated values (0.55 scaled error), which positions up to 256 (or 1000, exact in bfloat16) never show."""
    x = c.rounded(np.random.default_rng(11).standard_normal((6, 3, 48)).astype(np.float32))
    positions = np.array([257, 1023, 3, 259, 1025, 511], dtype=np.int32)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, 48, 2) / 48)).astype(np.float32)
    got = c.get(c.ops.rope(c.put(x), c.put_int(positions), c.ops.from_numpy(inv_freq, "float32")))
    return _compare(got, oracle.rope(x, positions, inv_freq), tol)


def check_silu_mul(c: _Context, tol: float) -> float:
    g, u = c.rounded(c.random(6, 80) * 3), c.rounded(c.random(6, 80))
    return _compare(c.get(c.ops.silu_mul(c.put(g), c.put(u))), oracle.silu_mul(g, u), tol)


#: (q_len, kv_len, heads, kv_heads, head_dim): GQA 7:1 prefill, MQA, MHA with one query (decode).
_ATTENTION_CASES = ((5, 11, 14, 2, 48), (3, 3, 6, 1, 16), (1, 9, 4, 4, 32))
#: A chunk over a longer context: backends switch kernels by size (MLX's CPU path writes large calls out).
_LONG_ATTENTION_CASE = (24, 200, 8, 2, 32)


def check_attention(
    c: _Context, tol: float, window: int | None = None, cases: tuple[tuple[int, ...], ...] = _ATTENTION_CASES
) -> float:
    errors = []
    for q_len, kv_len, heads, kv_heads, d in cases:
        q, k, v = (c.rounded(c.random(n, h, d)) for n, h in ((q_len, heads), (kv_len, kv_heads), (kv_len, kv_heads)))
        scale = 0.75 * d**-0.5  # not the usual one, which an implementation might assume (Gemma's differs)
        got = c.get(c.ops.attention(c.put(q), c.put(k), c.put(v), scale, window, None, None))  # every argument:
        # a plugin may write the hookspec's signature as it stands, without defaults
        errors.append(_compare(got, oracle.attention(q, k, v, scale, window), tol))
    return max(errors)


_BLOCK = 4


def _filled_pool(c: _Context, kv_heads: int, d: int, num_blocks: int = 12):
    """A 2-layer pool whose every slot holds known random K/V (written through ``kv_write``)."""
    pool = c.ops.kv_alloc(2, num_blocks, _BLOCK, kv_heads, d, c.dtype)
    contents = []
    for layer in range(2):
        k = c.rounded(c.random(num_blocks * _BLOCK, kv_heads, d))
        v = c.rounded(c.random(num_blocks * _BLOCK, kv_heads, d))
        slots = c.rng.permutation(num_blocks * _BLOCK).astype(np.int32)  # scattered order
        c.ops.kv_write(pool, layer, c.put(k[slots]), c.put(v[slots]), c.put_int(slots))
        contents.append((k.reshape(num_blocks, _BLOCK, kv_heads, d), v.reshape(num_blocks, _BLOCK, kv_heads, d)))
    return pool, contents


def check_kv_write_gather(c: _Context) -> float:
    pool, contents = _filled_pool(c, 2, 48)
    errors = []
    blocks = np.array([7, 2, 9], dtype=np.int64)
    for layer, (kb, vb) in enumerate(contents):
        k, v = c.ops.kv_gather(pool, layer, blocks, 10)
        errors.append(_compare(c.get(k), kb[blocks].reshape(-1, 2, 48)[:10], 0.0))
        errors.append(_compare(c.get(v), vb[blocks].reshape(-1, 2, 48)[:10], 0.0))
    # overwrite three slots of layer 0; the rest of layer 0 and all of layer 1 keep their values
    new_k, new_v = c.rounded(c.random(3, 2, 48)), c.rounded(c.random(3, 2, 48))
    c.ops.kv_write(pool, 0, c.put(new_k), c.put(new_v), c.put_int([29, 30, 4]))
    kb0 = contents[0][0].reshape(-1, 2, 48).copy()
    kb0[[29, 30, 4]] = new_k
    k_all, _ = c.ops.kv_gather(pool, 0, np.arange(12), 48)
    errors.append(_compare(c.get(k_all), kb0, 0.0))
    k_other, _ = c.ops.kv_gather(pool, 1, np.arange(12), 48)
    errors.append(_compare(c.get(k_other), contents[1][0].reshape(-1, 2, 48), 0.0))
    return max(errors)


def check_flush(c: _Context) -> float:
    """KV written and flushed on this thread, then written and read on a thread that had run the backend
    before (the engine's recovery from a step stopped half way: the next step may run on the asyncio engine's
    thread). MLX fails that without a flush: "There is no Stream(cpu, 0) in current thread"."""
    import queue
    import threading

    jobs: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def worker() -> None:
        for job in iter(jobs.get, None):
            try:
                results.put(job())
            except Exception as error:  # reported on the calling thread
                results.put(error)

    def on_worker(job: Callable[[], Any]) -> Any:
        jobs.put(job)
        result = results.get()
        if isinstance(result, Exception):
            raise AssertionError(f"KV flushed on one thread failed on another: {result!r}")
        return result

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        pool, contents = _filled_pool(c, 2, 48)
        c.ops.flush()
        first, more = c.rounded(c.random(1, 2, 48)), c.rounded(c.random(1, 2, 48))

        def write_and_read(k: np.ndarray, slot: int) -> np.ndarray:
            c.ops.kv_write(pool, 0, c.put(k), c.put(k), c.put_int([slot]))
            return c.get(c.ops.kv_gather(pool, 0, np.arange(12), 48)[0])

        on_worker(lambda: write_and_read(first, 9))  # the worker has run the backend (as the engine's would)
        new_k = c.rounded(c.random(2, 2, 48))
        c.ops.kv_write(pool, 0, c.put(new_k), c.put(new_k), c.put_int([5, 40]))
        c.ops.flush()
        seen = on_worker(lambda: write_and_read(more, 7))
    finally:
        jobs.put(None)
        thread.join()
    expected = contents[0][0].reshape(-1, 2, 48).copy()
    expected[[5, 40]], expected[7], expected[9] = new_k, more[0], first[0]
    return _compare(seen, expected, 0.0)


#: (query lengths, sequence lengths, block tables) of one paged batch: prefill, decode, a later chunk, decode.
_PAGED_CASE = ([5, 1, 3, 1], [5, 9, 11, 2], [[3, 8], [11, 0, 6], [1, 10, 4], [5]])
#: Long sequences beside a short one (tables padded far): keys past 64, where a kernel may switch tiles.
_LONG_PAGED_CASE = ([1, 6, 1], [70, 45, 3], [[(7 * i + 3) % 40 for i in range(18)],
                                             [(11 * i + 1) % 40 for i in range(12)], [39]])


def check_paged_attention(c: _Context, tol: float, window: int | None = None,
                          case: tuple[list[int], list[int], list[list[int]]] = _PAGED_CASE) -> float:
    heads, kv_heads, d = 14, 2, 48
    q_lens, seq_lens, block_tables = case
    pool, contents = _filled_pool(c, kv_heads, d, num_blocks=max(12, 1 + max(max(t) for t in block_tables)))
    width = max(len(t) for t in block_tables)
    table = np.zeros((len(q_lens), width), dtype=np.int32)
    for row, blocks in enumerate(block_tables):
        table[row, : len(blocks)] = blocks
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    positions = np.concatenate([np.arange(s - q, s) for q, s in zip(q_lens, seq_lens)]).astype(np.int32)
    slots = np.concatenate(
        [[block_tables[i][p // _BLOCK] * _BLOCK + p % _BLOCK for p in range(s - q, s)]
         for i, (q, s) in enumerate(zip(q_lens, seq_lens))]
    ).astype(np.int32)
    batch = AttentionBatch(positions, slots, cu, np.array(seq_lens, dtype=np.int32), table, _BLOCK)
    batch.prepared = c.ops.prepare_attention_batch(batch)
    q = c.rounded(c.random(int(cu[-1]), heads, d))
    errors = []
    for layer, (kb, vb) in enumerate(contents):
        scale = 0.75 * d**-0.5  # not the usual one, which an implementation might assume
        got = c.get(c.ops.paged_attention(c.put(q), pool, layer, batch, scale, window, None, None))
        ref = oracle.paged_attention(q, kb, vb, cu, seq_lens, block_tables, scale, window)
        errors.append(_compare(got, ref, tol))
    return max(errors)


class _AllowOnly:
    """A grammar's view for the sampling case: every token but ``allowed`` forbidden (``-inf`` entries)."""

    def __init__(self, allowed: tuple[int, ...], vocab: int):
        self._forbidden = np.setdiff1d(np.arange(vocab, dtype=np.int32), np.array(allowed, dtype=np.int32))

    def forbidden(self) -> np.ndarray:
        return self._forbidden


def _refined(params: SamplingParams) -> bool:
    """A row API 1.11 reads otherwise (top-p within a top-k, a bias the penalty scales): a plugin declaring an
    older minor never samples a batch holding one (the core does)."""
    return (params.top_k > 0 and params.top_p < 1) or bool(params.logit_bias and params.repetition_penalty != 1)


def _sampling_case(refined: bool = True) -> tuple[np.ndarray, Any]:
    """The sampling check's rows; ``refined=False`` leaves out those of :func:`_refined`, so the plugin's own
    ``sample`` takes the batch whatever API it declares."""
    rng = np.random.default_rng(3)
    logits = np.stack([rng.permutation(64).astype(np.float32) * 0.4 for _ in range(16)])
    params = [
        SamplingParams(), SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.2, top_k=4, seed=2),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1, seed=3, logprobs=3),
        SamplingParams(repetition_penalty=1.5, logit_bias={5: 3.0, 2: -4.0}, logprobs=2),  # 2 penalised after
        # A structured output's row: 61 of 64 tokens at -inf, one of them also biased up.
        SamplingParams(temperature=0.9, seed=4, logit_bias={int(np.argmax(logits[5])): 50.0}, logprobs=2),
        # Ranked by logit where a low temperature's probabilities underflow to ties; a top-p of 0 in float32.
        SamplingParams(temperature=0.01, seed=5, logprobs=20), SamplingParams(temperature=1.0, top_p=1e-300, seed=6),
        # top-p within the top-k (API 1.11): of 4 tokens' mass, not of the whole vocabulary's.
        SamplingParams(temperature=3.0, top_k=4, top_p=0.5, seed=7),
        # min-p alone, where nothing else narrows the draw: a hot temperature would pick far down otherwise.
        *(SamplingParams(temperature=2.0, min_p=0.3, seed=seed) for seed in (8, 9, 10, 11)),
        # a bias on a token the penalty also scales (API 1.11: the biased logit is scaled), made the top one.
        SamplingParams(repetition_penalty=1.5, logit_bias={2: 30.0}, logprobs=2),
        # top-k alone at a temperature that flattens the rest: a draw ignoring it falls outside the two at once.
        SamplingParams(temperature=3.0, top_k=2, seed=12),
    ]
    logits = logits[: len(params)]
    samplers = [RequestSampler(p, [1, 2, 3]) for p in params]
    samplers[5].matcher = _AllowOnly((7, 19, 40), logits.shape[1])
    kept = [row for row, p in enumerate(params) if refined or not _refined(p)]
    return logits[kept], build_sampling_batch([samplers[row] for row in kept])


def check_sample_on_device(c: _Context) -> float:
    """The read result is ``sample``'s; the ids left on the device are its tokens and feed an embedding."""
    logits, batch = _sampling_case()
    rng = np.random.default_rng(6)  # its own draws: the other checks' inputs stay as they were
    table = c.rounded(rng.standard_normal((64, 3), dtype=np.float32))
    picked = c.ops.sample_on_device(c.ops.from_numpy(logits, "float32"), batch)
    rows = c.get(c.ops.embedding(c.put_weight(table), picked.ids))
    got, want = picked.read(), sample_numpy(logits, batch)
    assert got.tokens.tolist() == want.tokens.tolist(), f"tokens {got.tokens.tolist()}, expected {want.tokens.tolist()}"
    assert np.asarray(c.ops.to_numpy(picked.ids)).tolist() == want.tokens.tolist(), "ids differ from the read tokens"
    _compare(rows, table[want.tokens], 0.0)  # the ids select the tokens' embedding rows
    return max(_compare(got.logprobs, want.logprobs, 1e-5), _compare(got.top_logprobs, want.top_logprobs, 1e-5))


def check_sample_all_greedy(c: _Context) -> float:
    """A batch of greedy rows only, which a backend may take a shortcut for: the bias and penalties still decide
    the pick. Every logit is negative, where the repetition penalty multiplies (a division would raise them)."""
    rng = np.random.default_rng(12)
    logits = np.stack([rng.permutation(64).astype(np.float32) * 0.4 - 30.0 for _ in range(4)])
    top = np.argsort(-logits, axis=-1)
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(logit_bias={int(top[1, 5]): 3.0}),
              SamplingParams(presence_penalty=2.0, logprobs=2), SamplingParams(logprobs=1)]
    samplers = [RequestSampler(p, [int(top[row, 0])]) for row, p in enumerate(params)]
    samplers[2].record(int(top[2, 0]))
    batch = build_sampling_batch(samplers)
    got, want = c.ops.sample(c.ops.from_numpy(logits, "float32"), batch), sample_numpy(logits, batch)
    assert want.tokens[:3].tolist() != top[:3, 0].tolist(), "the case no longer tests what it should"
    assert got.tokens.tolist() == want.tokens.tolist(), f"tokens {got.tokens.tolist()}, expected {want.tokens.tolist()}"
    return max(_compare(got.logprobs, want.logprobs, 1e-5), _compare(got.top_logprobs, want.top_logprobs, 1e-5))


def check_sample(c: _Context) -> float:
    """The whole case, and the case without the rows a plugin declaring API < 1.11 hands to the core (a batch
    holding one is sampled by the core whole, so that plugin's own sampling was never checked)."""
    worst = 0.0
    for refined in (True, False):
        logits, batch = _sampling_case(refined)
        got = c.ops.sample(c.ops.from_numpy(logits, "float32"), batch)
        want = sample_numpy(logits, batch)
        assert got.tokens.tolist() == want.tokens.tolist(), \
            f"tokens {got.tokens.tolist()}, expected {want.tokens.tolist()}"
        assert got.top_tokens.tolist() == want.top_tokens.tolist(), "top-n logprob tokens differ"
        worst = max(worst, _compare(got.logprobs, want.logprobs, 1e-5),
                    _compare(got.top_logprobs, want.top_logprobs, 1e-5))
    return worst


def check_sample_flags_nan(c: _Context) -> float | None:
    """A row whose logits hold NaN is flagged (``SampleResult.unusable``, so its request fails instead of going on
    with a meaningless token), greedy or sampled, with logprobs or without; the other rows are sampled as ever."""
    logits = np.stack([np.random.default_rng(7).permutation(64).astype(np.float32) * 0.4 for _ in range(4)])
    logits[1, 5] = logits[3, 60] = np.nan
    for logprobs in (0, 2):
        params = [SamplingParams(logprobs=logprobs), SamplingParams(logprobs=logprobs),
                  SamplingParams(temperature=0.9, seed=1, logprobs=logprobs),
                  SamplingParams(temperature=0.9, seed=2, logprobs=logprobs)]
        batch = build_sampling_batch([RequestSampler(p, [1, 2]) for p in params])
        got, want = c.ops.sample(c.ops.from_numpy(logits, "float32"), batch), sample_numpy(logits, batch)
        flags = None if got.unusable is None else np.asarray(got.unusable).tolist()
        assert flags == [False, True, False, True], f"rows with NaN logits flagged {flags}, expected rows 1 and 3"
        assert got.tokens[[0, 2]].tolist() == want.tokens[[0, 2]].tolist(), "the rows without NaN changed"
    return None


def check_model(c: _Context, tol: float, packed_bits: int | None = None) -> float:
    """The tiny model's logits against the oracle, and 16 greedy tokens in float32; with
    ``packed_bits``, packed at that width, group 32 (``ferrum quantize``), the oracle computing
    with the dequantized values."""
    from ferrum.model import DecoderOnlyLLM
    from ferrum.quant.convert import quantize_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_checkpoint(Path(tmp) / "tiny", TINY_MODEL, dtype="float32", std=0.2)
        if packed_bits is not None:
            with warnings.catch_warnings():  # o_proj's 336 inputs stay float, as meant: a mixed model
                warnings.filterwarnings("ignore", "(?s).*stay in float")
                folder = quantize_checkpoint(folder, Path(tmp) / "tiny-packed", bits=packed_bits, group_size=32)
        model = DecoderOnlyLLM.from_pretrained(folder, backend=c.backend, dtype=c.dtype, block_size=_BLOCK)
        ref_model = oracle.OracleModel(folder)
    prompt = [int(t) for t in np.random.default_rng(5).integers(0, 97, size=13)]
    error = _compare(model.forward_verify("all", prompt), ref_model.logits(prompt), tol)
    if c.dtype != "float32":
        return error  # near-ties make greedy tokens dtype-sensitive; logits are compared above
    tokens, ref_tokens = list(prompt), list(prompt)
    logits = model.prefill("greedy", prompt)
    for _ in range(16):
        tokens.append(int(np.argmax(logits)))
        ref_tokens.append(int(np.argmax(ref_model.logits(ref_tokens)[-1])))
        logits = model.decode("greedy", tokens[-1], len(tokens) - 1)
    assert tokens == ref_tokens, f"greedy tokens {tokens[13:]} differ from the oracle's {ref_tokens[13:]}"
    return error


def _quantized_case(c: _Context, bits: int, group_size: int) -> tuple[QuantizedWeight, Placed]:
    """An awkward packed matrix (33 outputs) placed as a tied embedding + head, the role needing both ops."""
    scale_dtype = "float16" if c.dtype == "float32" else c.dtype
    weight = quantize(c.random(33, max(96, 2 * group_size)) * 0.1, bits, group_size, scale_dtype)
    return weight, place(c.ops, "weight", weight, c.dtype, role="tied")


def check_quantized_linear(c: _Context, bits: int, group_size: int, tol: float) -> float:
    weight, placed = _quantized_case(c, bits, group_size)
    dense = dequantize(weight).astype(np.float64)
    x, b = c.rounded(c.random(7, dense.shape[1])), c.rounded(c.random(dense.shape[0]))
    plain = _compare(c.get(placed.linear(c.put(x), placed.weight, None)), oracle.linear(x, dense), tol)
    biased = c.get(placed.linear(c.put(x), placed.weight, c.put_weight(b)))
    return max(plain, _compare(biased, oracle.linear(x, dense, b), tol))


def check_quantized_embedding(c: _Context, bits: int, group_size: int, tol: float) -> float:
    weight, placed = _quantized_case(c, bits, group_size)
    ids = [5, 0, 32, 5, 17]
    return _compare(c.get(placed.embedding(placed.weight, c.put_int(ids))), dequantize(weight)[ids], tol)


def _grouped_cases() -> dict[str, tuple[Any, int, int, bool, float, float]]:
    """Per grouped rule, as its families route with it: (rule, groups, groups kept, normalized, scale, and a shift of
    the correction bias of every expert but the first)."""
    from ferrum.moe.routing import (
        GROUP_LIMITED_GREEDY, NOAUX_TC, NOAUX_TC_ZERO_MASKED, SIGMOID_LOGITS_CORRECTED, SIGMOID_TOP_K,
        SOFTMAX_CORRECTED, SOFTMAX_EXPERT_SCALED, SOFTMAX_TOP2_GROUPED,
    )

    return {"grouped sigmoid": (NOAUX_TC, 4, 2, True, 2.5, 0.0),  # DeepSeek-V3, GLM-4.5
            "grouped softmax": (GROUP_LIMITED_GREEDY, 4, 2, False, 16.0, 0.0),  # DeepSeek-V2
            "corrected softmax": (SOFTMAX_CORRECTED, 1, 1, True, 1.0, 0.0),  # ERNIE 4.5 MoE
            "sigmoid top-k": (SIGMOID_TOP_K, 1, 1, False, 1.0, 0.0),  # Llama 4
            "grouped top-2 softmax": (SOFTMAX_TOP2_GROUPED, 4, 2, True, 1.5, 0.0),  # Mistral 4
            "expert-scaled softmax": (SOFTMAX_EXPERT_SCALED, 1, 1, True, 1.0, 0.0),  # Gemma 4 26B-A4B
            "logit-corrected sigmoid": (SIGMOID_LOGITS_CORRECTED, 1, 1, False, 1.0, 0.0),  # Kolibri-1
            "zero-masked grouped sigmoid": (NOAUX_TC_ZERO_MASKED, 8, 7, True, 2.5, -2.0)}  # A.X-K2


def check_moe_route_grouped(c: _Context, case: str = "grouped sigmoid") -> float:
    """Grouped routing (API 1.12's ``routing``) of random logits, 16 experts, 3 chosen, against the host rule, for
    each rule as its families use it (:func:`_grouped_cases`: DeepSeek-V3's sigmoid rule in 4 groups, 2 kept, with
    a correction bias that changes the choice and normalized weights; DeepSeek-V2's softmax, unnormalized; ERNIE
    4.5's corrected softmax; Llama 4's plain sigmoid; Mistral 4's softmax grouped by each group's two best; Gemma 4's
    softmax times per-expert scales between 0.25 and 2, which reorder nothing but weigh each expert apart; Kolibri-1's
    sigmoid weights chosen by the logits plus the bias; A.X-K2's DeepSeek-V3 rule masking the dropped group by 0 in 8
    groups, 7 kept, every expert but the first corrected 2 below it, so that each row chooses the dropped group's two
    experts beside the first, never tied); through
    the plugin's ``moe_route`` where the model would call it, else the core's fallback."""
    from ferrum.moe.kind import routes_natively
    from ferrum.moe.routing import GroupedRouting, route_grouped

    rng = np.random.default_rng(2)
    logits = c.rounded(rng.standard_normal((9, 16), dtype=np.float32) * 2)
    rule, groups, kept, normalize, scale, shift = _grouped_cases()[case]
    bias = rng.standard_normal(16).astype(np.float32) * 0.3 if rule.corrected else None
    if shift:
        bias[1:] += np.float32(shift)
    expert_scale = rng.uniform(0.25, 2.0, 16).astype(np.float32) if rule.expert_scaled else None
    placed = [None if a is None else c.ops.from_numpy(a, "float32") for a in (bias, expert_scale)]
    routing = GroupedRouting(groups, kept, scale, placed[0], rule, placed[1])
    route = c.ops.moe_route if routes_natively(c.ops, rule) else c.ops.fallback["moe_route"]
    ids, weights = route(c.put(logits), None, 3, normalize, routing)
    ids, weights = c.get(ids).astype(np.int64), c.get(weights)
    ref_ids, ref_weights = route_grouped(logits, bias, 3, groups, kept, normalize, scale, rule, expert_scale)
    order, ref_order = np.argsort(ids, axis=1), np.argsort(ref_ids, axis=1)
    if not np.array_equal(np.take_along_axis(ids, order, 1), np.take_along_axis(ref_ids, ref_order, 1)):
        raise AssertionError(f"chose experts {ids.tolist()}, expected {ref_ids.tolist()}")
    return _compare(np.take_along_axis(weights, order, 1), np.take_along_axis(ref_weights, ref_order, 1), 1e-5)


def check_moe_route(c: _Context, normalize: bool = True) -> float:
    """Random logits (no ties at the top-k boundary) and a shared-expert logit, against the host rule; the
    chosen probabilities divided by their sum or not (Qwen2-MoE, OLMoE), as ``normalize`` says. Called as the
    model calls it, ``routing`` None (a plugin may declare it without a default)."""
    from ferrum.moe.routing import route

    rng = np.random.default_rng(1)  # its own draws: the other checks' inputs stay as they were
    logits = c.rounded(rng.standard_normal((9, 6), dtype=np.float32) * 2)
    shared = c.rounded(rng.standard_normal((9, 1), dtype=np.float32))
    ids, weights = c.ops.moe_route(c.put(logits), c.put(shared), 2, normalize, None)
    ids, weights = c.get(ids).astype(np.int64), c.get(weights)
    ref_ids, ref_weights = route(logits, 2, normalize)
    order, ref_order = np.argsort(ids, axis=1), np.argsort(ref_ids, axis=1)
    if not np.array_equal(np.take_along_axis(ids, order, 1), np.take_along_axis(ref_ids, ref_order, 1)):
        raise AssertionError(f"chose experts {ids.tolist()}, expected {ref_ids.tolist()}")
    ref = np.concatenate([np.take_along_axis(ref_weights, ref_order, 1), 1 / (1 + np.exp(-shared))], axis=1)
    return _compare(np.concatenate([np.take_along_axis(weights[:, :2], order, 1), weights[:, 2:]], axis=1), ref, 1e-5)


def check_moe_experts(c: _Context, spread: bool, tol: float, bits: int | None = None, gpt_oss: bool = False,
                      gemma4: bool = False, ungated: bool = False, swish_clamped: bool = False,
                      ungated_gelu: bool = False, situ: bool = False) -> float:
    """Five experts of an awkward size, top-2 plus a shared expert's output; 70 tokens (backends
    sort pairs by expert from 64) all on experts 3 and 1, or spread evenly over every expert.
    ``gpt_oss``: with biases and the clamped SwiGLU, clamped at 0.5 so that it bites; ``gemma4``: GeGLU experts;
    ``ungated``: Nemotron 3 Nano's squared-ReLU experts, without a gate stack; ``swish_clamped``: Step 3.5's SwiGLU,
    its swish and up projection clamped at 0.5; ``ungated_gelu``: Phixtral's biased tanh-GELU experts, without a gate
    stack; ``situ``: Kimi K3's SiTU, both caps low enough to bite."""
    from ferrum.moe.activation import ClampedSwiGLU, Gelu, GeluTanhGLU, Situ, SquaredReLU
    from ferrum.moe.experts import PlacedExperts, StackedQuantized, place_experts

    rng = np.random.default_rng(2)  # its own draws: the other checks' inputs stay as they were
    e, hidden, inter, tokens = 5, 96, 64, 70
    shapes = {"gate": (e, inter, hidden), "up": (e, inter, hidden), "down": (e, hidden, inter)}
    host, dense = {}, {}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape, dtype=np.float32) * 0.2
        if bits is None:
            host[name] = dense[name] = c.rounded(w)
            continue
        each = [quantize(m, bits, 32, "float16" if c.dtype == "float32" else c.dtype) for m in w]
        fields = (np.stack([getattr(q, f) for q in each]) for f in ("packed", "scales", "biases"))
        host[name] = StackedQuantized(*fields, bits, 32)
        dense[name] = np.stack([dequantize(q) for q in each])
    needs, biases, activation = (), None, None
    if gpt_oss:
        needs, activation = ("biases", "activation"), ClampedSwiGLU(1.702, 0.5)
        biases = [c.rounded(rng.standard_normal((e, shape[1]), dtype=np.float32) * 0.3) for shape in shapes.values()]
    if gemma4:
        needs, activation = ("activation",), GeluTanhGLU()
    if swish_clamped:
        needs, activation = ("activation",), ClampedSwiGLU(1.0, 0.5, up_offset=0.0, clamp="swish")
    if situ:
        needs, activation = ("activation",), Situ(0.75, 1.25)
    if ungated_gelu:
        needs, activation = ("biases", "activation"), Gelu(tanh=True)
        biases = [None, *(c.rounded(rng.standard_normal((e, shape[1]), dtype=np.float32) * 0.3)
                          for shape in list(shapes.values())[1:])]
    if ungated or ungated_gelu:
        needs, activation = needs or ("activation",), activation or SquaredReLU()
        del host["gate"]  # drawn all the same, so that the other stacks' draws stay as they were
        dense["gate"] = None
    since = (1, 0) if activation is None else activation.since
    placed = {name: place_experts(c.ops, name, host[name], c.dtype, needs, since) for name in host}
    device_biases = None if biases is None else tuple(None if b is None else c.put(b) for b in biases)
    experts = PlacedExperts(placed["down"].linear, *(placed[n].weight if n in placed else None for n in shapes),
                            device_biases, activation)
    t = np.arange(tokens)
    ids = np.stack([t % e, (t + 2) % e], axis=1) if spread else np.tile([3, 1], (tokens, 1))
    weights = rng.uniform(0.1, 1.0, (tokens, 3)).astype(np.float32)
    x, shared = (c.rounded(rng.standard_normal((tokens, hidden), dtype=np.float32)) for _ in range(2))
    got = experts(c.put(x), c.put_int(ids), c.ops.from_numpy(weights, None), c.put(shared))
    ref = oracle.moe_experts(x, ids, weights, dense["gate"], dense["up"], dense["down"], shared, biases, activation)
    return _compare(c.get(got), ref, tol)


def check_lora_apply(c: _Context, mixed: bool, tol: float, repeat: int = 1) -> float:
    """Three adapter slots of ranks padded to 5 on a [40] -> [24] projection of 29 * ``repeat`` tokens
    (decode-sized and prefill-sized batches): tokens of every slot and of none, interleaved
    (``mixed``), or one slot for every token in order."""
    from ferrum.adapters.batching import LoraBatch

    rng = np.random.default_rng(4)  # its own draws: the other checks' inputs stay as they were
    lengths = [n * repeat for n in (3, 1, 7, 1, 5, 1, 1, 10)]
    tokens, n_in, n_out, slots, rank = sum(lengths), 40, 24, 3, 5
    x, y = c.rounded(rng.standard_normal((tokens, n_in), dtype=np.float32)), c.rounded(
        rng.standard_normal((tokens, n_out), dtype=np.float32))
    a = c.rounded(rng.standard_normal((slots, rank, n_in), dtype=np.float32) * 0.3)
    b = c.rounded(rng.standard_normal((slots, rank, n_out), dtype=np.float32) * 0.3)
    item_slots = [2, -1, 0, 1, -1, 2, 0, 1] if mixed else [1] * len(lengths)
    batch = LoraBatch.from_items(item_slots, lengths)
    ref = y.copy()
    for t, slot in enumerate(batch.token_slots):
        if slot >= 0:
            ref[t] += (x[t] @ a[slot].T) @ b[slot]
    got = c.ops.lora_apply(c.put(y), c.put(x), c.put(a), c.put(b), batch)
    return _compare(c.get(got), ref, tol)


def check_lora_overflow_stays_in_its_rows(c: _Context, tol: float, repeat: int = 1) -> float:
    """Slot 0's product overflows the compute dtype (inf) in its own tokens' rows: every other token's row is
    still its own product, finite (a 0/1 mask multiplying every slot's product makes it NaN, inf * 0)."""
    from ferrum.adapters.batching import LoraBatch

    rng = np.random.default_rng(5)
    lengths = [n * repeat for n in (3, 1, 7, 1, 5, 1, 1, 10)]
    tokens, n_in, n_out, slots, rank = sum(lengths), 40, 24, 3, 5
    item_slots = [2, -1, 0, 1, -1, 2, 0, 1]
    batch = LoraBatch.from_items(item_slots, lengths)
    x = np.abs(rng.standard_normal((tokens, n_in), dtype=np.float32)) + 0.5  # slot 0's sums past the range
    y = rng.standard_normal((tokens, n_out), dtype=np.float32)
    a = rng.standard_normal((slots, rank, n_in), dtype=np.float32) * 0.3
    a[0] = float(np.finfo(np.float16).max if c.dtype == "float16" else np.finfo(np.float32).max) / 4
    b = rng.standard_normal((slots, rank, n_out), dtype=np.float32) * 0.3
    x, y, a, b = (c.rounded(v) for v in (x, y, a, b))
    others = batch.token_slots != 0
    ref = y.copy()
    for t in np.flatnonzero(others & (batch.token_slots >= 0)):
        ref[t] += (x[t] @ a[batch.token_slots[t]].T) @ b[batch.token_slots[t]]
    with np.errstate(over="ignore", invalid="ignore"):  # slot 0's rows overflow, as meant (a host fallback says so)
        got = c.get(c.ops.lora_apply(c.put(y), c.put(x), c.put(a), c.put(b), batch))
    if not np.isfinite(got[others]).all():
        raise AssertionError("an overflowing adapter made other tokens' rows NaN or inf")
    return _compare(got[others], ref[others], tol)


def _quantized_checks(c: _Context, tol: float) -> list[tuple[str, Callable[[], float | None], float | None]]:
    """Every bit width and group size of the packed form, through whichever path the backend takes."""
    checks = []
    for bits in SUPPORTED_BITS:
        for gs in SUPPORTED_GROUP_SIZES:
            where = "native" if runs_natively(c.ops, bits, gs) else "core fallback"
            checks += [
                (f"quantized_linear {bits}-bit g{gs} ({where})",
                 lambda b=bits, g=gs: check_quantized_linear(c, b, g, tol), tol),
                (f"quantized_embedding {bits}-bit g{gs} ({where})",
                 lambda b=bits, g=gs: check_quantized_embedding(c, b, g, tol), tol),
            ]
    return checks


def _checks(c: _Context) -> list[tuple[str, Callable[[], float | None], float | None]]:
    tol, model_tol = OP_TOLERANCE[c.dtype], MODEL_TOLERANCE[c.dtype]
    ops = c.ops

    def source(op: str) -> str:
        return "native" if op in ops.native else "core fallback"

    gpt_oss_native = all(ops.accepts("moe_experts", arg) for arg in ("biases", "activation"))
    gpt_oss_experts = source("moe_experts") if gpt_oss_native else "core fallback"
    from ferrum.backends import declared_version
    from ferrum.moe.activation import ClampedSwiGLU, Gelu, GeluTanhGLU, Situ, SquaredReLU

    def experts_taking(activation: Any) -> str:
        """Whose experts run ``activation``: the plugin's, where it takes one and declares its API, else the core's."""
        native = ops.accepts("moe_experts", "activation") and declared_version(ops.info) >= activation.since
        return source("moe_experts") if native else "core fallback"

    gemma4_experts, ungated_experts = experts_taking(GeluTanhGLU), experts_taking(SquaredReLU)
    swish_clamped = experts_taking(ClampedSwiGLU(1.0, 0.5, up_offset=0.0, clamp="swish"))
    gelu_experts, situ_experts = experts_taking(Gelu(tanh=True)), experts_taking(Situ())
    from ferrum.moe.kind import routes_natively

    grouped = [(f"moe_route, {case} ({source('moe_route') if routes_natively(ops, rule) else 'core fallback'})",
                lambda case=case: check_moe_route_grouped(c, case), 1e-5)
               for case, (rule, *_) in _grouped_cases().items()]
    checks: list[tuple[str, Callable[[], float | None], float | None]] = [
        ("backend_info", lambda: check_backend_info(c), None),
        ("from_numpy / to_numpy / cast", lambda: check_host_round_trip(c), 0.0),
        ("linear", lambda: check_linear(c, tol), tol),
        (f"embedding ({source('embedding')})", lambda: check_embedding(c), 0.0),
        ("take_rows / concat / add / reshape", lambda: check_rows_concat_add_reshape(c, tol), tol),
        (f"split ({source('split')})", lambda: check_split(c), 0.0),
        ("rms_norm", lambda: check_rms_norm(c, tol), tol),
        (f"add_rms_norm ({source('add_rms_norm')})", lambda: check_add_rms_norm(c, tol), tol),
        ("rope", lambda: check_rope(c, tol), tol),
        ("silu_mul", lambda: check_silu_mul(c, tol), tol),
        (f"moe_route ({source('moe_route')})", lambda: check_moe_route(c), 1e-5),
        (f"moe_route, unnormalized ({source('moe_route')})", lambda: check_moe_route(c, normalize=False), 1e-5),
        *grouped,
        (f"moe_experts, all tokens on one pair ({source('moe_experts')})",
         lambda: check_moe_experts(c, False, tol), tol),
        (f"moe_experts, spread evenly ({source('moe_experts')})", lambda: check_moe_experts(c, True, tol), tol),
        (f"moe_experts packed at 4 bits ({source('moe_experts')})",
         lambda: check_moe_experts(c, True, tol, bits=4), tol),
        (f"moe_experts with biases, clamped SwiGLU ({gpt_oss_experts})",
         lambda: check_moe_experts(c, True, tol, gpt_oss=True), tol),
        (f"moe_experts, GeGLU ({gemma4_experts})", lambda: check_moe_experts(c, True, tol, gemma4=True), tol),
        (f"moe_experts, ungated squared ReLU ({ungated_experts})",
         lambda: check_moe_experts(c, True, tol, ungated=True), tol),
        (f"moe_experts, ungated biased GELU ({gelu_experts})",
         lambda: check_moe_experts(c, True, tol, ungated_gelu=True), tol),
        (f"moe_experts, swish-clamped SwiGLU ({swish_clamped})",
         lambda: check_moe_experts(c, True, tol, swish_clamped=True), tol),
        (f"moe_experts, SiTU ({situ_experts})", lambda: check_moe_experts(c, True, tol, situ=True), tol),
        *((f"attention q{case[0]} kv{case[1]} h{case[2]} kvh{case[3]} d{case[4]}",
           lambda case=case: check_attention(c, tol, cases=(case,)), tol) for case in _ATTENTION_CASES),
        ("kv_write / kv_gather", lambda: check_kv_write_gather(c), 0.0),
        (f"flush, then KV on another thread ({source('flush')})", lambda: check_flush(c), 0.0),
        (f"paged_attention ({source('paged_attention')})", lambda: check_paged_attention(c, tol), tol),
        (f"sample ({source('sample')})", lambda: check_sample(c), 1e-5),
        (f"sample_on_device ({source('sample_on_device')})", lambda: check_sample_on_device(c), 1e-5),
        (f"sample flags NaN rows ({source('sample')})", lambda: check_sample_flags_nan(c), 0.0),
        (f"lora_apply, adapters and none mixed ({source('lora_apply')})", lambda: check_lora_apply(c, True, tol), tol),
        (f"lora_apply, adapters and none mixed, 116 tokens ({source('lora_apply')})",
         lambda: check_lora_apply(c, True, tol, repeat=4), tol),
        (f"lora_apply, one adapter for all ({source('lora_apply')})", lambda: check_lora_apply(c, False, tol), tol),
        (f"lora_apply, one adapter overflowing, others intact ({source('lora_apply')})",
         lambda: check_lora_overflow_stays_in_its_rows(c, tol), tol),
        ("model: logits and 16 greedy tokens", lambda: check_model(c, model_tol), model_tol),
    ]
    if ops.accepts("attention", "sliding_window"):
        checks.insert(11, ("attention, sliding window", lambda: check_attention(c, tol, window=4), tol))
    paged_op = "paged_attention" if "paged_attention" in ops.native else "attention"
    if ops.accepts(paged_op, "sliding_window"):
        checks.insert(-2, ("paged_attention, sliding window", lambda: check_paged_attention(c, tol, window=3), tol))
    checks[-1:-1] = _quantized_checks(c, tol)
    checks[-1:-1] = family_checks(c, tol, model_tol)
    checks.append(("model packed at 4 bits: logits and greedy tokens", lambda: check_model(c, model_tol, packed_bits=4),
                   model_tol))
    # Last, so that the inputs the checks above draw stay as they were.
    q_len, kv_len = _LONG_ATTENTION_CASE[:2]
    checks.append((f"attention, {q_len} queries over {kv_len} keys",
                   lambda: check_attention(c, tol, cases=(_LONG_ATTENTION_CASE,)), tol))
    if ops.accepts("attention", "sliding_window"):
        checks.append((f"attention, {q_len} queries over {kv_len} keys, sliding window",
                       lambda: check_attention(c, tol, window=64, cases=(_LONG_ATTENTION_CASE,)), tol))
    checks += [
        ("rope at positions bfloat16 cannot hold", lambda: check_rope_past_bfloat16_integers(c, tol), tol),
        (f"sample, greedy rows only ({source('sample')})", lambda: check_sample_all_greedy(c), 1e-5),
        (f"paged_attention over 70 keys beside 3 ({source('paged_attention')})",
         lambda: check_paged_attention(c, tol, case=_LONG_PAGED_CASE), tol),
    ]
    return checks


@dataclass(frozen=True)
class Check:
    """One named check of the kit, bound to a backend and dtype (the pytest plugin's test items)."""

    name: str
    compute: Callable[[], float | None] = field(repr=False)
    tolerance: float | None = None
    ops: Any = field(default=None, repr=False, compare=False)  # the table under test, to name a raising op

    def run(self) -> CheckResult:
        """Run it; every failure, including an exception in the backend, becomes a failed result."""
        try:
            error = self.compute()
        except _Mismatch as mismatch:
            return CheckResult(self.name, False, mismatch.error, self.tolerance, "differs from the oracle")
        except Exception as exc:
            message = f"{type(exc).__name__}: {str(exc).rstrip()}{_raised_in(exc, self.ops)}"
            return CheckResult(self.name, False, message=message)
        return CheckResult(self.name, True, error, self.tolerance if error is not None else None)


def _raised_in(exc: BaseException, ops: Any) -> str:
    """`` (raised in the plugin's op 'NAME', at FILE:LINE)``: the innermost of the plugin's op functions on
    ``exc``'s traceback, and the innermost line of the plugin's op modules there, so a whole-model check's
    failure points at the op to fix; ``""`` where no plugin op was running (the core raised on what an op
    returned)."""
    if ops is None:
        return ""
    op_of_code = {}
    for name in ops.native:
        code = getattr(inspect.unwrap(getattr(ops, name)), "__code__", None)
        if code is not None:
            op_of_code.setdefault(code, name)
    frames = list(traceback.walk_tb(exc.__traceback__))
    ops_on_stack = [op_of_code[frame.f_code] for frame, _ in frames if frame.f_code in op_of_code]
    if not ops_on_stack:
        return ""
    plugin_files = {code.co_filename for code in op_of_code}
    frame, line = [(frame, line) for frame, line in frames if frame.f_code.co_filename in plugin_files][-1]
    return f" (raised in the plugin's op {ops_on_stack[-1]!r}, at {frame.f_code.co_filename}:{line})"


def checks(backend: Backend, dtype: str) -> list[Check]:
    """Every check the kit runs on ``backend`` in ``dtype``, in order, sharing one seeded generator
    (a fresh call gives the same inputs again); ops and checks added to the kit appear here."""
    return [Check(name, compute, tolerance, backend.ops)
            for name, compute, tolerance in _checks(_Context(backend, dtype))]


def check_backend(backend: str | Backend, dtype: str | None = None) -> ConformanceReport:
    """Run every check on ``backend`` (a name or a loaded backend) in ``dtype`` (default: its default)."""
    if not isinstance(backend, Backend):
        backend = load_backend(backend)
    dtype = dtype or backend.info.default_dtype
    report = ConformanceReport(backend.name, dtype)
    if dtype not in backend.info.dtypes:
        report.results.append(CheckResult("dtype", False, message=f"{dtype!r} is not in {backend.info.dtypes}"))
        return report
    report.results.extend(check.run() for check in checks(backend, dtype))  # a failure does not stop the rest
    return report


def assert_conformance(backend: str | Backend, dtype: str | None = None) -> ConformanceReport:
    """:func:`check_backend`, raising ``AssertionError`` with the report's table on any failure."""
    report = check_backend(backend, dtype)
    if not report.ok:
        raise AssertionError(str(report))
    return report
