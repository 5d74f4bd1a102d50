"""A worker rank's run: the model and its state built once, then epochs, evaluation, records.

``build_parts`` makes what every rank needs (model, optimizer, schedule, the restored
position); a ``Trainer`` then runs the epochs on a rank that trains, and writes the
epoch, timeline, stop and end records. Parameter servers never build one.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..checkpoint import position
from ..checkpoint.state import RunState, restore
from ..data import shard
from ..data.loader import make_loaders
from ..observe import timeline
from ..observe.progress import Progress
from ..observe.records import MetricsWriter
from ..observe.steps import StepStats
from ..observe.tensorboard import TensorBoardSink
from ..resilience import drills
from .adapt import adapt_model
from .compiled import compile_model
from .loop import train_epoch
from .models import build_model
from .optim import (
    TrainingProgress,
    build_optimizer,
    build_scheduler,
    follow_progress,
    peak_lr,
    total_steps,
)
from .precision import Precision


@dataclass
class Parts:
    """What a run trains, built alike on every rank."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: RunState
    steps_per_epoch: int
    run_steps: int
    layout: shard.Layout             # the global batch and how ranks share it
    precision: Precision             # --amp (autocast, loss scale) and --clip-grad-norm

    @property
    def global_batch(self) -> int:
        return self.layout.global_batch


def build_parts(cfg, world, data, work) -> Parts:
    """Model, optimizer and schedule of the run, at the position ``--resume`` names."""
    if cfg.training.deterministic:
        make_deterministic(world.device, world.log)
    steps_per_epoch = world.agree(lambda: shard.check_fits(
        len(data.train), cfg.training.batch_size, work.workers, cfg.data.shuffle))
    layout = shard.Layout(cfg.training.batch_size, work.workers, cfg.data.shuffle)
    run_steps = total_steps(cfg.training, steps_per_epoch)
    torch.manual_seed(cfg.training.seed)
    model = world.agree(lambda: build_model(cfg.training.model, data.input_shape,
                                            data.num_classes, world.log.info)).to(world.device)
    model = adapt_model(model, cfg.training, cfg.sync.mode, work.trains, work.comm,
                        world.log.info)      # --channels-last, --sync-bn
    if work.trains:
        model = compile_model(model, cfg.training.compile, world.device, world.log.info)
    optimizer = build_optimizer(cfg.training, model.parameters(), layout.global_batch)
    scheduler = build_scheduler(cfg.training, optimizer, steps_per_epoch, run_steps)
    precision = Precision(cfg.training.amp, world.device, cfg.training.clip_grad_norm)
    if precision.scaler is not None or precision.dtype is not None or precision.clip > 0:
        world.log.info(f"precision: {precision.describe()}")
    saved = restore(world, cfg, model, optimizer, scheduler, precision)
    state = RunState()
    if saved is not None:
        state, run_steps = continue_run(cfg, world, scheduler, saved, layout, len(data.train))
    drills.straggle(model, cfg.sync.slow_rank, cfg.sync.slow_factor, world.rank)
    return Parts(model, optimizer, scheduler, state, steps_per_epoch, run_steps, layout,
                 precision)


def continue_run(cfg, world, scheduler, saved: dict, layout: shard.Layout, n: int):
    """(RunState, steps of the run) resuming ``saved`` with ``layout``; says what changed.

    At another global batch the interrupted epoch continues its order, the schedule
    follows training progress so it ends where an uninterrupted run ends, and
    ``--scale-lr`` rescales the peak lr to the new global batch.
    """
    resume = position.resume_point(saved, layout, n)
    state, old = resume.state, resume.saved
    if old is None:
        world.log.info("resume: the checkpoint does not record its world size and global "
                       "batch (written by an older mpicnn): resuming by steps")
        return state, total_steps(cfg.training, layout.steps(n))
    progress = TrainingProgress(state.global_step, state.epoch, resume.done, resume.samples,
                        layout.global_batch, layout.steps(n))
    batch_changed = old is not None and old.global_batch != layout.global_batch
    peak = peak_lr(cfg.training, layout.global_batch) \
        if cfg.training.scale_lr and batch_changed else None
    before = scheduler.get_last_lr()[0]
    run_steps = total_steps(cfg.training, progress.steps_per_epoch)
    if peak is not None or not progress.identity:
        run_steps = follow_progress(scheduler, progress, cfg.training, peak)
    if old != layout or not progress.identity:
        world.log.info(position.describe_change(resume, layout, before,
                                                scheduler.get_last_lr()[0], peak, run_steps))
    return state, run_steps


def make_deterministic(device, log) -> None:
    """Bit-reproducible kernels (``--deterministic``), explicit about what CUDA cannot give.

    cuBLAS needs its workspace fixed before its first call; some CUDA kernels (e.g.
    AdaptiveAvgPool2d backward) have no deterministic version, so on a GPU such a kernel
    warns instead of stopping the run.
    """
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        log.info("deterministic: CUDA kernels without a deterministic version warn and run "
                 "nondeterministically")
    else:
        torch.use_deterministic_algorithms(True)


@dataclass
class Outcome:
    """How training ended on this rank."""

    val_loss: float = math.nan
    val_acc: float = math.nan
    train_loss: float = math.nan
    evaluated: bool = False          # whether the last state of the model was evaluated
    stopped: bool = False            # a stop signal ended it early


class Trainer:
    """Epochs of steps on a training rank, evaluation after each, checkpoints and records."""

    def __init__(self, cfg, world, data, parts: Parts, strategy, guard, preempt, checkpointer):
        self.cfg, self.world, self.data, self.parts = cfg, world, data, parts
        self.strategy, self.guard, self.preempt = strategy, guard, preempt
        self.checkpointer = checkpointer
        self.train_loader, self.val_loader = make_loaders(
            cfg.data, data, world, cfg.training.batch_size, cfg.training.seed,
            strategy.workers, strategy.worker_index, comm=strategy.comm)
        continued = parts.state.continued
        if continued is not None:           # resumed at another layout, mid-epoch
            self.train_loader.continue_epoch(parts.state.epoch, continued.order, continued.first)
        sinks = [TensorBoardSink(cfg.output.tensorboard)] \
            if world.is_root and cfg.output.tensorboard else []
        self.metrics = MetricsWriter(cfg.output.metrics if world.is_root else "", sinks=sinks,
                                     last_checkpoint=checkpointer.last_good)
        self.bar = Progress(world.is_root, cfg.output.progress, world.log)
        self.stats = StepStats(strategy.comm, self.metrics, self.bar, cfg.output.log_every,
                               parts.steps_per_epoch, self.lr, mid_epoch=strategy.lockstep,
                               device=world.device)

    def lr(self) -> float:
        return self.parts.scheduler.get_last_lr()[0]

    def close(self) -> None:
        """Release what this rank holds alone (no collective: also after a failure)."""
        self.bar.close()
        self.train_loader.close()
        self.val_loader.close()
        self.metrics.close()

    def run(self) -> Outcome:
        """Train until the last epoch, the step limit or a stop signal."""
        cfg, parts, state = self.cfg, self.parts, self.parts.state
        self.metrics.write("config", **cfg.to_dict(), world_size=self.world.size,
                           steps_per_epoch=parts.steps_per_epoch)
        self.world.log.info(
            f"{self.data.path}: {len(self.data.train)} train / {len(self.data.val)} val "
            f"samples of {self.data.input_shape}, {self.data.num_classes} classes; "
            f"{cfg.training.model}, "
            f"{parts.steps_per_epoch} steps/epoch at global batch {parts.global_batch}")
        self.bar.start(parts.run_steps, state.global_step, cfg.training.epochs, parts.global_batch)
        last_epoch = min(cfg.training.epochs, cfg.training.stop_epoch or cfg.training.epochs)
        outcome = Outcome()
        while state.epoch < last_epoch and state.global_step < parts.run_steps:
            self._epoch(outcome)
            if outcome.stopped:
                self.checkpointer.stopped(state)
                return outcome
            finished = state.epoch >= cfg.training.epochs or state.global_step >= parts.run_steps
            self.checkpointer.epoch_done(state, finished, last_epoch)
        self.checkpointer.finish()            # the last write is complete before the end
        if not outcome.evaluated:             # no epoch ran here (resumed at the end)
            self.strategy.sync_buffers()
            outcome.val_loss, outcome.val_acc = self.strategy.evaluate(
                parts.model, self.val_loader, parts.precision)
        return outcome

    def _epoch(self, outcome: Outcome) -> None:
        """One epoch's steps, then (unless stopped) evaluation and the epoch record."""
        parts, state, strategy = self.parts, self.parts.state, self.strategy
        self.stats.begin_epoch()
        train_epoch(parts.model, self.train_loader, strategy, strategy, state, parts.run_steps,
                    self.stats, scheduler=parts.scheduler, global_batch=parts.global_batch,
                    guard=self.guard, accum_steps=self.cfg.training.accum_steps,
                    should_stop=self.preempt.should_stop,
                    label_smoothing=self.cfg.training.label_smoothing,
                    precision=parts.precision)
        summary = self.stats.end_epoch(state)
        strategy.sync_buffers()
        outcome.stopped = self.preempt.stopped
        if outcome.stopped:
            return
        with timeline.span("evaluate"):
            outcome.val_loss, outcome.val_acc = strategy.evaluate(parts.model, self.val_loader,
                                                                  parts.precision)
        outcome.train_loss, outcome.evaluated = summary.train_loss, True
        state.next_epoch(parts.steps_per_epoch)
        self.metrics.write("epoch", epoch=state.epoch, step=state.global_step,
                           train_loss=summary.train_loss, val_loss=outcome.val_loss,
                           val_acc=outcome.val_acc, lr=self.lr(),
                           images_per_s=self.stats.images_per_s,
                           train_s=round(self.stats.train_seconds, 3), **summary.phases_ms,
                           **strategy.timings_ms(), **strategy.report(),
                           **parts.precision.report())
        self.world.log.info(f"epoch {state.epoch}/{self.cfg.training.epochs} step "
                            f"{state.global_step}: train loss {summary.train_loss:.4f}, val loss "
                            f"{outcome.val_loss:.4f}, val acc {outcome.val_acc:.4f}")

    def conclude(self, outcome: Outcome, trace: dict | None, wall: float) -> int:
        """Write the timeline and the stop or end record after the strategy finished."""
        cfg, state, log = self.cfg, self.parts.state, self.world.log
        if trace:
            self.metrics.write("timeline", **trace)
            log.info(f"timeline: {trace['events']} events of steps {trace['steps'][0]}:"
                     f"{trace['steps'][1]} written to {cfg.output.timeline}")
        if outcome.stopped:
            return self.preempt.report(log, self.metrics, state, self.checkpointer.saved)
        self.metrics.write("end", val_acc=outcome.val_acc, val_loss=outcome.val_loss,
                           train_loss=outcome.train_loss, images_per_s=self.stats.images_per_s,
                           train_s=round(self.stats.train_seconds, 3),
                           steps=state.global_step, epochs=state.epoch,
                           world_size=self.world.size, mode=cfg.sync.mode, wall_s=wall,
                           **self.strategy.report())
        log.info(f"done: {self.world.size} rank(s), {cfg.sync.mode}, {state.epoch} epoch(s), "
                 f"{state.global_step} steps, val acc {outcome.val_acc:.4f}, val loss "
                 f"{outcome.val_loss:.4f}, {self.stats.images_per_s:.0f} images/s, {wall:.1f} s")
        return 0
