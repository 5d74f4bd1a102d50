"""The training state: where the run is (RunState), what a checkpoint holds, restoring it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cluster.errors import MpicnnError
from ..data.shard import Layout
from . import files as checkpoint

# where a checkpoint stands (read by ``position.resume_point``)
POSITION = ("epoch", "step_in_epoch", "global_step", "layout", "samples_in_epoch",
            "epoch_order")


@dataclass
class Continued:
    """An epoch resumed at another layout: the rest of the order another layout gave it."""

    order: Layout                # the layout whose order the epoch follows
    first: int                   # samples of it trained before this run's first step in it
    samples: int                 # samples it trains in all
    steps: int                   # steps this run takes in it


@dataclass
class RunState:
    """Where the run is: the next epoch to run, and steps already done in it."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    continued: Continued | None = None      # this epoch continues another layout's order

    def move_to(self, global_step: int | None) -> None:
        """Stand at ``global_step`` of the same epoch (None: stay)."""
        if global_step is not None:
            self.step_in_epoch += global_step - self.global_step
            self.global_step = global_step

    def advance(self, global_step: int | None = None) -> None:
        """Count one finished step, or stand at ``global_step`` where the work plan says."""
        self.step_in_epoch += 1
        self.global_step += 1
        self.move_to(global_step)

    def next_epoch(self, steps_per_epoch: int) -> None:
        """Begin the next epoch once this one's steps are all done."""
        steps = self.continued.steps if self.continued else steps_per_epoch
        if self.step_in_epoch >= steps:
            self.epoch, self.step_in_epoch, self.continued = self.epoch + 1, 0, None

    def samples_in_epoch(self, global_batch: int) -> int:
        """Samples of this epoch's order trained so far (steps of ``global_batch``)."""
        if self.continued is None:
            return self.step_in_epoch * global_batch
        first, total = self.continued.first, self.continued.samples
        return first + min(self.step_in_epoch * global_batch, total - first)


def plain_scheduler_state(scheduler) -> dict:
    """The scheduler's state without its lr function, which holds the Config object.

    weights_only loading refuses arbitrary objects; the function is rebuilt from the
    config at start, and ``None`` entries tell LambdaLR to keep it.
    """
    state = scheduler.state_dict()
    if "lr_lambdas" in state:
        state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
    return state


def training_state(cfg, model, optimizer, scheduler, state: RunState,
                   precision=None) -> dict:
    """What a checkpoint holds; ``precision``'s loss scale (``--amp fp16``) as ``amp_scaler``."""
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": plain_scheduler_state(scheduler), "epoch": state.epoch,
             "step_in_epoch": state.step_in_epoch, "global_step": state.global_step,
             "rng": torch.get_rng_state(), "model_name": cfg.training.model,
             "mode": cfg.sync.mode, "config": cfg.to_dict()}
    scaler = precision.state_dict() if precision is not None else None
    if scaler is not None:
        saved["amp_scaler"] = scaler
    return saved


# modes whose checkpoints hold the same whole model and optimizer state
INTERCHANGEABLE_MODES = {"allreduce", "pipeline"}


def check_compatible(saved: dict, cfg, path) -> None:
    for key, ours in (("model_name", cfg.training.model), ("mode", cfg.sync.mode)):
        if key == "mode" and {saved.get(key), ours} <= INTERCHANGEABLE_MODES:
            continue
        if saved.get(key) != ours:
            what = key.replace("_name", "")
            raise MpicnnError(f"cannot resume from {str(path)!r}: it was written with "
                              f"{what} {saved.get(key)!r}, this run uses {ours!r}; pass "
                              f"--{what} {saved.get(key)}, or start without --resume")


def restore(world, cfg, model, optimizer, scheduler, precision=None) -> dict | None:
    """Load ``--resume`` on rank 0, check it, broadcast it to every rank; returns where it
    stands (``position.KEYS``), or None when the run starts fresh. ``precision`` takes the
    saved loss scale (a checkpoint without one leaves it at its start)."""
    def load_on_root():
        if not world.is_root:
            return None
        if cfg.output.resume == "auto":   # a damaged newest checkpoint falls back to an older
            path, saved = checkpoint.load_newest(cfg.output.checkpoint_dir, world.log.warning)
        else:
            path = checkpoint.resolve_resume(cfg.output.resume, cfg.output.checkpoint_dir)
            saved = checkpoint.load(path) if path else None
        if path is None:
            return None
        check_compatible(saved, cfg, path)
        return str(path), saved

    found = world.comm.bcast(world.agree(load_on_root), root=0)
    if found is None:
        if cfg.output.resume:
            world.log.info("resume: no checkpoint found, starting fresh")
        return None
    path, saved = found
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if precision is not None:
            precision.load_state_dict(saved.get("amp_scaler"))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise MpicnnError(f"checkpoint {path!r} does not fit this model/optimizer: "
                          f"{str(exc).splitlines()[0]}", collective=True) from None
    torch.set_rng_state(saved["rng"])
    world.log.info(f"resumed from {path} at epoch {saved['epoch']}, "
                   f"step {saved['global_step']}")
    return {key: saved[key] for key in POSITION if key in saved}
