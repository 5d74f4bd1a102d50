"""``python -m mpicnn.bench <name> [options]``: run the benchmark module ``mpicnn.bench.<name>``."""
from __future__ import annotations

import importlib
import pkgutil
import sys

import mpicnn.bench as package
from mpicnn.cluster.errors import run_tool

NOT_BENCHMARKS = {"launch"}      # the launcher every benchmark shares


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                  if not m.name.startswith("_") and m.name not in NOT_BENCHMARKS)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: python -m mpicnn.bench {{{','.join(names)}}} [options]\n"
              f"run one benchmark; each takes --help", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # a bad option, a job that failed or hung: one error line
    return run_tool(importlib.import_module(f"mpicnn.bench.{argv[0]}").main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
