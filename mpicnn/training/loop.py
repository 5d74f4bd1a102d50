"""One epoch of training and one evaluation pass; no mode-specific branches."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..checkpoint.state import RunState
from ..cluster.world import reduce_sums
from ..observe import timeline
from ..observe.steps import Meter, PhaseTimer

WARMUP_STEPS_UNTIMED = 5


@dataclass
class Throughput:
    """Training images per second over the timed steps (data loading included)."""

    seconds: float = 0.0
    images: int = 0
    steps: int = 0

    def add(self, seconds: float, images: int, global_step: int) -> None:
        if global_step >= WARMUP_STEPS_UNTIMED:
            self.seconds += seconds
            self.images += images
            self.steps += 1

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class EpochResult:
    train_loss: float
    steps: int
    timer: PhaseTimer = field(default_factory=PhaseTimer)


def train_epoch(model, loader, strategy, state: RunState, run_steps: int, global_batch: int,
                throughput: Throughput, on_step=None, accum_steps: int = 1,
                should_stop=None) -> EpochResult:
    """Run the remaining steps of ``state.epoch``; returns the mean loss over all ranks.

    With ``accum_steps`` k, each rank's batch runs as k consecutive slices
    (micro-batches of batch / k samples): the loss of each is scaled by 1/k and
    the gradients summed locally, and only the last backward communicates. The
    optimizer step therefore sees the gradient of the whole batch, and the data
    plan, schedule and checkpoints are those of the run without accumulation.

    ``should_stop(state)``, called after every step but the run's last on every rank,
    ends the epoch early when it returns True (the same answer on all ranks).
    """
    model.train()
    timer, loss_meter = PhaseTimer(), Meter()
    batches = strategy.batches(loader, state, run_steps)
    last = time.perf_counter()
    while state.global_step < run_steps:
        timeline.step(state.global_step)
        with timer.phase("data"):
            batch = next(batches, None)
        if batch is None:
            break
        images, labels = batch
        loss_sum = 0.0
        for i, (x, y) in enumerate(zip(images.chunk(accum_steps), labels.chunk(accum_steps))):
            with timer.phase("forward"):
                loss = F.cross_entropy(model(x), y)
            with timer.phase("backward"):
                if i == 0:
                    strategy.zero_grad()
                with strategy.no_sync() if i < accum_steps - 1 else nullcontext():
                    (loss / accum_steps if accum_steps > 1 else loss).backward()
            loss_sum += loss.item() * len(y)
        with timer.phase("comm"):
            strategy.after_backward()
        with timer.phase("optimizer"):
            strategy.step()
        loss_value = loss_sum / len(labels)
        if math.isfinite(loss_value):     # a skipped non-finite step stays out of the mean
            loss_meter.add(loss_sum, len(labels))
        trained = strategy.advance(state, global_batch)
        timer.steps += 1
        now = time.perf_counter()
        throughput.add(now - last, trained, state.global_step - 1)
        last = now
        if on_step is not None:
            on_step(state, loss_value, timer)
        if should_stop is not None and state.global_step < run_steps and should_stop(state):
            break
    total, count = reduce_sums(strategy.comm, [loss_meter.sum, loss_meter.count])
    return EpochResult(train_loss=total / max(count, 1), steps=timer.steps, timer=timer)


@torch.no_grad()
def evaluate(model, loader, comm) -> tuple[float, float]:
    """(loss, accuracy) on the whole split, equal to a single-process evaluation."""
    model.eval()
    loss_sum = correct = count = 0.0
    for images, labels in loader.eval_batches():
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    loss_sum, correct, count = reduce_sums(comm, [loss_sum, correct, count])
    return loss_sum / count, correct / count
