"""pytest plugin for backend authors: ``pytest --ferrum-backend NAME`` runs the conformance kit as test items.

Ferrum ships it under the ``pytest11`` entry point, so it is active wherever Ferrum is installed and
does nothing unless ``--ferrum-backend`` is given. Each check of :func:`ferrum.testing.conformance.checks`
becomes its own test item, named after the op, the variant or shape it checks, and the dtype::

    ferrum-conformance[jax]::rope[float32]
    ferrum-conformance[jax]::attention-q5-kv11-h14-kvh2-d48[bfloat16]
    ferrum-conformance[jax]::quantized_linear-4-bit-g32-native[float32]
    ferrum-conformance[jax]::model-logits-and-16-greedy-tokens[float32]

so a plugin's CI is one line (``-k`` selects items as usual)::

    pytest --ferrum-backend jax --ferrum-dtype float32 --ferrum-dtype bfloat16

Every item runs on freshly seeded inputs, so an item selected alone sees the numbers it saw in the full run.
Checks the kit gains (a new optional op, a model family) become items without a change here.
"""

from __future__ import annotations

import re
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ferrum", "Ferrum backend conformance")
    group.addoption("--ferrum-backend", action="append", default=[], metavar="NAME",
                    help="run Ferrum's conformance kit on this backend as test items (repeatable)")
    group.addoption("--ferrum-dtype", action="append", default=[], metavar="DTYPE",
                    help="compute dtype for --ferrum-backend (repeatable; default: the backend's default dtype)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ferrum_conformance: a check of Ferrum's backend conformance kit")


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect, so they apply to these items too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for backend in config.getoption("ferrum_backend"):
        name = f"ferrum-conformance[{backend}]"
        kit = BackendConformance.from_parent(session, name=name, nodeid=name, backend=backend)
        collected = kit.collect()
        config.hook.pytest_collectreport(report=pytest.CollectReport(kit.nodeid, "passed", None, collected))
        items.extend(collected)


def item_name(check_name: str, dtype: str) -> str:
    """A check's name as a test id: ``quantized_linear 4-bit g32 (native)`` -> ``quantized_linear-4-bit-g32-native[float32]``."""
    return f"{re.sub(r'[^A-Za-z0-9_.]+', '-', check_name).strip('-')}[{dtype}]"


class BackendConformance(pytest.Collector):
    """The kit's checks for one backend, one item per check and dtype."""

    def __init__(self, *, backend: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.backend_name = backend
        self.add_marker("ferrum_conformance")

    def collect(self) -> list[pytest.Item]:
        from ferrum.backends import load_backend
        from ferrum.errors import FerrumError
        from ferrum.testing.conformance import checks

        try:
            backend = load_backend(self.backend_name)
        except FerrumError as exc:
            return [Unrunnable.from_parent(self, name="load", reason=f"{type(exc).__name__}: {exc}")]
        items: list[pytest.Item] = []
        dtypes = self.config.getoption("ferrum_dtype") or [backend.info.default_dtype]
        for dtype in dtypes:
            if dtype not in backend.info.dtypes:
                # skipped beside a dtype it computes in (one CI line for plugins of either kind), else failed:
                # a run that checks nothing must not pass
                reason = f"backend {backend.name!r} computes in {', '.join(backend.info.dtypes)}, not {dtype!r}"
                skip = any(d in backend.info.dtypes for d in dtypes)
                items.append(Unrunnable.from_parent(self, name=f"dtype[{dtype}]", reason=reason, skip=skip))
                continue
            items.extend(ConformanceItem.from_parent(self, name=item_name(check.name, dtype), backend=backend,
                                                     dtype=dtype, check_name=check.name)
                         for check in checks(backend, dtype))
        return items


class ConformanceFailure(Exception):
    """A check that did not pass; its message is the whole report."""


class ConformanceItem(pytest.Item):
    """One check of the kit on one dtype."""

    def __init__(self, *, backend: Any, dtype: str, check_name: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.backend, self.dtype, self.check_name = backend, dtype, check_name

    def runtest(self) -> None:
        from ferrum.testing.conformance import checks

        (check,) = (c for c in checks(self.backend, self.dtype) if c.name == self.check_name)
        result = check.run()
        if result.error is not None:
            self.user_properties += [("error", result.error), ("tolerance", result.tolerance)]
        if not result.passed:
            if result.error is not None:
                raise ConformanceFailure(f"{result.message}: scaled error {result.error:.3e} "
                                         f"> tolerance {result.tolerance:.0e}")
            raise ConformanceFailure(result.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ConformanceFailure):
            return f"{self.backend.name} {self.dtype}, {self.check_name}: {excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"{self.backend.name} {self.dtype}: {self.check_name}"


class Unrunnable(pytest.Item):
    """Stands for checks that cannot run (the backend does not load, a dtype it lacks), failing (or, ``skip``,
    skipped) with why."""

    def __init__(self, *, reason: str, skip: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.reason, self.skip = reason, skip

    def runtest(self) -> None:
        if self.skip:
            pytest.skip(self.reason)
        raise ConformanceFailure(self.reason)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, self.nodeid

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        return str(excinfo.value)
