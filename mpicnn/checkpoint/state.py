"""The training state: where the run is (RunState), what a checkpoint holds, restoring it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cluster.errors import MpicnnError
from . import files as checkpoint


@dataclass
class RunState:
    """Where the run is: the next epoch to run, and steps already done in it."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

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
        if self.step_in_epoch >= steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


def plain_scheduler_state(scheduler) -> dict:
    """The scheduler's state without its lr function, which holds the Config object.

    weights_only loading refuses arbitrary objects; the function is rebuilt from the
    config at start, and ``None`` entries tell LambdaLR to keep it.
    """
    state = scheduler.state_dict()
    if "lr_lambdas" in state:
        state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
    return state


def training_state(cfg, model, optimizer, scheduler, state: RunState) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": plain_scheduler_state(scheduler), "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch, "global_step": state.global_step,
            "rng": torch.get_rng_state(), "model_name": cfg.training.model, "mode": cfg.sync.mode,
            "config": cfg.to_dict()}


def check_compatible(saved: dict, cfg, path) -> None:
    for key, ours in (("model_name", cfg.training.model), ("mode", cfg.sync.mode)):
        if saved.get(key) != ours:
            what = key.replace("_name", "")
            raise MpicnnError(f"cannot resume from {str(path)!r}: it was written with "
                              f"{what} {saved.get(key)!r}, this run uses {ours!r}; pass "
                              f"--{what} {saved.get(key)}, or start without --resume")


def restore(world, cfg, model, optimizer, scheduler) -> RunState:
    """Load ``--resume`` on rank 0, check it, and broadcast it to every rank."""
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
        return RunState()
    path, saved = found
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise MpicnnError(f"checkpoint {path!r} does not fit this model/optimizer: "
                          f"{str(exc).splitlines()[0]}", collective=True) from None
    torch.set_rng_state(saved["rng"])
    world.log.info(f"resumed from {path} at epoch {saved['epoch']}, "
                   f"step {saved['global_step']}")
    return RunState(saved["epoch"], saved["step_in_epoch"], saved["global_step"])
