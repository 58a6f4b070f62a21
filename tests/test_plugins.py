"""The plugin contract: discovery through entry points, validation, fallbacks, capability flags."""

from __future__ import annotations

import sys
import textwrap
import types

import numpy as np
import pytest

import ferrum_cpu.ops as cpu_ops
from ferrum import backends, hookspec
from ferrum.capabilities import ExecutorCapabilities
from ferrum.errors import BackendUnavailableError, PluginContractError
from ferrum.hookspec import hookimpl
from ferrum.model import DecoderOnlyLLM
from ferrum.sampling import RequestSampler, SamplingParams, build_sampling_batch, sample_numpy

from support import cpu_like_plugin, write_arch_checkpoint

TOKENS = [3, 14, 15, 92, 65, 35, 89, 79]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin_ckpt")
    write_arch_checkpoint(folder, "qwen2")
    return folder


def test_builtin_backends_are_found_through_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=backends.ENTRY_POINT_GROUP)}
    assert {"cpu", "mlx", "cuda"} <= names
    listed = {e.name: e for e in backends.available()}
    assert listed["cpu"].available


def test_automatic_choice_is_metal_then_gpu_then_numpy_then_the_rest():
    devices = {e.name: e.probe.device for e in backends.available() if e.available}
    if devices.get("mlx") == "metal":
        expected = "mlx"
    elif devices.get("cuda", "").startswith("cuda"):
        expected = "cuda"
    else:  # a CPU-only machine: numpy's BLAS beats MLX's CPU matmul and torch's CPU device
        expected = "cpu"
        order = [e.name for e in backends.available() if e.name in ("cpu", "mlx", "cuda") and e.available]
        assert order == [n for n in ("cpu", "mlx", "cuda") if n in devices]
    assert backends.default_backend_name() == expected


def test_a_plugin_installed_through_an_entry_point_is_discovered(tmp_path, monkeypatch):
    (tmp_path / "third_party_backend.py").write_text(
        textwrap.dedent(
            """
            import ferrum_cpu.ops as cpu
            from ferrum import hookimpl
            from ferrum.backends import BackendInfo, BackendProbe

            @hookimpl
            def backend_probe():
                return BackendProbe(available=True, device="cpu", priority=77)

            @hookimpl
            def backend_load():
                return cpu
            """
        )
    )
    dist = tmp_path / "third_party_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ferrum.backends]\nthirdparty = third_party_backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    listed = {e.name: e for e in backends.available()}
    assert listed["thirdparty"].available and listed["thirdparty"].probe.priority == 77
    assert backends.load_backend("thirdparty").ops.native >= set(hookspec.REQUIRED_OPS)


def test_missing_optional_ops_fall_back_and_change_capability_flags(registered, checkpoint):
    natives = {"paged_attention": hookimpl(_native_paged_attention), "sample": hookimpl(_native_sample)}
    registered("full", cpu_like_plugin("full", extra=natives))
    registered("lean", cpu_like_plugin("lean", omit=("embedding", "paged_attention")))
    full = backends.load_backend("full")
    lean = backends.load_backend("lean")
    assert "paged_attention" in full.ops.native and "paged_attention" not in lean.ops.native
    caps_full = ExecutorCapabilities.from_backend(full)
    caps_lean = ExecutorCapabilities.from_backend(lean)
    assert caps_full.paged_attention and caps_full.native_unified_batch
    assert not caps_lean.paged_attention and not caps_lean.native_unified_batch
    assert caps_full.device_sampling and not caps_lean.device_sampling
    # the reference fallbacks compute the same logits
    got_full = DecoderOnlyLLM.from_pretrained(checkpoint, backend=full).forward_verify("x", TOKENS)
    got_lean = DecoderOnlyLLM.from_pretrained(checkpoint, backend=lean).forward_verify("x", TOKENS)
    np.testing.assert_allclose(got_full, got_lean, atol=1e-5)
    greedy = build_sampling_batch([RequestSampler(SamplingParams(), [])])
    assert lean.ops.sample(np.array([[0.0, 2.0, 1.0]], dtype=np.float32), greedy).tokens.tolist() == [1]


def _native_sample(logits, batch):
    """A 'native' op for the test plugin: the reference itself."""
    return sample_numpy(logits, batch)


def _native_paged_attention(q, pool, layer, batch, scale, sliding_window):
    """A 'native' op for the test plugin: the reference composition itself."""
    from ferrum import reference_ops

    return reference_ops.paged_attention(_CpuOps, q, pool, layer, batch, scale, sliding_window)


_CpuOps = types.SimpleNamespace(**{op: getattr(cpu_ops, op) for op in ("kv_gather", "attention", "take_rows", "concat", "from_numpy")})


def test_an_implementation_taking_fewer_arguments_is_adapted(registered, checkpoint):
    @hookimpl
    def attention(q, k, v, scale):  # no sliding_window: forward-compatible subset
        return cpu_ops.attention(q, k, v, scale, None)

    registered("subset", cpu_like_plugin("subset", omit=("paged_attention",), extra={"attention": attention}))
    backend = backends.load_backend("subset")
    assert not backend.ops.accepts("attention", "sliding_window")
    assert not ExecutorCapabilities.from_backend(backend).sliding_window
    ref = DecoderOnlyLLM.from_pretrained(checkpoint, backend="cpu").forward_verify("x", TOKENS)
    np.testing.assert_allclose(
        DecoderOnlyLLM.from_pretrained(checkpoint, backend=backend).forward_verify("x", TOKENS), ref, atol=1e-5
    )


def test_sliding_window_model_refused_by_a_backend_without_it(registered, tmp_path):
    @hookimpl
    def attention(q, k, v, scale):
        return cpu_ops.attention(q, k, v, scale, None)

    write_arch_checkpoint(tmp_path, "mistral")
    registered("nowindow", cpu_like_plugin("nowindow", omit=("paged_attention",), extra={"attention": attention}))
    from ferrum.errors import UnsupportedFeatureError

    with pytest.raises(UnsupportedFeatureError, match="sliding-window"):
        DecoderOnlyLLM.from_pretrained(tmp_path, backend="nowindow")


def test_missing_required_op_is_named(registered):
    registered("broken", cpu_like_plugin("broken", omit=("rope",)))
    with pytest.raises(PluginContractError, match="'rope'"):
        backends.load_backend("broken")


def test_a_misspelt_op_is_named_not_left_to_fall_back(registered):
    """pluggy takes a hook no spec names and never calls it: ``add_rms_nrom`` loaded, and add_rms_norm quietly
    ran the core's reference. (A plugin declaring a later minor may implement ops this Ferrum does not know:
    those are not named.)"""
    from ferrum.hookspec import hookimpl

    misspelt = hookimpl(lambda x, residual, weight, eps: (x, x))
    registered("typo", cpu_like_plugin("typo", omit=("add_rms_norm",), extra={"add_rms_nrom": misspelt}))
    with pytest.warns(UserWarning, match="implements hooks no op of Ferrum's plugin API .* names: add_rms_nrom"):
        backends.load_backend("typo")


def test_invalid_or_failing_plugins_are_listed_not_fatal(registered):
    @hookimpl
    def linear(x, weight, bias, surprise):  # an argument the spec does not have
        return x

    registered("badsig", cpu_like_plugin("badsig", extra={"linear": linear}))

    class Exploding:
        @hookimpl
        def backend_probe(self):
            raise RuntimeError("driver on fire")

    registered("exploding", Exploding())
    listed = {e.name: e for e in backends.available()}
    assert not listed["badsig"].available and "surprise" in listed["badsig"].probe.reason
    assert not listed["exploding"].available and "driver on fire" in listed["exploding"].probe.reason
    assert listed["cpu"].available
    with pytest.raises(BackendUnavailableError, match="driver on fire"):
        backends.load_backend("exploding")


def test_ops_table_calls_plugin_functions_directly():
    table = backends.load_backend("cpu").ops
    assert table.linear is cpu_ops.linear  # no pluggy, no wrapper on the hot path
    assert "sample" not in table.native  # the core's fallback fills what the plugin leaves out
    assert sys.modules["ferrum_cpu.ops"] is cpu_ops


def _install_entry_points(tmp_path, monkeypatch, dist_name: str, modules: dict[str, str]) -> None:
    """Fake an installed distribution whose ``ferrum.backends`` entry points are ``modules`` (name -> source)."""
    lines = []
    for name, source in modules.items():
        (tmp_path / f"{dist_name}_{name}.py").write_text(textwrap.dedent(source))
        lines.append(f"{name} = {dist_name}_{name}")
    dist = tmp_path / f"{dist_name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ferrum.backends]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_plugins_that_exit_hang_or_shadow_a_builtin_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "PROBE_TIMEOUT_S", 1.0)
    probe_ok = """
        import ferrum_cpu.ops as cpu
        from ferrum import hookimpl
        from ferrum.backends import BackendProbe

        @hookimpl
        def backend_probe():
            return BackendProbe(available=True, device="cpu", priority=1)

        @hookimpl
        def backend_load():
            return cpu
    """
    _install_entry_points(tmp_path, monkeypatch, "rogue", {
        "exits": "import sys\nsys.exit(3)\n",
        "hangs": "import time\ntime.sleep(30)\n",
        "cpu": probe_ok,  # claims a built-in's name
    })
    with pytest.warns(UserWarning, match="backend name 'cpu' is registered by rogue"):
        listed = {e.name: e for e in backends.available()}
    assert not listed["exits"].available and "SystemExit" in listed["exits"].probe.reason
    assert not listed["hangs"].available and "did not return within 1s" in listed["hangs"].probe.reason
    assert listed["cpu"].source == "ferrum_cpu"  # the built-in is used
    assert backends.load_backend("cpu").name == "cpu"
    # the hung import is not waited on again: each discovery waited the timeout and left one more thread behind
    import threading

    def stuck() -> int:
        return sum(t.name == "ferrum-probe import" and t.is_alive() for t in threading.enumerate())

    before = stuck()
    again = {e.name: e for e in backends.available()}  # (the name clash was said once)
    assert "not waited on again" in again["hangs"].probe.reason and stuck() == before >= 1


def test_automatic_choice_falls_back_when_the_first_backend_cannot_load(registered):
    class LoadsBadly:
        @hookimpl
        def backend_probe(self):
            return backends.BackendProbe(available=True, device="cpu", priority=-100)  # ranked first

        @hookimpl
        def backend_load(self):
            raise OSError("libdriver.so: cannot open shared object file")

    registered("fragile", LoadsBadly())
    assert backends.available()[0].name == "fragile"
    with pytest.raises(BackendUnavailableError, match="libdriver.so"):
        backends.load_backend("fragile")
    assert backends.load_backend().name != "fragile"


@pytest.mark.parametrize("failure", ["backend_load exits", "backend_info raises"])
def test_a_plugin_failing_at_load_is_named_and_skipped_not_fatal(registered, failure):
    """A plugin's ``sys.exit()`` in backend_load, or a backend_info() that raises (a device lost at start-up),
    is that backend failing to load: named, and the automatic choice goes on to the next backend."""
    def exits():
        raise SystemExit("cuda init failed")

    @hookimpl
    def backend_info():
        raise RuntimeError("FancyAccel driver: device lost")

    plugin = cpu_like_plugin("fragile", extra={"backend_info": backend_info})
    if failure == "backend_load exits":
        plugin = cpu_like_plugin("fragile")
        plugin.backend_load = hookimpl(exits)
    plugin.backend_probe = hookimpl(lambda: backends.BackendProbe(available=True, device="cpu", priority=-100))
    registered("fragile", plugin)
    with pytest.raises(BackendUnavailableError, match="cuda init failed|device lost") as caught:
        backends.load_backend("fragile")
    assert "'fragile'" in str(caught.value)
    assert backends.load_backend().name != "fragile"


@pytest.mark.parametrize("declared", ["1.10", None, "1.11"])
def test_a_plugin_written_before_1_11_never_samples_what_1_11_reads_otherwise(registered, declared):
    """API 1.11 measures top-p within the top-k and adds a bias before the penalty scales it; a plugin declaring
    an older minor (or none) wrote its sample for the old meanings, so the core samples those batches itself,
    and the plugin keeps every other batch. One declaring 1.11 gets them all."""
    from dataclasses import replace

    seen = []

    @hookimpl
    def sample(logits, batch):
        seen.append(bool(((batch.top_k > 0) & (batch.top_p < 1)).any() or batch.adjust_offset.any()))
        return sample_numpy(cpu_ops.to_numpy(logits), batch)

    @hookimpl
    def backend_info():
        return replace(cpu_ops.backend_info(), name="older", api_version=declared)

    registered("older", cpu_like_plugin("older", extra={"sample": sample, "backend_info": backend_info}))
    ops = backends.load_backend("older").ops
    logits = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32)
    cases = [SamplingParams(temperature=1.0, top_k=5, top_p=0.5, seed=1),
             SamplingParams(repetition_penalty=1.5, logit_bias={2: 3.0}, logprobs=2),
             SamplingParams(temperature=1.0, top_p=0.5, seed=1), SamplingParams(temperature=1.0, top_k=5, seed=1)]
    for params in cases:
        batch = build_sampling_batch([RequestSampler(params, [1, 2, 3])])
        got = ops.sample(ops.from_numpy(logits, "float32"), batch)
        assert got.tokens.tolist() == sample_numpy(logits, batch).tokens.tolist()
    assert seen == ([True, True] if declared == "1.11" else []) + [False, False]


def test_weights_only_a_plugins_products_read_go_through_its_upload_weight(registered, tmp_path):
    """``upload_weight``'s result is only handed back to the plugin's own linear and embedding, so it may be any
    layout; gpt-oss's attention sinks, which attention reads as an array, come from from_numpy (they went
    through upload_weight and then cast, which a wrapped layout broke)."""
    from ferrum.random_checkpoint import write_random_checkpoint
    from ferrum.testing.family_checks import FAMILY_MODELS

    class Laid:
        def __init__(self, array):
            self.array, self.nbytes = array, array.nbytes

    @hookimpl
    def upload_weight(name, array, dtype):
        return Laid(cpu_ops.from_numpy(array, dtype))

    @hookimpl
    def linear(x, weight, bias):
        return cpu_ops.linear(x, weight.array, bias)

    @hookimpl
    def embedding(weight, ids):
        return cpu_ops.take_rows(weight.array, ids)

    registered("laid", cpu_like_plugin("laid", omit=("split",), extra={
        "upload_weight": upload_weight, "linear": linear, "embedding": embedding}))
    folder = write_random_checkpoint(tmp_path / "gpt_oss", FAMILY_MODELS["gpt_oss"], dtype="float32", std=0.2)
    laid = DecoderOnlyLLM.from_pretrained(folder, backend="laid", dtype="float32")
    plain = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32")
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    np.testing.assert_allclose(laid.forward_verify("x", tokens), plain.forward_verify("y", tokens), atol=1e-5)
