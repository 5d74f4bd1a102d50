"""Step statistics: phase timers, (sum, count) meters, interval records reduced over ranks."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..cluster.world import reduce_sums
from . import timeline

if TYPE_CHECKING:
    from .progress import Progress
    from .records import MetricsWriter

PHASES = ("data", "forward", "backward", "comm", "optimizer")
# Waits a strategy may report with ``timeline.span(name)`` inside a phase; charged
# exclusively (taken out of the enclosing phase) and recorded only when they occur.
WAIT_PHASES = ("ps_push", "ps_pull")


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
