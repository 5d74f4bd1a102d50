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
WAIT_PHASES = ("ps_push", "ps_pull", "pipe_wait")
# The first steps (warm-up: allocations, bucket rebuilds) stay out of the run's images/s.
WARMUP_STEPS_UNTIMED = 5
# Phases whose CUDA events are left unread at most (then those complete are read).
MAX_UNREAD_PHASES = 256
# Device losses kept unread at most (a mode without mid-epoch records reads this often).
MAX_UNREAD_LOSSES = 1024


class PhaseTimer:
    """Seconds per step spent in each phase of the training step (exclusive of nested waits).

    On the CPU a phase is its wall-clock time. On a CUDA device (``device``) the host only
    launches kernels, so a phase is the GPU time between two CUDA events recorded on the
    current stream, less the host waits spanned inside it. Consecutive phases share the
    event between them (one event a phase, all GPU work charged to some phase), events
    are reused once read, and they are read when records are written (``take``), never
    with a synchronisation inside the step.
    """

    def __init__(self, device=None, event=None):
        self.events = event is not None or (device is not None and
                                            getattr(device, "type", device) == "cuda")
        self._event = event or (self._cuda_event if self.events else None)
        self._pending = []             # (phase, start event, end event, host waits inside)
        self._free = []                # read events, recorded again by later phases
        self._boundary = None          # the end event of the last phase: the next one's start
        self._waits = 0.0
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.mark = dict(self.totals)
        self.steps = 0

    @staticmethod
    def _cuda_event():
        import torch

        return torch.cuda.Event(enable_timing=True)

    def _recorded(self):
        event = self._free.pop() if self._free else self._event()
        event.record()
        return event

    @contextmanager
    def phase(self, name: str):
        """Time the block as ``name``; waits spanned inside it are charged to themselves."""
        self.totals.setdefault(name, 0.0)
        previous = timeline.listen(self)
        start = None
        if self.events:
            start = self._boundary if self._boundary is not None else self._recorded()
            self._waits = 0.0
        try:
            with timeline.span(name):
                yield
        finally:
            timeline.listen(previous)
            if start is not None:
                self._boundary = self._recorded()
                self._pending.append((name, start, self._boundary, self._waits))

    @property
    def unread(self) -> int:
        """Phases whose events are not read yet."""
        return len(self._pending)

    def tracks(self, name: str) -> bool:
        return name in self.totals or name in WAIT_PHASES

    def add(self, name: str, seconds: float) -> None:
        if self.events and name not in WAIT_PHASES:
            return                     # the phase's GPU time comes from its events
        if self.events:
            self._waits += seconds
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def resolve(self, block: bool = False) -> None:
        """Charge the phases whose end event completed (all of them when ``block``)."""
        done = 0
        for name, start, end, waits in self._pending:
            if block:
                end.synchronize()
            elif not end.query():
                break                  # the stream runs in order: later ones are not done
            gpu = start.elapsed_time(end) / 1000.0
            self.totals[name] = self.totals.get(name, 0.0) + max(0.0, gpu - waits)
            self._free.append(start)   # read; its successor's start is this one's end
            done += 1
        del self._pending[:done]

    def take(self, block: bool = False) -> dict:
        """Seconds per phase since the previous ``take``."""
        if self.events:
            self.resolve(block)
        delta = {k: v - self.mark.get(k, 0.0) for k, v in self.totals.items()}
        self.mark = dict(self.totals)
        return delta

    def snapshot_ms(self) -> dict:
        """Mean milliseconds per step for each phase since the last reset."""
        if self.events:
            self.resolve(block=True)
        steps = max(1, self.steps)
        return {f"{k}_ms": round(1000 * v / steps, 3) for k, v in self.totals.items()}

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.mark = dict(self.totals)
        self._pending = []
        self._boundary = None
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
                 steps_per_epoch: int = 1, lr=lambda: 0.0, mid_epoch: bool = True,
                 device=None):
        self.comm, self.writer, self.progress, self.every = comm, writer, progress, every
        self.steps_per_epoch, self.lr, self.mid_epoch = steps_per_epoch, lr, mid_epoch
        self.names = PHASES + WAIT_PHASES
        self.timer = PhaseTimer(device)           # CUDA: GPU time from events
        self.run_images = self.run_seconds = 0.0
        self.train_seconds = 0.0               # every epoch's steps, evaluation excluded
        self.epoch_started = time.perf_counter()
        self.clock = time.perf_counter()
        self.shown_loss = math.nan             # the loss of the last interval read, for the bar
        self.device_losses: list = []          # (loss tensor, samples) of steps not yet read
        self._clear_interval()
        self._clear_epoch()

    def _clear_interval(self) -> None:
        self.interval_loss = self.interval_count = self.interval_seconds = 0.0
        self.interval_steps = 0
        self.interval_split = dict.fromkeys(self.names, 0.0)

    def _clear_epoch(self) -> None:
        self.epoch_loss = self.epoch_count = 0.0
        self.timer.reset()

    def _read_losses(self) -> None:
        """Read the device losses kept since the last read (one read for all of them) into
        the interval's sum (NaN stays visible) and the epoch's finite sums."""
        if not self.device_losses:
            return
        losses, self.device_losses = self.device_losses, []
        values = torch.stack([loss for loss, _ in losses]).tolist()
        for value, (_, count) in zip(values, losses):
            self._add_loss(value, count)

    def _add_loss(self, value: float, count: int) -> None:
        self.interval_loss += value
        self.interval_count += count
        if math.isfinite(value):          # a skipped non-finite step stays out of the mean
            self.epoch_loss += value
            self.epoch_count += count

    def phase(self, name: str):
        """Time a block of the step as phase ``name``."""
        return self.timer.phase(name)

    def begin_epoch(self) -> None:
        self.clock = self.epoch_started = time.perf_counter()
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
        if isinstance(loss_sum, torch.Tensor):   # kept on the device until the next read
            self.device_losses.append((loss_sum, count))
            if len(self.device_losses) >= MAX_UNREAD_LOSSES:
                self._read_losses()
        else:
            self._add_loss(loss_sum, count)
        self.interval_seconds += seconds
        self.interval_steps += 1
        writes = self.read_due(state)
        if writes or self.timer.unread >= MAX_UNREAD_PHASES:
            self._split(block=writes)   # GPU phase times are read when written
        self.timer.steps += 1
        if self.progress is not None:
            self.progress.update(state.epoch + 1, state.global_step, self.shown_loss)
        if writes:
            self._write_interval(state)

    def _split(self, block: bool) -> None:
        for name, spent in self.timer.take(block).items():
            if name in self.interval_split:
                self.interval_split[name] += spent

    def end_epoch(self, state) -> EpochSummary:
        """Write the last interval and reduce the epoch's loss (collective)."""
        self._split(block=True)
        self._write_interval(state)
        self.train_seconds += time.perf_counter() - self.epoch_started
        total, count = reduce_sums(self.comm, [float(self.epoch_loss), float(self.epoch_count)])
        return EpochSummary(train_loss=total / max(count, 1), steps=self.timer.steps,
                            phases_ms=self.timer.snapshot_ms())

    @property
    def images_per_s(self) -> float:
        """Training images per second over all steps but the first few (data included)."""
        return self.run_images / self.run_seconds if self.run_seconds > 0 else float("nan")

    def _write_interval(self, state) -> None:
        """Write the steps accounted since the last record, if any (collective)."""
        self._read_losses()                                   # the interval's one read
        if not self.interval_steps or self.writer is None:
            self._clear_interval()
            return
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
