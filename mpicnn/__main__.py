"""``python -m mpicnn``: the commands this package offers, one line each."""
from __future__ import annotations

import sys

from . import __version__

# module -> (how it is started, what it does)
COMMANDS = {
    "mpicnn.train": ("mpirun -n N python -m", "train a CNN data-parallel over MPI"),
    "mpicnn.run": ("python -m", "restart a training launch after a crash (-- mpirun ...)"),
    "mpicnn.evaluate": ("mpirun -n N python -m", "evaluate a checkpoint without training"),
    "mpicnn.predict": ("python -m", "predict with a checkpoint: classes and probabilities"),
    "mpicnn.export": ("python -m", "export a checkpoint's model: torchscript, onnx, state_dict"),
    "mpicnn.data": ("python -m", "make, convert and inspect HDF5 datasets"),
    "mpicnn.report": ("python -m", "plots and tables from metrics files"),
    "mpicnn.bench": ("python -m", "benchmarks side by side with the peers, as ratios"),
    "mpicnn.cluster": ("python -m", "emulated nodes on one machine: up, run, down (root)"),
}


def usage() -> str:
    starts = {module: f"{start} {module}" for module, (start, _) in COMMANDS.items()}
    width = max(map(len, starts.values()))
    return "commands (each takes --help):\n" + "\n".join(
        f"  {starts[module]:<{width}}  {text}" for module, (_, text) in COMMANDS.items())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"mpicnn {__version__}")
        return 0
    print(usage())
    return 0 if not argv or argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
