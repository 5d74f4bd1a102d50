"""Gradient synchronisation strategies, chosen once from ``--mode``."""
from __future__ import annotations

from ..errors import MpicnnError
from .base import Strategy


def make_strategy(cfg, world) -> Strategy:
    """The strategy object for ``cfg.mode``; the training loop never branches on the mode."""
    if cfg.mode == "allreduce":
        from .allreduce import AllreduceStrategy

        return AllreduceStrategy(world, cfg)
    raise MpicnnError(f"unknown mode {cfg.mode!r}", collective=True)
