"""The versioned plugin contract: another major API version is refused with a clear message, minor
versions stay compatible, and ``ferrum backends --verbose`` says which ops run natively."""

from __future__ import annotations

import warnings

import pytest

import ferrum_cpu.ops as cpu_ops
from ferrum import backends, hookspec
from ferrum.backends import BackendInfo, BackendProbe, parse_api_version
from ferrum.cli import main
from ferrum.errors import BackendUnavailableError, PluginContractError
from ferrum.hookspec import hookimpl

from support import cpu_like_plugin

MAJOR, MINOR = parse_api_version(hookspec.API_VERSION)


def _written_for(name: str, version, declare_in_probe: bool):
    """A numpy-delegating plugin that reports ``version`` in its probe or only in backend_info."""

    @hookimpl
    def backend_probe():
        return BackendProbe(True, device="cpu", priority=99, api_version=version if declare_in_probe else None)

    @hookimpl
    def backend_info():
        return BackendInfo(name, "cpu", ("float32",), "float32", api_version=version)

    return cpu_like_plugin(name, extra={"backend_probe": backend_probe, "backend_info": backend_info})


def test_the_version_is_major_dot_minor():
    assert hookspec.API_VERSION == f"{MAJOR}.{MINOR}"
    assert parse_api_version(1) == (1, 0)  # plugins from before minor versions reported an integer
    with pytest.raises(PluginContractError, match="not \"MAJOR.MINOR\""):
        parse_api_version("one")


def test_a_plugin_for_another_major_version_is_listed_as_refused_without_loading(registered):
    registered("future", _written_for("future", f"{MAJOR + 1}.0", declare_in_probe=True))
    entry = {e.name: e for e in backends.available()}["future"]
    assert not entry.available
    assert f"written for Ferrum plugin API {MAJOR + 1}.0, but this Ferrum speaks {hookspec.API_VERSION}" in entry.probe.reason
    with pytest.raises(BackendUnavailableError, match=rf"Install a release of the plugin built for API {MAJOR}\.x"):
        backends.load_backend("future")


def test_a_plugin_declaring_its_version_only_in_backend_info_is_refused_at_load(registered):
    registered("past", _written_for("past", MAJOR - 1, declare_in_probe=False))
    with pytest.raises(PluginContractError, match=rf"backend 'past' is refused: it was written for Ferrum plugin "
                                                  rf"API {MAJOR - 1}\.0"):
        backends.load_backend("past")


def test_a_version_written_as_a_float_is_refused():
    with pytest.raises(PluginContractError, match="is a number, which cannot say 1.10 from 1.1"):
        backends.parse_api_version(1.10)


def test_a_malformed_version_is_refused_with_what_to_write(registered):
    registered("garbled", _written_for("garbled", "v1", declare_in_probe=False))
    with pytest.raises(PluginContractError, match="backend 'garbled': backend_info\\(\\): api_version 'v1'"):
        backends.load_backend("garbled")


@pytest.mark.parametrize("version", [f"{MAJOR}.0", f"{MAJOR}.{MINOR + 5}", MAJOR])
def test_other_minor_versions_load(registered, version):
    plugin = _written_for("minor", version, declare_in_probe=True)
    plugin.op_from_a_later_minor = hookimpl(lambda x: x)  # a hook this Ferrum has no spec for: never called
    registered("minor", plugin)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        backend = backends.load_backend("minor")
    assert backend.info.api_version == version
    assert not hasattr(backend.ops, "op_from_a_later_minor")
    # named where the plugin declares no later minor, whose op it could be: a misspelling then
    named = [str(w.message) for w in seen if "op_from_a_later_minor" in str(w.message)]
    assert bool(named) == (version != f"{MAJOR}.{MINOR + 5}"), named


def test_backends_verbose_lists_native_and_fallback_per_op(registered, capsys):
    @hookimpl
    def add_rms_norm(x, residual, weight, eps):
        summed = x + residual
        return cpu_ops.rms_norm(summed, weight, eps), summed

    @hookimpl
    def attention(q, k, v, scale, sliding_window):  # no softcap nor sinks: a plugin of an older minor
        return cpu_ops.attention(q, k, v, scale, sliding_window)

    registered("fused", cpu_like_plugin("fused", omit=("paged_attention",),
                                        extra={"add_rms_norm": add_rms_norm, "attention": attention}))
    assert main(["backends", "--verbose"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  fused: "))
    assert lines[start + 1].strip() == f"plugin API {hookspec.API_VERSION} (this Ferrum speaks {hookspec.API_VERSION}); ops:"
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("      "):
            break
        op, source = line.split(maxsplit=1)
        rows[op] = source
    assert list(rows) == list(hookspec.REQUIRED_OPS + hookspec.OPTIONAL_OPS)
    assert rows["add_rms_norm"] == "native" and rows["linear"] == "native"
    assert rows["attention"] == "native, without softcap, sinks, alibi_slopes"
    assert rows["paged_attention"] == "core fallback" and rows["sample"] == "core fallback"
    assert main(["backends"]) == 0
    assert "core fallback" not in capsys.readouterr().out
