"""Griffin's RG-LRU (RecurrentGemma's recurrence, ``ferrum.hookspec.rg_lru``): which implementation a layer calls."""

from __future__ import annotations

from typing import Any

#: The plugin API from which a plugin's own ``rg_lru`` is called.
SINCE = (1, 25)


def runs_natively(ops: Any) -> bool:
    """Whether a layer calls the plugin's own ``rg_lru``: only where it declares API 1.25 (asked once, at build)."""
    from ferrum.backends import declared_version  # imported here: ferrum.backends loads the plugins

    return "rg_lru" in ops.native and declared_version(ops.info) >= SINCE
