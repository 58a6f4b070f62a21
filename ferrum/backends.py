"""Finding, probing and loading backend plugins.

Every backend, built-in or third-party, is found the same way: through the
``ferrum.backends`` entry-point group. Each gets its own pluggy
``PluginManager`` so its hook implementations are validated against
:mod:`ferrum.hookspec` and resolved into one :class:`~ferrum.ops.OpsTable`.
A plugin that fails to import is listed with the error and skipped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

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
    api_version: int = hookspec.API_VERSION
    note: str = ""  # how it runs, e.g. a fallback from the device that was asked for
    #: (bits, group_size) pairs of the affine packed form its quantized ops run natively.
    quant_formats: tuple[tuple[int, int], ...] = ()
    #: Compute dtype chosen by default for quantized checkpoints (what its low-bit kernels want).
    quantized_dtype: str | None = None


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


def _new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspec.PROJECT_NAME)
    pm.add_hookspecs(hookspec)
    return pm


def _probe_plugin(name: str, source: str, plugin: Any) -> BackendEntry:
    pm = _new_plugin_manager()
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        return BackendEntry(name, source, BackendProbe(False, reason=f"invalid plugin: {exc}"))
    try:
        probe = pm.hook.backend_probe()
    except Exception as exc:  # a broken probe must not take the runtime down
        return BackendEntry(name, source, BackendProbe(False, reason=f"probe failed: {exc!r}"))
    if not isinstance(probe, BackendProbe):
        probe = BackendProbe(False, reason="plugin implements no backend_probe returning BackendProbe")
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
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in extra or ep.name in entries:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            entries[ep.name] = BackendEntry(
                ep.name, ep.value, BackendProbe(False, reason=f"import failed: {exc!r}")
            )
            continue
        entries[ep.name] = _probe_plugin(ep.name, ep.value, plugin)
    for name, plugin in extra.items():
        entries[name] = _probe_plugin(name, f"registered {type(plugin).__name__}", plugin)
    return sorted(entries.values(), key=lambda e: (not e.available, e.probe.priority, e.name))


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

    entries = {e.name: e for e in discover()}
    name = name or default_backend_name()
    entry = entries.get(name)
    if entry is None:
        known = ", ".join(sorted(entries)) or "none"
        raise BackendError(f"no backend named {name!r}; installed backends: {known}")
    if not entry.available:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {entry.probe.reason}")
    pm = entry.plugin_manager
    assert pm is not None
    ops_plugin = pm.hook.backend_load()
    if ops_plugin is None:
        raise PluginContractError(f"backend {name!r}: backend_load() returned nothing")
    if not pm.is_registered(ops_plugin):
        try:
            pm.register(ops_plugin, name=f"{name}.ops")
        except pluggy.PluginValidationError as exc:
            raise PluginContractError(f"backend {name!r}: {exc}") from exc
    ops = OpsTable.from_plugin_manager(pm, backend_name=name)
    return Backend(name=name, probe=entry.probe, ops=ops, info=ops.info)


@dataclass
class Backend:
    """A loaded backend: its ops table and self-description."""

    name: str
    probe: BackendProbe
    ops: Any  # ferrum.ops.OpsTable
    info: BackendInfo
