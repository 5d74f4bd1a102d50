"""Test-only drills: stall injection, the straggler, and the drill environment's reader.

Production code calls them only through the hooks that name them; outside a drill
(no ``MPICNN_TEST_SLEEP``, no ``--slow-rank``) they do nothing.
"""
from __future__ import annotations

import os
import time

import torch

from ..cluster.errors import MpicnnError

# Testing aid: 'rank:step:seconds[:forward][,...]' makes that rank stall before that step's
# exchange (or, with ':forward', before its forward).
TEST_SLEEP_ENV = "MPICNN_TEST_SLEEP"


def drill_sleep_spec() -> str:
    """The stall drill's 'rank:step:seconds' list (empty outside tests)."""
    return os.environ.get(TEST_SLEEP_ENV, "")


def parse_sleeps(spec: str, rank: int, where: str = "exchange") -> dict[int, float]:
    """{step: seconds} for ``rank`` at ``where`` ("exchange" or "forward") from
    ``'rank:step:seconds[:forward][,...]'`` (steps count from 1)."""
    sleeps = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            r, step, seconds, *at = item.split(":")
            r, step, seconds = int(r), int(step), float(seconds)
            if at not in ([], ["forward"]):
                raise ValueError
        except ValueError:
            raise MpicnnError(f"test sleep {item!r} is not 'rank:step:seconds[:forward]'") \
                from None
        if r == rank and (at[0] if at else "exchange") == where:
            sleeps[step] = sleeps.get(step, 0.0) + seconds
    return sleeps


def stall(sleeps: dict[int, float], step: int) -> None:
    """Sleep as the drill asked for ``step`` (nothing outside drills)."""
    if step in sleeps:
        time.sleep(sleeps[step])


class Straggler:
    """Makes each training forward+backward of a model take ``factor`` times as long.

    Forward starts the clock; when the last parameter has its gradient, the rank
    sleeps ``factor - 1`` times the elapsed compute time.
    """

    def __init__(self, model: torch.nn.Module, factor: float):
        self.factor, self.start, self.pending = factor, None, 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = next(iter(self.params)).device
        model.register_forward_pre_hook(self._forward)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._gradient)

    def _now(self) -> float:
        if self.device.type == "cuda":      # time the kernels, not their launches
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _forward(self, module, args) -> None:
        if torch.is_grad_enabled() and module.training:
            self.start, self.pending = self._now(), len(self.params)

    def _gradient(self, param) -> None:
        self.pending -= 1
        if self.pending == 0 and self.start is not None:
            time.sleep((self.factor - 1) * (self._now() - self.start))
            self.start = None


def straggle(model: torch.nn.Module, slow_rank: int, factor: float, rank: int) -> None:
    """Make this rank the straggler when ``--slow-rank`` names it."""
    if rank == slow_rank:
        slow_down(model, factor)


def slow_down(model: torch.nn.Module, factor: float) -> Straggler | None:
    """Make ``model`` compute ``factor`` times slower on this rank (no-op for factor <= 1)."""
    return Straggler(model, factor) if factor > 1 else None
