"""``python -m ferrum.testing BACKEND [--dtype D]``: print the conformance table; exit 1 on failure."""

from __future__ import annotations

import argparse
import sys

from ferrum.errors import FerrumError
from ferrum.testing.conformance import check_backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferrum.testing", description=__doc__)
    parser.add_argument("backend", help="backend name, as listed by `ferrum backends`")
    parser.add_argument("--dtype", help="compute dtype to check (default: the backend's default)")
    args = parser.parse_args(argv)
    try:
        report = check_backend(args.backend, args.dtype)
    except FerrumError as exc:
        print(f"ferrum.testing: error: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
