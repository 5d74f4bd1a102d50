"""Step statistics, kept once: loss, images and time split of every step, reduced over ranks.

One recorder (``StepStats``) feeds the interval records, the epoch record and the end
record; ``PhaseTimer`` splits a step's time into phases. Losses may be device tensors:
they are summed where they are and read only when an interval or the epoch is written.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..cluster.world import reduce_sums
from . import timeline

PHASES = ("data", "forward", "backward", "comm", "optimizer")
# Waits a strategy may report with ``timeline.span(name)`` inside a phase; charged
# exclusively (taken out of the enclosing phase) and recorded only when they occur.
WAIT_PHASES = ("ps_push", "ps_pull")
# The first steps (warm-up: allocations, bucket rebuilds) stay out of the run's images/s.
WARMUP_STEPS_UNTIMED = 5


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


@dataclass
class EpochSummary:
    """One epoch's training as every rank saw it."""

    train_loss: float          # mean over all ranks' finite steps
    steps: int                 # this rank's steps
    phases_ms: dict            # mean milliseconds per step of each phase (this rank)


class StepStats:
    """Each step's loss, images and time split; the interval, epoch and end figures.

    Collective over ``comm`` (None: a single process): every training rank calls
    ``step_done`` at the same global steps and ``end_epoch`` once per epoch. Intervals
    of ``every`` steps become ``interval`` records; ``mid_epoch=False`` (ranks that do
    not run the same steps, e.g. ps-async workers) writes one per epoch instead.
    ``begin_epoch`` restarts the clock, so evaluation never counts as training time.
    """

    def __init__(self, comm=None, writer=None, progress=None, every: int = 0,
                 steps_per_epoch: int = 1, lr=lambda: 0.0, mid_epoch: bool = True):
        self.comm, self.writer, self.progress, self.every = comm, writer, progress, every
        self.steps_per_epoch, self.lr, self.mid_epoch = steps_per_epoch, lr, mid_epoch
        self.names = PHASES + WAIT_PHASES
        self.timer = PhaseTimer()
        self.run_images = self.run_seconds = 0.0
        self.clock = time.perf_counter()
        self.shown_loss = math.nan             # the loss of the last interval read, for the bar
        self._clear_interval()
        self._clear_epoch()

    def _clear_interval(self) -> None:
        self.interval_loss = self.interval_count = self.interval_seconds = 0.0
        self.interval_steps = 0
        self.interval_split = dict.fromkeys(self.names, 0.0)

    def _clear_epoch(self) -> None:
        self.epoch_loss = self.epoch_count = 0.0
        self.timer.reset()

    def phase(self, name: str):
        """Time a block of the step as phase ``name``."""
        return self.timer.phase(name)

    def begin_epoch(self) -> None:
        self.clock = time.perf_counter()
        self._clear_epoch()

    def read_due(self, state) -> bool:
        """Whether ``step_done`` just wrote an interval: the step path may read the device."""
        return self.mid_epoch and bool(self.every) and state.global_step % self.every == 0

    def step_done(self, state, loss_sum, count: int, images: int) -> None:
        """Account one finished step (``state`` already counts it); maybe write an interval.

        ``loss_sum`` (a float or a device tensor) is not read here: a step takes no host
        synchronisation between intervals.
        """
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        if state.global_step - 1 >= WARMUP_STEPS_UNTIMED:
            self.run_seconds += seconds
            self.run_images += images
        if isinstance(loss_sum, torch.Tensor):   # a skipped non-finite step stays out of the mean
            finite = torch.isfinite(loss_sum)
            self.epoch_loss = self.epoch_loss + torch.where(finite, loss_sum, 0.0)
            self.epoch_count = self.epoch_count + finite * count
        elif math.isfinite(loss_sum):
            self.epoch_loss += loss_sum
            self.epoch_count += count
        self.interval_loss += loss_sum
        self.interval_count += count
        self.interval_seconds += seconds
        self.interval_steps += 1
        for name, spent in self.timer.take().items():
            if name in self.interval_split:
                self.interval_split[name] += spent
        self.timer.steps += 1
        if self.progress is not None:
            self.progress.update(state.epoch + 1, state.global_step, self.shown_loss)
        if self.read_due(state):
            self._write_interval(state)

    def end_epoch(self, state) -> EpochSummary:
        """Write the last interval and reduce the epoch's loss (collective)."""
        self._write_interval(state)
        total, count = reduce_sums(self.comm, [float(self.epoch_loss), float(self.epoch_count)])
        return EpochSummary(train_loss=total / max(count, 1), steps=self.timer.steps,
                            phases_ms=self.timer.snapshot_ms())

    @property
    def images_per_s(self) -> float:
        """Training images per second over all steps but the first few (data included)."""
        return self.run_images / self.run_seconds if self.run_seconds > 0 else float("nan")

    def _write_interval(self, state) -> None:
        """Write the steps accounted since the last record, if any (collective)."""
        if not self.interval_steps or self.writer is None:
            self._clear_interval()
            return
        self.interval_loss = float(self.interval_loss)        # the interval's one read
        sums = reduce_sums(self.comm, [self.interval_loss, self.interval_count,
                                       self.interval_steps,
                                       *(self.interval_split[n] for n in self.names)])
        loss_sum, count, rank_steps = sums[:3]
        split = dict(zip(self.names, sums[3:]))
        local_batch = self.interval_count / self.interval_steps
        images = rank_steps * local_batch               # every rank's steps: any mode
        images_per_s = images / self.interval_seconds if self.interval_seconds else 0.0
        record = {f"{name}_ms": round(1000 * split[name] / rank_steps, 3)
                  for name in self.names if name in PHASES or split[name] > 0}
        loss = self.shown_loss = loss_sum / max(count, 1)
        self.writer.write("interval", epoch=round(state.global_step / self.steps_per_epoch, 4),
                          step=state.global_step, steps=self.interval_steps, loss=loss,
                          lr=self.lr(), images_per_s=images_per_s, **record)
        if self.progress is not None:
            self.progress.status(state.epoch + 1, state.global_step, loss, images_per_s)
        self._clear_interval()
