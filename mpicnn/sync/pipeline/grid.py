"""The K x R grid of ranks: which stage and replica a rank is, its neighbours, checks.

Replica-major: the K stages of one pipeline are consecutive ranks (rank = replica x K +
stage). Activations and their gradients cross between neighbouring stages once per
micro-batch, on the critical path of every step, so a pipeline is kept on consecutive
ranks, which launchers place on one node; the replicas of a stage exchange gradients
once per step, overlapped with backward, and may span nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...cluster.errors import MpicnnError


@dataclass(frozen=True)
class Grid:
    """Where rank ``rank`` of ``size`` sits in ``stages`` stages x ``size // stages`` replicas."""

    size: int
    stages: int
    rank: int = 0

    @property
    def replicas(self) -> int:
        return self.size // self.stages

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    def rank_of(self, stage: int, replica: int) -> int:
        return replica * self.stages + stage

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1


def check_grid(stages: int, size: int) -> None:
    """One line unless ``size`` ranks form ``stages`` x replicas."""
    if size % stages:
        raise MpicnnError(f"--stages {stages} does not divide the {size} ranks: ranks form "
                          f"stages x replicas, so run a multiple of {stages} ranks",
                          collective=True)


def check_settings(cfg) -> None:
    """One line for pipeline settings that cannot work with the rest of ``cfg``."""
    t, s = cfg.training, cfg.sync
    if s.micro_batches > t.batch_size:
        raise MpicnnError(f"--micro-batches {s.micro_batches} is more than --batch-size "
                          f"{t.batch_size}: every micro-batch needs at least one sample",
                          collective=True)
    for name, on in (("--accum-steps", t.accum_steps > 1), ("--sync-bn", t.sync_bn),
                     ("--channels-last", t.channels_last)):
        if on:
            raise MpicnnError(f"{name} is not supported with --mode pipeline (micro-batches "
                              f"take the place of --accum-steps)", collective=True)
    # Each stage holds a part of the gradient: a loss scale's overflow check and the total
    # norm would both need every stage's part, and activations cross stages in fp32.
    for name, on in ((f"--amp {t.amp}", t.amp != "off"),
                     ("--clip-grad-norm", t.clip_grad_norm > 0)):
        if on:
            raise MpicnnError(f"{name} is not supported with --mode pipeline (its stages "
                              f"each hold part of the gradient): use --amp off and no "
                              f"--clip-grad-norm", collective=True)
