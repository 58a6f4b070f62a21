"""Finding, probing and loading backend plugins.

Every backend, built-in or third-party, is found the same way: through the
``ferrum.backends`` entry-point group. Each gets its own pluggy
``PluginManager`` so its hook implementations are validated against
:mod:`ferrum.hookspec` and resolved into one :class:`~ferrum.ops.OpsTable`.
A plugin that fails to import is listed with the error and skipped.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable

import pluggy

from ferrum import hookspec
from ferrum.errors import BackendError, BackendUnavailableError, PluginContractError

ENTRY_POINT_GROUP = "ferrum.backends"


@dataclass(frozen=True)
class BackendProbe:
    """A plugin's cheap answer to "can I run here?"."""

    available: bool
    device: str = ""
    reason: str = ""  # why unavailable, or a note on how it will run
    priority: int = 50  # automatic choice takes the lowest available
    #: The automatic choice's order for quantized checkpoints, where it differs from ``priority``.
    quantized_priority: int | None = None
    #: The plugin API version the plugin was written for (``hookspec.API_VERSION`` of its time);
    #: declaring it here lets discovery refuse an incompatible plugin before loading it.
    api_version: int | str | None = None

    @property
    def quantized_order(self) -> int:
        return self.priority if self.quantized_priority is None else self.quantized_priority


@dataclass(frozen=True)
class BackendInfo:
    """What a loaded backend reports about itself (see ``hookspec.backend_info``)."""

    name: str
    device: str
    dtypes: tuple[str, ...]
    default_dtype: str
    memory_bytes: int | None = None
    max_batch: int | None = None
    #: The plugin API version it was written for, as a literal ("1.11"); None: not declared (the conformance kit
    #: fails that; loading reads it as the first minor wherever a later one refined an op's meaning).
    api_version: int | str | None = None
    note: str = ""  # how it runs, e.g. a fallback from the device that was asked for
    #: (bits, group_size) pairs of the affine packed form its quantized ops run natively.
    quant_formats: tuple[tuple[int, int], ...] = ()
    #: Compute dtype chosen by default for quantized checkpoints (what its low-bit kernels want).
    quantized_dtype: str | None = None
    #: Whether a step runs apart from the thread that issues it (a GPU; MLX's own evaluation thread on
    #: a CPU), so the engine's asynchronous stepping overlaps host work with it. None: judged from
    #: ``device`` (anything but ``"cpu"``).
    computes_apart: bool | None = None


@dataclass
class BackendEntry:
    """One discovered plugin, loaded or not."""

    name: str
    source: str  # "module:attr" of the entry point
    probe: BackendProbe
    plugin_manager: pluggy.PluginManager | None = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return self.probe.available


def parse_api_version(version: int | str) -> tuple[int, int]:
    """``"1.3"`` -> ``(1, 3)``; a bare integer (plugins from before minor versions) is ``(N, 0)``."""
    if isinstance(version, float):
        raise PluginContractError(f"api_version {version!r} is a number, which cannot say 1.10 from 1.1; write it "
                                  f"as a string, e.g. {hookspec.API_VERSION!r}")
    try:
        if isinstance(version, int) and not isinstance(version, bool):
            return version, 0
        major, minor = str(version).split(".")
        return int(major), int(minor)
    except (TypeError, ValueError):
        raise PluginContractError(
            f"api_version {version!r} is not \"MAJOR.MINOR\"; set it to the literal version of the Ferrum the "
            f"plugin was written for (this one speaks {hookspec.API_VERSION!r})"
        ) from None


def declared_version(info: "BackendInfo") -> tuple[int, int]:
    """The API version a loaded plugin was written for; one that declares none counts as ``(major, 0)``."""
    if info.api_version is None:
        return parse_api_version(hookspec.API_VERSION)[0], 0
    return parse_api_version(info.api_version)


def api_incompatibility(version: int | str | None) -> str | None:
    """Why a plugin written for plugin API ``version`` cannot run on this Ferrum, or ``None`` if it can.

    Only the major version must match: minor versions add optional ops and record fields, which an
    older plugin leaves to the core's fallbacks and a newer one implements without their being called
    (where a minor refined an existing op's meaning, the ops table sends what an older plugin would read
    the old way to the core's reference). An undeclared version (None) is not refused here.
    """
    if version is None:
        return None
    major, minor = parse_api_version(version)
    ours = parse_api_version(hookspec.API_VERSION)[0]
    if major == ours:
        return None
    return (
        f"it was written for Ferrum plugin API {major}.{minor}, but this Ferrum speaks "
        f"{hookspec.API_VERSION}; a different major version changes hooks incompatibly. Install a "
        f"release of the plugin built for API {ours}.x, or a Ferrum speaking {major}.x (docs/plugins.md "
        f"lists what changed)"
    )


def _new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspec.PROJECT_NAME)
    pm.add_hookspecs(hookspec)
    return pm


#: Seconds a plugin's import plus probe may take before it is reported as hanging and skipped.
PROBE_TIMEOUT_S = float(os.environ.get("FERRUM_PROBE_TIMEOUT", "60"))


class _PluginFault(Exception):
    """A plugin's import or probe raised (even SystemExit), or did not return in time."""


class _PluginHung(_PluginFault):
    """A plugin's import or probe did not return in time; its thread runs on."""


#: (backend name, source) -> why: an import or probe that hung, which no later discovery in this process waits on
#: again (each waited the whole timeout, once per backend ``ferrum backends`` listed, and left a thread behind).
_hung: dict[tuple[str, str], str] = {}


def _guarded_once(name: str, source: str, what: str, call: Callable[[], Any]) -> Any:
    """:func:`_guarded`, except for a plugin whose import or probe already hung in this process."""
    reason = _hung.get((name, source))
    if reason is not None:
        raise _PluginFault(reason)
    try:
        return _guarded(what, call)
    except _PluginHung as exc:
        _hung[(name, source)] = f"{exc} (not waited on again in this process)"
        raise


def _guarded(what: str, call: Callable[[], Any]) -> Any:
    """Run a plugin's code in a daemon thread with a time limit; whatever it raises becomes a _PluginFault.

    A hung import cannot be killed, but Ferrum stops waiting for it and goes on with the other backends.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # SystemExit / KeyboardInterrupt from plugin code included
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"ferrum-probe {what}", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    if thread.is_alive():
        raise _PluginHung(f"{what} did not return within {PROBE_TIMEOUT_S:g}s (FERRUM_PROBE_TIMEOUT); skipped")
    if "error" in outcome:
        raise _PluginFault(f"{what} failed: {outcome['error']!r}")
    return outcome["value"]


def _probe_plugin(name: str, source: str, plugin: Any) -> BackendEntry:
    pm = _new_plugin_manager()
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        return BackendEntry(name, source, BackendProbe(False, reason=f"invalid plugin: {exc}"))
    try:
        probe = _guarded_once(name, source, "probe", pm.hook.backend_probe)
    except _PluginFault as exc:  # a broken probe must not take the runtime down
        return BackendEntry(name, source, BackendProbe(False, reason=str(exc)))
    if not isinstance(probe, BackendProbe):
        probe = BackendProbe(False, reason="plugin implements no backend_probe returning BackendProbe")
    elif probe.api_version is not None:
        try:
            refusal = api_incompatibility(probe.api_version)
        except PluginContractError as exc:
            refusal = str(exc)
        if refusal:
            return BackendEntry(name, source, BackendProbe(False, probe.device, refusal, probe.priority))
    return BackendEntry(name, source, probe, pm)


_lock = threading.Lock()
_extra_plugins: dict[str, Any] = {}


def register_plugin(name: str, plugin: Any) -> None:
    """Make ``plugin`` discoverable in this process without installing a package.

    Meant for tests and notebooks; ``unregister_plugin`` undoes it. An
    installed entry point of the same name is shadowed while registered.
    """
    with _lock:
        _extra_plugins[name] = plugin


def unregister_plugin(name: str) -> None:
    with _lock:
        _extra_plugins.pop(name, None)


def discover() -> list[BackendEntry]:
    """All backends: entry points plus in-process registrations, probed."""
    with _lock:
        extra = dict(_extra_plugins)
    entries: dict[str, BackendEntry] = {}
    for ep in _unique_entry_points():
        if ep.name in extra:
            continue
        try:
            plugin = _guarded_once(ep.name, ep.value, "import", ep.load)
        except _PluginFault as exc:
            entries[ep.name] = BackendEntry(ep.name, ep.value, BackendProbe(False, reason=str(exc)))
            continue
        entries[ep.name] = _probe_plugin(ep.name, ep.value, plugin)
    for name, plugin in extra.items():
        entries[name] = _probe_plugin(name, f"registered {type(plugin).__name__}", plugin)
    return sorted(entries.values(), key=lambda e: (not e.available, e.probe.priority, e.name))


_warned_clashes: set[tuple[str, str]] = set()


def _unique_entry_points() -> list[Any]:
    """One entry point per backend name; Ferrum's built-ins win a clash, with a warning naming the loser."""
    by_name: dict[str, list[Any]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        by_name.setdefault(ep.name, []).append(ep)
    chosen = []
    for name, eps in by_name.items():
        eps.sort(key=lambda ep: _distribution(ep) != hookspec.PROJECT_NAME)
        for loser in eps[1:]:
            if loser.value != eps[0].value and (name, loser.value) not in _warned_clashes:
                _warned_clashes.add((name, loser.value))
                warnings.warn(
                    f"backend name {name!r} is registered by {_distribution(loser) or loser.value} and by "
                    f"{_distribution(eps[0]) or eps[0].value}; using {eps[0].value}. Rename one of them",
                    stacklevel=3,
                )
        chosen.append(eps[0])
    return chosen


def _distribution(ep: Any) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else dist.metadata["Name"]


def available() -> list[BackendEntry]:
    """Every discovered backend, best automatic choice first, with availability."""
    return discover()


def default_backend_name() -> str:
    """MLX with Metal, then CUDA with a GPU, then numpy, MLX on the CPU, torch on the CPU (by probe priority)."""
    for entry in discover():
        if entry.available:
            return entry.name
    raise BackendUnavailableError(
        "no backend can run here; install one, e.g. `pip install ferrum[mlx]`, "
        "and check `ferrum backends` for reasons"
    )


def backend_for_format(bits: int, group_size: int) -> "Backend":
    """The automatic choice for a quantized checkpoint: the first available backend, in
    quantized order (``BackendProbe.quantized_order``), whose kernels run ``(bits, group_size)``
    natively; else the first one in that order.

    Probes cannot say this without importing frameworks, so candidates are loaded
    (each once per process) until one declares the format.
    """
    first = None
    for entry in sorted(discover(), key=lambda e: (not e.available, e.probe.quantized_order, e.name)):
        if not entry.available:
            continue
        try:
            backend = load_backend(entry.name)
        except BackendError:
            continue
        if (bits, group_size) in backend.info.quant_formats:
            return backend
        first = first or backend
    return first or load_backend(None)


def load_backend(name: str | None = None) -> "Backend":
    """Load a backend by name (or the default) and resolve its ops table."""
    from ferrum.ops import OpsTable

    if name is None:
        return _first_loadable()
    entries = {e.name: e for e in discover()}
    entry = entries.get(name)
    if entry is None:
        known = ", ".join(sorted(entries)) or "none"
        raise BackendError(f"no backend named {name!r}; installed backends: {known}")
    if not entry.available:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {entry.probe.reason}")
    pm = entry.plugin_manager
    assert pm is not None
    try:
        ops_plugin = pm.hook.backend_load()
    except (Exception, SystemExit) as exc:  # a plugin's sys.exit() must not end the caller's process
        raise BackendUnavailableError(f"backend {name!r} failed to load: {type(exc).__name__}: {exc}") from exc
    if ops_plugin is None:
        raise PluginContractError(f"backend {name!r}: backend_load() returned nothing")
    if not pm.is_registered(ops_plugin):
        try:
            pm.register(ops_plugin, name=f"{name}.ops")
        except pluggy.PluginValidationError as exc:
            raise PluginContractError(f"backend {name!r}: {exc}") from exc
    ops = OpsTable.from_plugin_manager(pm, backend_name=name)
    try:
        refusal = api_incompatibility(ops.info.api_version)
    except PluginContractError as exc:
        raise PluginContractError(f"backend {name!r}: backend_info(): {exc}") from None
    if refusal:
        raise PluginContractError(f"backend {name!r} is refused: {refusal}")
    _warn_unknown_hooks(name, pm, ops.info.api_version)
    ops.keep_older_meanings()
    return Backend(name=name, probe=entry.probe, ops=ops, info=ops.info)


def _warn_unknown_hooks(name: str, pm: pluggy.PluginManager, version: int | str | None) -> None:
    """Name the hooks no op of this contract names, where the plugin declares no later minor (whose new ops they
    would be, never called here, as versioning intends): a misspelt op is otherwise never called and its op
    quietly runs the core's reference."""
    if version is not None and parse_api_version(version) > parse_api_version(hookspec.API_VERSION):
        return
    unknown = sorted(hook for hook, caller in vars(pm.hook).items() if getattr(caller, "spec", True) is None)
    if unknown:
        warnings.warn(f"backend {name!r} implements hooks no op of Ferrum's plugin API {hookspec.API_VERSION} names: "
                      f"{', '.join(unknown)}; they are never called (see ferrum.hookspec for the ops' names)",
                      stacklevel=3)


def _first_loadable() -> "Backend":
    """The automatic choice: the best available backend that actually loads, the reasons of those that did not."""
    reasons = []
    for entry in discover():
        if not entry.available:
            continue
        try:
            return load_backend(entry.name)
        except BackendError as exc:
            reasons.append(str(exc))
    raise BackendUnavailableError(
        "no backend can run here" + (f" ({'; '.join(reasons)})" if reasons else "")
        + "; install one, e.g. `pip install ferrum[mlx]`, and check `ferrum backends` for reasons"
    )


@dataclass
class Backend:
    """A loaded backend: its ops table and self-description."""

    name: str
    probe: BackendProbe
    ops: Any  # ferrum.ops.OpsTable
    info: BackendInfo
