"""RWKV-7's rule (``wkv7``, plugin API 1.30) against its float64 oracle and the numpy kernel: the conformance kit's case
on every backend here (natively; an installed JAX plugin from before 1.30 through the core's fallback), the kit failing
a rule that reads after the decay or writes the state it was given, and the batched formulation (torch's, MLX's and
the JAX plugin's) over varlen batches whose long segments take its chunked form, padded to buckets or not."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ferrum.backends import load_backend
from ferrum.recurrent import batched, kernels
from ferrum.testing import family_checks
from ferrum.testing.conformance import _Context, _Mismatch
from support import grouped_routing_backends, runnable_backends

BACKENDS = sorted(set(runnable_backends() + grouped_routing_backends()))
#: A decode token, a prompt over several chunks, a short prompt chunk, an empty segment, one a token over two chunks.
_VARLEN = np.cumsum([0, 1, 4 * batched.CHUNK + 6, 5, 0, 2 * batched.CHUNK + 1]).astype(np.int32)
_DECODE = np.arange(5, dtype=np.int32)
CASES = {"varlen": _VARLEN, "decode": _DECODE, "short": np.array([0, 3, 3, 7], np.int32)}


def _inputs(cu: np.ndarray, heads: int = 2, dim: int = 16, strongest: float = 3.0) -> tuple[np.ndarray, ...]:
    """``wkv7``'s inputs as RWKV-7 makes them (``a`` a unit key's negative, ``b`` a per-channel fraction of it),
    log-decays from none to ``-strongest`` per token, each segment from a state of its own."""
    rng = np.random.default_rng(int(cu[-1]))
    n = int(cu[-1])
    r, k, v = rng.standard_normal((3, n, heads, dim)).astype(np.float32)
    w = -rng.uniform(0, strongest, (n, heads, dim)).astype(np.float32)
    unit = rng.standard_normal((n, heads, dim)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    b = unit * rng.uniform(0, 1, (n, heads, dim)).astype(np.float32)
    state = rng.standard_normal((len(cu) - 1, heads, dim, dim)).astype(np.float32)
    return r, w, k, v, -unit, b, state


def _assert_close(got: tuple, want: tuple, tol: float) -> None:
    """Each of ``got`` within ``tol`` of ``want``'s, scaled by its largest value (as the kit compares)."""
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= tol * max(1.0, float(np.abs(w).max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_kits_wkv7_case_passes(backend):
    """Natively on cpu / torch / MLX and the JAX plugin; one installed from before API 1.30 (reinstall
    plugins/ferrum-jax) through the core's fallback."""
    from ferrum.backends import declared_version
    from ferrum.recurrent.rwkv7 import runs_natively

    ops = load_backend(backend).ops
    assert runs_natively(ops) == (backend != "jax" or declared_version(ops.info) >= (1, 30))
    assert family_checks.check_wkv7(_Context(load_backend(backend), "float32"), 1e-5) <= 1e-5


def _read_after_the_decay(r, w, k, v, a, b, state, cu):
    """The rule with ``a S`` read from the decayed state (a port that decays first, as the gated delta rule does)."""
    return kernels.wkv7(r, w, k, v, a * np.exp(w), b, state, cu)


def _in_place(r, w, k, v, a, b, state, cu):
    y, new_state = kernels.wkv7(r, w, k, v, a, b, state, cu)
    state[...] = new_state
    return y, new_state


WRONG = {"read after the decay": (_read_after_the_decay, _Mismatch),
         "state written in place": (_in_place, AssertionError)}


@pytest.mark.parametrize("wrong", WRONG)
def test_the_kit_catches_a_wkv7_reading_after_the_decay_or_writing_the_state_given(wrong):
    rule, error = WRONG[wrong]
    c = _Context(load_backend("cpu"), "float32")
    base = c.ops
    c.ops = SimpleNamespace(from_numpy=base.from_numpy, to_numpy=base.to_numpy, native=frozenset({"wkv7"}),
                            info=base.info, wkv7=rule)
    with pytest.raises(error):
        family_checks.check_wkv7(c, 1e-5)


def test_a_plugin_declaring_an_older_api_gets_the_fallback():
    from ferrum.backends import BackendInfo
    from ferrum.recurrent.rwkv7 import runs_natively

    info = load_backend("cpu").ops.info
    older = SimpleNamespace(native=frozenset({"wkv7"}), info=BackendInfo(**{**vars(info), "api_version": "1.29"}))
    assert runs_natively(SimpleNamespace(native=frozenset({"wkv7"}), info=info)) and not runs_natively(older)


@pytest.mark.parametrize("cu", CASES.values(), ids=CASES)
def test_the_batched_formulation_gives_the_kernels_results(cu):
    """Token steps and the chunked form, padded to buckets (as JAX runs it) or not, on numpy arrays."""
    inputs = _inputs(cu)
    want = kernels.wkv7(*inputs, cu)
    plain = batched.Framework(np, np.asarray, lambda a, dtype: a.astype(dtype))
    for fw in (plain, batched.Framework(np, np.asarray, plain.astype,
                                        bucket=lambda n: 1 << (max(n, 1) - 1).bit_length())):
        _assert_close(batched.wkv7(fw, *inputs, cu), want, 1e-5)


def test_the_chunked_form_carries_the_state_between_groups_of_chunks_and_through_strong_decays(monkeypatch):
    """With room for one chunk's decays at a time (``DECAY_BUDGET``) each chunk is its own group, the state carried
    between; log-decays down to -40 a token (a chunk's products ``exp(-600)``) neither overflow nor lose the rest."""
    cu = np.array([0, 3 * batched.CHUNK + 5], np.int32)
    plain = batched.Framework(np, np.asarray, lambda a, dtype: a.astype(dtype))
    inputs = _inputs(cu, strongest=40.0)
    whole = batched.wkv7(plain, *inputs, cu)
    _assert_close(whole, kernels.wkv7(*inputs, cu), 1e-5)
    groups, real = [], batched._wkv7_chunks
    monkeypatch.setattr(batched, "DECAY_BUDGET", 1)
    monkeypatch.setattr(batched, "_wkv7_chunks", lambda *args: groups.append(args[2].shape[1]) or real(*args))
    _assert_close(batched.wkv7(plain, *inputs, cu), whole, 1e-6)
    assert groups == [batched.CHUNK] * 4


@pytest.mark.parametrize("backend", sorted(set(BACKENDS) - {"cpu"}))
@pytest.mark.parametrize("cu", CASES.values(), ids=CASES)
def test_native_wkv7_equals_the_numpy_backends(backend, cu):
    """torch, MLX and the JAX plugin run the rule themselves (no host round trip) and give the numpy kernel's
    results; the state given is left as it was."""
    from ferrum.recurrent.rwkv7 import runs_natively

    ops = load_backend(backend).ops
    if backend == "jax" and not runs_natively(ops):
        pytest.skip("the installed JAX plugin predates API 1.30: reinstall plugins/ferrum-jax")
    assert runs_natively(ops)
    inputs = _inputs(cu)
    given = [ops.from_numpy(t, "float32") for t in inputs]
    got = ops.wkv7(*given, cu)
    _assert_close(tuple(ops.to_numpy(t) for t in got), kernels.wkv7(*inputs, cu), 1e-5)
    assert np.array_equal(ops.to_numpy(given[-1]), inputs[-1]), "the state given was changed"
