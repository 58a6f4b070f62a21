"""``pytest --ferrum-backend NAME`` (Ferrum's pytest11 plugin): one well-named item per check, and a
broken backend fails exactly the items that exercise its bug. Runs pytest in a subprocess, as a
plugin author's CI would."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ferrum.testing.pytest_plugin import item_name

#: A backend whose rope turns the wrong way, registered by the temp project's conftest.
CONFTEST = textwrap.dedent(
    """
    import types

    import numpy as np

    import ferrum_cpu.ops as cpu_ops
    from ferrum import backends, hookimpl, hookspec
    from ferrum.backends import BackendProbe

    ops = types.SimpleNamespace(**{op: getattr(cpu_ops, op) for op in hookspec.REQUIRED_OPS + hookspec.OPTIONAL_OPS
                                   if hasattr(cpu_ops, op)})
    ops.rope = hookimpl(lambda x, positions, inv_freq: cpu_ops.rope(x, -np.asarray(positions), inv_freq))
    ops.backend_probe = hookimpl(lambda: BackendProbe(True, device="cpu", priority=99))
    ops.backend_load = hookimpl(lambda: ops)
    backends.register_plugin("broken", ops)
    """
)


def _pytest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", *args]
    return subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _outcomes(output: str) -> dict[str, str]:
    """``{node id: PASSED|FAILED}`` from pytest's ``-rA`` summary."""
    rows = {}
    for line in output.splitlines():
        outcome, _, rest = line.partition(" ")
        if outcome in ("PASSED", "FAILED"):
            rows[rest.split(" - ")[0]] = outcome
    return rows


def test_item_names_say_op_variant_and_dtype():
    assert item_name("quantized_linear 4-bit g32 (native)", "float32") == "quantized_linear-4-bit-g32-native[float32]"
    assert item_name("kv_write / kv_gather", "bfloat16") == "kv_write-kv_gather[bfloat16]"


def test_items_are_one_per_check_and_shape(tmp_path):
    done = _pytest(tmp_path, "--ferrum-backend", "cpu", "--collect-only")
    assert done.returncode == 0, done.stdout + done.stderr
    ids = [line for line in done.stdout.splitlines() if line.startswith("ferrum-conformance[cpu]::")]
    names = {i.split("::", 1)[1] for i in ids}
    assert len(names) == len(ids) >= 60
    assert {"rope[float32]", "attention-q5-kv11-h14-kvh2-d48[float32]", "attention-q1-kv9-h4-kvh4-d32[float32]",
            "paged_attention-native[float32]", "quantized_linear-3-bit-g64-core-fallback[float32]",
            "model-logits-and-16-greedy-tokens[float32]", "sample-core-fallback[float32]"} <= names
    assert f"{len(ids)} tests collected" in done.stdout


def test_a_broken_backend_fails_the_right_items(tmp_path):
    done = _pytest(tmp_path, "--ferrum-backend", "broken", "-k", "rope or silu_mul or attention-q or model-logits")
    outcomes = _outcomes(done.stdout)
    prefix = "ferrum-conformance[broken]::"
    assert outcomes == {
        f"{prefix}rope[float32]": "FAILED",
        f"{prefix}rope-at-positions-bfloat16-cannot-hold[float32]": "FAILED",
        f"{prefix}model-logits-and-16-greedy-tokens[float32]": "FAILED",
        f"{prefix}silu_mul[float32]": "PASSED",
        f"{prefix}attention-q5-kv11-h14-kvh2-d48[float32]": "PASSED",
        f"{prefix}attention-q3-kv3-h6-kvh1-d16[float32]": "PASSED",
        f"{prefix}attention-q1-kv9-h4-kvh4-d32[float32]": "PASSED",
    }, done.stdout
    assert done.returncode == 1
    assert "broken float32, rope: differs from the oracle: scaled error" in done.stdout


@pytest.mark.parametrize("args, message", [
    (("--ferrum-backend", "nosuch"), "no backend named 'nosuch'"),
    (("--ferrum-backend", "broken", "--ferrum-dtype", "bfloat16"), "computes in float32, not 'bfloat16'"),
])
def test_what_cannot_run_is_one_failing_item_saying_why(tmp_path, args, message):
    done = _pytest(tmp_path, *args)
    assert done.returncode == 1 and message in done.stdout
    assert len(_outcomes(done.stdout)) == 1


def test_a_dtype_the_backend_lacks_is_skipped_beside_one_it_has(tmp_path):
    """The documented CI line (float32 and bfloat16) passes a float32-only plugin on its float32 checks."""
    done = _pytest(tmp_path, "--ferrum-backend", "broken", "--ferrum-dtype", "float32", "--ferrum-dtype", "bfloat16",
                   "-k", "silu_mul or dtype")
    assert _outcomes(done.stdout) == {"ferrum-conformance[broken]::silu_mul[float32]": "PASSED"}, done.stdout
    assert "1 passed, 1 skipped" in done.stdout and "computes in float32, not 'bfloat16'" in done.stdout
    assert done.returncode == 0


def test_without_the_option_it_adds_nothing(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    done = _pytest(tmp_path)
    assert done.returncode == 0 and _outcomes(done.stdout) == {"test_one.py::test_one": "PASSED"}
