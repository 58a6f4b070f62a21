"""The sandbox chat templates render in: Jinja's, with what a template builds bounded, so a broken or hostile
template ends in an error instead of exhausting memory (two templates of a fault hunt grew past 20 GB before the
kernel killed the process: a string doubled in a loop, ``'x' * 10**9``).

Bounded: texts and sequences built by ``*``, ``+``, ``%``, ``~``, calls and filters (checked before they are built
where their size is known beforehand: products, joins, widths), integers built by ``*`` and ``**``, the widths that
``center`` and its kin take, and the rendered output as it streams. The limit is far above any prompt a context
holds and far below what exhausts memory. Jinja's own sandbox already bounds ``range`` and attribute access.
"""

from __future__ import annotations

import re
from functools import wraps
from typing import Any, Iterable

from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: The most characters or items a value a template builds may hold; an integer may hold as many bytes.
LIMIT = 1 << 26

#: Calls and filters whose integer arguments are the width of the text they build (``center(10**9)``: 1 GB;
#: ``tojson``'s indent).
WIDTH_TAKING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap", "tojson"})
#: A width or precision in a %-format or a str.format spec.
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d+))?|\{[^{}]*?:[^{}]*?(\d+)")


def sized(value: Any, size: int | None = None) -> Any:
    """``value``, refused when it is (or ``size`` says it would be) a text or sequence past the limit."""
    if size is None:
        size = len(value) if isinstance(value, (str, list, tuple)) else 0
    if size > LIMIT:
        raise SecurityError(f"it would build a value of {size} items, past the limit of {LIMIT}")
    return value


def _integer_within_limit(bits: int) -> None:
    if bits > 8 * LIMIT:
        raise SecurityError(f"it would build an integer of {bits} bits, past the limit of {8 * LIMIT}")


def _arguments_within_limit(name: str, args: tuple) -> None:
    """The arguments of a call or filter named ``name`` (a method's object among them), refused where they ask for
    a value past the limit: a width, a join's items and separators, a format's widths (written, or taken from the
    arguments where the format says ``*`` or nests a ``{}``)."""
    texts = [arg for arg in args if isinstance(arg, str)]
    if name == "join":
        items = [arg for arg in args if isinstance(arg, (list, tuple))]
        sized(None, sum(len(i) for seq in items for i in seq if isinstance(i, str))
              + max(map(len, texts), default=0) * sum(map(len, items)))
    widths_from_arguments = name == "format" and any([_format_within_limit(text) for text in texts])
    if name in WIDTH_TAKING or widths_from_arguments:
        _widths_within_limit(args)


def _widths_within_limit(args: Iterable[Any]) -> None:
    if any(isinstance(arg, int) and arg > LIMIT for arg in args):
        raise SecurityError(f"it asked for a width past the limit of {LIMIT}")


def _format_within_limit(spec: str) -> bool:
    """Refuses a format whose written widths pass the limit; whether it takes widths from its arguments."""
    widths = (int(n) for match in _FORMAT_WIDTH.finditer(spec) for n in match.groups() if n)
    if any(width > LIMIT for width in widths):
        raise SecurityError(f"its format asks for a width past the limit of {LIMIT}")
    return "*" in spec or ":{" in spec


def bounded_filter(name: str, fn: Any) -> Any:
    """Filter ``fn`` registered as ``name``, its arguments and result checked against the limit."""
    @wraps(fn)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _arguments_within_limit(name, (*args, *kwargs.values()))
        return sized(fn(*args, **kwargs))

    return bounded


def rendered(chunks: Iterable[str]) -> str:
    """A template's output as it streams, refused once it passes the limit (a loop printing without end)."""
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > LIMIT:
            raise SecurityError(f"its output grew past the limit of {LIMIT} characters")
        parts.append(chunk)
    return "".join(parts)


class _BoundedConcat(CodeGenerator):
    """Compiles ``a ~ b`` to a concatenation whose result is checked against the limit."""

    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with what a template builds bounded (see the module's docstring)."""

    code_generator_class = _BoundedConcat
    intercepted_binops = frozenset({"*", "+", "**", "%"})
    sized = staticmethod(sized)

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.filters = {name: bounded_filter(name, fn) for name, fn in self.filters.items()}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
            _integer_within_limit(left.bit_length() + right.bit_length() if operator == "*"
                                  else right * left.bit_length() if abs(left) > 1 else 0)
        for times, seq in ((right, left), (left, right)):
            if operator == "*" and isinstance(times, int) and isinstance(seq, (str, list, tuple)):
                sized(None, len(seq) * times)
        if operator == "%" and isinstance(left, str) and _format_within_limit(left):
            _widths_within_limit(right if isinstance(right, tuple) else (right,))
        return sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(__obj, "__name__", "")
        _arguments_within_limit(name, (getattr(__obj, "__self__", None), *args, *kwargs.values()))
        return sized(super().call(__context, __obj, *args, **kwargs))
