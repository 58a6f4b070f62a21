"""The plugin is a third party: it may use Ferrum's documented plugin API only (docs/plugins.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import ferrum_jax

PUBLIC = {"ferrum", "ferrum.backends", "ferrum.errors", "ferrum.sampling", "ferrum.quant", "ferrum.recurrent.batched"}


def test_the_plugin_imports_only_ferrums_public_plugin_api():
    used = set()
    for path in Path(ferrum_jax.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                used.add(node.module)
            elif isinstance(node, ast.Import):
                used.update(alias.name for alias in node.names)
    ferrum_modules = {m for m in used if m == "ferrum" or m.startswith("ferrum.")}
    assert ferrum_modules and ferrum_modules <= PUBLIC, sorted(ferrum_modules - PUBLIC)


def test_it_declares_the_api_version_it_was_written_for():
    import ferrum
    from ferrum.backends import load_backend

    backend = load_backend("jax")
    assert backend.info.api_version == ferrum_jax.backend_probe().api_version == ferrum_jax.API_VERSION
    assert ferrum_jax.API_VERSION.split(".")[0] == ferrum.API_VERSION.split(".")[0]


def test_installing_it_leaves_the_automatic_choice_alone():
    from ferrum import backends

    builtin = [e for e in backends.available() if e.available and e.name in ("cpu", "mlx", "cuda")]
    assert builtin, "no built-in backend runs here"
    assert backends.default_backend_name() != "jax"
    for bits, group in ((4, 32), (4, 64), (8, 64)):  # formats the built-ins and the plugin all run
        assert backends.backend_for_format(bits, group).name != "jax"
