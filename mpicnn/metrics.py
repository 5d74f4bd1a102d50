"""Metrics: (sum, count) meters reduced across ranks, JSON-lines records, progress.

The record schema (``SCHEMA``, version ``SCHEMA_VERSION``) is documented in the README
section "Metrics, timeline and reports"; ``check_record`` validates one record.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

import numpy as np

from . import timeline

SCHEMA_VERSION = 2
PHASES = ("data", "forward", "backward", "comm", "optimizer")
# Waits a strategy may report with ``timeline.span(name)`` inside a phase; charged
# exclusively (taken out of the enclosing phase) and recorded only when they occur.
WAIT_PHASES = ("ps_push", "ps_pull")

NUMBER, INT, TEXT = (int, float), int, str
_SPLIT = {f"{p}_ms": NUMBER for p in PHASES}
SCHEMA = {     # event -> required fields and their types (more fields may follow)
    "config": {"world_size": INT, "mode": TEXT, "batch_size": INT, "log_every": INT,
               "steps_per_epoch": INT},
    "interval": {"epoch": NUMBER, "step": INT, "steps": INT, "loss": NUMBER, "lr": NUMBER,
                 "images_per_s": NUMBER, **_SPLIT},
    "epoch": {"epoch": INT, "step": INT, "train_loss": NUMBER, "val_loss": NUMBER,
              "val_acc": NUMBER, "lr": NUMBER, "images_per_s": NUMBER, **_SPLIT},
    "end": {"val_acc": NUMBER, "val_loss": NUMBER, "train_loss": NUMBER,
            "images_per_s": NUMBER, "steps": INT, "epochs": INT, "world_size": INT,
            "mode": TEXT, "wall_s": NUMBER},
    "timeline": {"path": TEXT, "events": INT, "dropped": INT, "steps": list,
                 "clock_offsets_ms": list},
    # a stop signal ended the run early (mpicnn/preempt.py); "end" does not follow
    "stopped": {"signal": TEXT, "step": INT, "epoch": INT, "step_in_epoch": INT,
                "checkpoint": TEXT, "exit_code": INT},
}
OPTIONAL = {   # written when the run has them (parameter-server modes, PS waits)
    "staleness_hist": dict,        # {"staleness": updates}, keys are decimal strings
    "updates_per_server": list,    # updates applied by each server rank, in server order
    **{f"{p}_ms": NUMBER for p in WAIT_PHASES},
}


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


def check_record(record: dict) -> list[str]:
    """What is wrong with one metrics record (empty when it follows ``SCHEMA``)."""
    event = record.get("event")
    if event not in SCHEMA:
        return [f"unknown event {event!r}"]
    problems = []
    if record.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema {record.get('schema')!r}, expected {SCHEMA_VERSION}")
    required = {"time": NUMBER, **SCHEMA[event]}
    for name, kind in required.items():
        if name not in record:
            problems.append(f"{event}: missing {name}")
        elif isinstance(record[name], bool) or not isinstance(record[name], kind):
            problems.append(f"{event}: {name}={record[name]!r} is not {kind}")
    for name, kind in OPTIONAL.items():
        if name in record and not isinstance(record[name], kind):
            problems.append(f"{event}: {name}={record[name]!r} is not {kind}")
    return problems


class PhaseTimer:
    """Seconds per step spent in each phase of the training step (exclusive of nested waits)."""

    def __init__(self):
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.mark = dict(self.totals)
        self.steps = 0

    @contextmanager
    def phase(self, name: str):
        """Time the block as ``name``; waits spanned inside it are charged to themselves."""
        self.totals.setdefault(name, 0.0)
        previous = timeline.listen(self)
        try:
            with timeline.span(name):
                yield
        finally:
            timeline.listen(previous)

    def tracks(self, name: str) -> bool:
        return name in self.totals or name in WAIT_PHASES

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def take(self) -> dict:
        """Seconds per phase since the previous ``take``."""
        delta = {k: v - self.mark.get(k, 0.0) for k, v in self.totals.items()}
        self.mark = dict(self.totals)
        return delta

    def snapshot_ms(self) -> dict:
        """Mean milliseconds per step for each phase since the last reset."""
        steps = max(1, self.steps)
        return {f"{k}_ms": round(1000 * v / steps, 3) for k, v in self.totals.items()}

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.mark = dict(self.totals)
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
    """Rank 0's view of the run: a tqdm bar at a terminal, else a periodic status line.

    The bar shows epoch, step, loss, images/s and ETA; without a terminal (batch logs)
    or with ``--progress off`` a one-line status is logged at every interval instead.
    Ranks other than 0 show nothing.
    """

    def __init__(self, active: bool, mode: str = "auto", log=None, stream=None):
        self.stream = stream or sys.stderr
        tty = self.stream.isatty()
        self.active = active
        self.enabled = active and (mode == "on" or (mode == "auto" and tty))
        self.log = log
        self.bar = self._redirect = None
        self.total = self.epochs = self.global_batch = 0

    def start(self, total: int, done: int, epochs: int, global_batch: int) -> None:
        """Begin the run: ``total`` steps, ``done`` already taken (after a resume)."""
        self.total, self.epochs, self.global_batch = total, epochs, global_batch
        if self.enabled:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.close()
            self.bar = tqdm(total=total, initial=done, unit="step", file=self.stream,
                            dynamic_ncols=True, leave=False)
            if self.log is not None:   # log lines go above the bar, not through it
                self._redirect = logging_redirect_tqdm(loggers=[self.log])
                self._redirect.__enter__()

    def update(self, epoch: int, step: int, loss: float) -> None:
        """One step taken (bar only)."""
        if self.bar is None:
            return
        rate = self.bar.format_dict.get("rate") or 0.0
        self.bar.set_description(f"epoch {epoch}/{self.epochs}", refresh=False)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate * self.global_batch:.0f}",
                             refresh=False)
        self.bar.update(1)

    def status(self, epoch: int, step: int, loss: float, images_per_s: float) -> None:
        """One interval done: a status line when no bar is shown."""
        if self.active and self.bar is None and self.log is not None:
            self.log.info(status_line(epoch, self.epochs, step, self.total, loss,
                                      images_per_s, self.global_batch))

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def status_line(epoch, epochs, step, total, loss, images_per_s, global_batch) -> str:
    """``epoch 2/20 step 150/2000 loss 0.5321 1234 images/s ETA 0:05:12``."""
    if images_per_s > 0 and global_batch > 0:
        seconds = round((total - step) * global_batch / images_per_s)
        eta = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    else:
        eta = "?"
    return (f"epoch {epoch}/{epochs} step {step}/{total} loss {loss:.4f} "
            f"{images_per_s:.0f} images/s ETA {eta}")


class IntervalLog:
    """Every ``every`` steps: loss, lr, images/s and the time split, reduced over ranks.

    Collective: every training rank calls ``on_step`` and ``flush`` at the same steps.
    ``begin()`` at the start of each epoch's training restarts the clock, so evaluation
    time never counts as training time. ``mid_epoch=False`` (ranks that do not run the
    same steps, e.g. ps-async workers) writes one record per epoch, from ``flush``.
    """

    def __init__(self, comm, writer: MetricsWriter, progress: Progress, every: int,
                 local_batch: int, global_batch: int, steps_per_epoch: int, lr,
                 mid_epoch: bool = True):
        self.comm, self.writer, self.progress, self.every = comm, writer, progress, every
        self.mid_epoch = mid_epoch
        self.local_batch, self.global_batch = local_batch, global_batch
        self.steps_per_epoch, self.lr = steps_per_epoch, lr
        self.names = PHASES + WAIT_PHASES
        self._clear()
        self.clock = time.perf_counter()

    def _clear(self) -> None:
        self.loss_sum = self.count = self.seconds = 0.0
        self.steps = 0
        self.split = dict.fromkeys(self.names, 0.0)

    def begin(self) -> None:
        self.clock = time.perf_counter()

    def on_step(self, state, loss: float, timer: PhaseTimer) -> None:
        """Account one step; write a record every ``every`` global steps."""
        now = time.perf_counter()
        self.seconds += now - self.clock
        self.clock = now
        self.loss_sum += loss * self.local_batch
        self.count += self.local_batch
        self.steps += 1
        for name, seconds in timer.take().items():
            if name in self.split:
                self.split[name] += seconds
        epoch = state.epoch + 1
        self.progress.update(epoch, state.global_step, loss)
        if self.mid_epoch and state.global_step % self.every == 0:
            self.flush(state)

    def flush(self, state) -> None:
        """Write the steps accounted since the last record, if any (collective)."""
        if not self.steps:
            return
        sums = reduce_sums(self.comm, [self.loss_sum, self.count, self.steps,
                                       *(self.split[n] for n in self.names)])
        loss_sum, count, rank_steps = sums[:3]
        split = dict(zip(self.names, sums[3:]))
        images = rank_steps * self.local_batch          # every rank's steps: any mode
        images_per_s = images / self.seconds if self.seconds else 0.0
        record = {f"{name}_ms": round(1000 * split[name] / rank_steps, 3)
                  for name in self.names if name in PHASES or split[name] > 0}
        loss = loss_sum / max(count, 1)
        self.writer.write("interval", epoch=round(state.global_step / self.steps_per_epoch, 4),
                          step=state.global_step, steps=self.steps, loss=loss, lr=self.lr(),
                          images_per_s=images_per_s, **record)
        self.progress.status(state.epoch + 1, state.global_step, loss, images_per_s)
        self._clear()
