"""The ops table: a backend's hook implementations resolved once into plain callables.

Going through pluggy costs a few microseconds per call; a decode step makes
hundreds of op calls. So the table is built once when a backend is loaded:
each attribute is the plugin's own function (or a tiny adapter when the
implementation takes a subset of the spec's arguments), or the core's
reference composition from :mod:`ferrum.reference_ops` for an optional op the
plugin leaves out.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import pluggy

from ferrum import hookspec, reference_ops
from ferrum.errors import BackendUnavailableError, PluginContractError


def _adapt(fn: Callable, impl_args: tuple[str, ...], spec_args: tuple[str, ...]) -> Callable:
    """Call ``fn`` positionally with only the spec arguments it declares. A caller may leave out trailing
    feature arguments (``softcap``, ``sinks``...), as it may with an implementation that defaults them."""
    if impl_args == spec_args:
        return fn
    picks = tuple(spec_args.index(a) for a in impl_args)

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        return fn(*[args[i] for i in picks if i < len(args)])

    return call


def _unless_refined(own: Callable, reference: Callable) -> Callable:
    """``own`` sampling, except for batches API 1.11 reads otherwise (top-p within a top-k, a bias before a
    penalty), which ``reference`` samples."""
    def sample(logits: Any, batch: Any) -> Any:
        refined = ((batch.top_k > 0) & (batch.top_p < 1)).any() or batch.adjust_offset.any()
        return reference(logits, batch) if refined else own(logits, batch)

    return sample


class OpsTable:
    """Attribute access to every op of :mod:`ferrum.hookspec`, resolved once.

    ``native`` names the ops the plugin implements itself; ``accepts(op, arg)``
    tells whether its implementation takes a given argument. Both feed
    :class:`ferrum.capabilities.ExecutorCapabilities`.
    """

    def __init__(self, backend_name: str):
        self.backend_name = backend_name
        self.native: frozenset[str] = frozenset()
        self._impl_args: dict[str, tuple[str, ...]] = {}
        self.info: Any = None
        #: The core's reference composition of every optional op, bound to this table,
        #: also where the plugin implements the op (quantized weights it declines use them).
        self.fallback: dict[str, Callable] = {
            name: functools.partial(getattr(reference_ops, name), self) for name in hookspec.OPTIONAL_OPS
        }

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager, backend_name: str) -> "OpsTable":
        table = cls(backend_name)
        native = set()
        for name in hookspec.REQUIRED_OPS + hookspec.OPTIONAL_OPS:
            caller = getattr(pm.hook, name)
            impls = caller.get_hookimpls()
            if impls:
                impl = impls[-1]  # pluggy calls the last registered first
                spec_args = tuple(caller.spec.argnames)
                # A spec argument the implementation takes with a default still counts as taken,
                # so a plugin can add a feature argument and keep older direct callers working.
                impl_args = tuple(impl.argnames) + tuple(a for a in impl.kwargnames if a in spec_args)
                setattr(table, name, _adapt(impl.function, impl_args, spec_args))
                table._impl_args[name] = impl_args
                native.add(name)
            elif name in hookspec.OPTIONAL_OPS:
                setattr(table, name, table.fallback[name])
            else:
                raise PluginContractError(
                    f"backend {backend_name!r} does not implement required op {name!r}; "
                    f"see ferrum.hookspec.{name} for its contract"
                )
        table.native = frozenset(native)
        try:
            table.info = table.backend_info()
        except Exception as exc:  # the plugin's own failure (a device lost at start-up): named, not a crash
            raise BackendUnavailableError(
                f"backend {backend_name!r}: backend_info() failed: {type(exc).__name__}: {exc}") from exc
        from ferrum.backends import BackendInfo

        if not isinstance(table.info, BackendInfo):
            raise PluginContractError(
                f"backend {backend_name!r}: backend_info() must return ferrum.backends.BackendInfo, "
                f"got {type(table.info).__name__}"
            )
        return table

    def keep_older_meanings(self) -> None:
        """A plugin written before API 1.11 samples top-p over the whole vocabulary and knows no
        ``adjust_offset``: the batches whose rows 1.11 reads otherwise go to the core's reference."""
        from ferrum.backends import declared_version

        if declared_version(self.info) >= (1, 11):
            return
        for op in ("sample", "sample_on_device"):  # the reference on device reads through the sample here
            if op in self.native:
                setattr(self, op, _unless_refined(getattr(self, op), self.fallback[op]))

    def accepts(self, op: str, arg: str) -> bool:
        """Whether the plugin's own implementation of ``op`` takes ``arg``."""
        return arg in self._impl_args.get(op, ())
