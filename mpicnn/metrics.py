"""Metrics: (sum, count) meters reduced across ranks, JSON-lines records, progress."""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

import numpy as np

SCHEMA_VERSION = 1
PHASES = ("data", "forward", "backward", "comm", "optimizer")


def reduce_sums(comm, values) -> np.ndarray:
    """Sum a short vector of numbers over all ranks (one Allreduce)."""
    from mpi4py import MPI

    buf = np.asarray(values, dtype=np.float64).copy()
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return buf


class Meter:
    """A running (sum, count); the global mean is sum of sums / sum of counts."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def add(self, value: float, n: int = 1) -> None:
        self.sum += value
        self.count += n

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else float("nan")


class PhaseTimer:
    """Seconds per step spent in each phase of the training step."""

    def __init__(self):
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def snapshot_ms(self) -> dict:
        """Mean milliseconds per step for each phase since the last reset."""
        steps = max(1, self.steps)
        return {f"{k}_ms": round(1000 * v / steps, 3) for k, v in self.totals.items()}

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0


class MetricsWriter:
    """Appends one JSON object per line; ``path`` empty gives a writer that does nothing."""

    def __init__(self, path: str = "", run_start: float | None = None):
        self.fh = None
        self.start = run_start or time.time()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.fh = open(path, "a", buffering=1)

    def write(self, event: str, **fields) -> None:
        if self.fh is None:
            return
        record = {"event": event, "schema": SCHEMA_VERSION,
                  "time": round(time.time() - self.start, 3), **fields}
        self.fh.write(json.dumps(record, default=_plain) + "\n")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _plain(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class Progress:
    """A tqdm bar on rank 0 at a terminal; elsewhere a no-op."""

    def __init__(self, active: bool, mode: str = "auto"):
        tty = sys.stderr.isatty()
        self.enabled = active and (mode == "on" or (mode == "auto" and tty))
        self.bar = None

    def start(self, total: int, description: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)

    def update(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
