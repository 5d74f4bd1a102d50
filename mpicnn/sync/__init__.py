"""Gradient synchronisation strategies, chosen once from ``--mode``.

- ``contract``: what the training loop calls: ``GradientSync`` and ``WorkPlan``.
- ``replicas``: equal replicas: rank 0's weights broadcast, buffers averaged.
- ``flat``: many tensors as one flat buffer (views, flatten, unflatten_into).
- ``messages``: the one splitter of buffers into messages that fit MPI's counts.
- ``allreduce``: the bucketed allreduce engine (``--mode allreduce``).
- ``ps``: the parameter server (``--mode ps-sync``, ``ps-async``).
- ``pipeline``: model stages over ranks, replicas allreduced (``--mode pipeline``).
"""
from __future__ import annotations

from ..cluster.errors import MpicnnError
from .contract import Strategy


def make_strategy(cfg, world) -> Strategy:
    """The strategy object for ``cfg.sync.mode``; the training loop never branches on the mode."""
    if cfg.sync.mode == "allreduce":
        from .allreduce.strategy import AllreduceStrategy

        strategy = AllreduceStrategy(world, cfg)
    elif cfg.sync.mode in ("ps-sync", "ps-async"):
        from .ps import make_ps_strategy

        strategy = make_ps_strategy(cfg, world)
    elif cfg.sync.mode == "pipeline":
        from .pipeline.strategy import PipelineStrategy

        strategy = PipelineStrategy(world, cfg)
    else:
        raise MpicnnError(f"unknown mode {cfg.sync.mode!r}", collective=True)
    if cfg.sync.slow_rank >= strategy.workers:
        raise MpicnnError(f"--slow-rank {cfg.sync.slow_rank} is not a worker: workers are ranks "
                          f"0-{strategy.workers - 1}", collective=True)
    return strategy
