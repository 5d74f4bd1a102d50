"""Benchmark runs and what they wrote: ``mpicnn.train`` records, a program's JSON line."""
from __future__ import annotations

import argparse
import json

from ..cluster import hydra
from ..cluster.errors import MpicnnError
from ..cluster.jobs import ROOT, TAIL_CHARS, mpirun, python_command
from ..observe.report import Run, load_run

__all__ = ["ROOT", "check", "json_result", "train", "train_across"]


def train(n: int, args, metrics, timeout: float | None = None) -> Run:
    """Run ``mpicnn.train args`` on ``n`` ranks; return the records it wrote to ``metrics``."""
    mpirun(n, "mpicnn.train", [*args, "--metrics", metrics], timeout)
    return load_run(str(metrics))


def check(done, what: str) -> None:
    """Raise the one-line error for a job across emulated nodes that hung or failed."""
    if done.hung:
        raise MpicnnError(f"{what} hung; killed it")
    if done.returncode != 0:
        raise MpicnnError(done.describe(f"({what}) exited {done.returncode}"))


def train_across(cluster, n: int, args, metrics, netmod: str = "ucx", ranks_per_node: int = 1,
                 timeout: float | None = None, cycle: bool = False) -> Run:
    """``train`` across the emulated nodes of ``cluster`` (``hydra.run`` places the ranks)."""
    command = python_command("-m", "mpicnn.train", *args, "--metrics", metrics)
    done = hydra.run(cluster, command, ranks_per_node, n, netmod, timeout, capture=True,
                     cycle=cycle)
    check(done, f"mpicnn.train on {n} ranks across {cluster.nodes} nodes")
    return load_run(str(metrics))


def json_result(n: int, module: str, args=(), timeout: float | None = None) -> dict:
    """Run ``python -m module args`` on ``n`` ranks; return the JSON line rank 0 printed last."""
    stdout = mpirun(n, module, args, timeout).stdout
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise MpicnnError(f"python -m {module} printed no JSON result:\n{stdout[-TAIL_CHARS:]}")
    return json.loads(lines[-1])


def parse_with_train_args(parser: argparse.ArgumentParser, argv, help: str):
    """Parse ``argv``; what follows ``--`` lands in ``args.train_args``, flags for the jobs."""
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help=help)
    args = parser.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    return args
