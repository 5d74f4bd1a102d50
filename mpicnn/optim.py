"""Optimizers and learning-rate schedules (warmup, then cosine, step or constant)."""
from __future__ import annotations

import math

import torch


def peak_lr(cfg, global_batch: int) -> float:
    """``--lr``, scaled linearly with the global batch when ``--scale-lr`` is on."""
    return cfg.lr * global_batch / cfg.base_batch if cfg.scale_lr else cfg.lr


def build_optimizer(cfg, params, global_batch: int) -> torch.optim.Optimizer:
    lr = peak_lr(cfg, global_batch)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def lr_factor(step: int, steps_per_epoch: int, total_steps: int, cfg) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        epoch = step / max(1, steps_per_epoch)
        return cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
    return 1.0


class Schedule:
    """A per-step lr multiplier for ``LambdaLR``, holding plain data only.

    ``LambdaLR.state_dict()`` saves this object's attributes, so they must be plain
    numbers and strings: a checkpoint is loaded with ``weights_only=True``.
    """

    FIELDS = ("warmup_epochs", "schedule", "min_lr_ratio", "lr_milestones", "lr_gamma")

    def __init__(self, steps_per_epoch: int, total_steps: int, cfg):
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        for name in self.FIELDS:
            setattr(self, name, getattr(cfg, name))

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.steps_per_epoch, self.total_steps, self)


def build_scheduler(cfg, optimizer, steps_per_epoch: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             Schedule(steps_per_epoch, total_steps, cfg))


def total_steps(cfg, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run (``--max-steps`` caps ``--epochs``)."""
    steps = cfg.epochs * steps_per_epoch
    return min(steps, cfg.max_steps) if cfg.max_steps else steps
