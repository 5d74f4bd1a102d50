"""A strategy wrapper that adds the NaN policy and stall detection to any strategy.

It marks each step's exchange for the watchdog (from after_backward() until step()
returns), checks the synchronised gradient before the update, and forwards
everything else to the wrapped strategy, so the training loop stays unchanged.
"""
from __future__ import annotations

import sys

from ..cluster.errors import MpicnnError
from . import drills as faults
from .drills import drill_sleep_spec
from .nan_policy import NanGuard, grads_finite
from .watchdog import COMPUTE, SERVE, WAIT, Watchdog


class Supervised:
    """``strategy`` with the NaN policy and stall heartbeats of ``cfg`` (built on every rank)."""

    def __init__(self, strategy, cfg, world, state):
        self.inner, self.state = strategy, state
        self.guard = NanGuard(cfg.nan_policy, world.log)
        self.sleeps = faults.parse_sleeps(drill_sleep_spec(), world.rank)
        watch = world.size > 1 and (cfg.stall_warn > 0 or cfg.stall_abort > 0)
        self.watchdog = Watchdog(world, cfg.stall_warn, cfg.stall_abort) if watch else None
        self.params = []

    def __getattr__(self, name):          # everything not supervised goes to the strategy
        return getattr(self.inner, name)

    def _mark(self, state: int, ahead: int = 1) -> None:
        """Tell the watchdog this rank is now in ``state`` at step global_step + ``ahead``."""
        if self.watchdog is not None:
            self.watchdog.mark(state, self.state.global_step + ahead)

    def attach(self, model, optimizer, scheduler) -> None:
        if not self.inner.trains:         # a server waits on workers by design, never "missing"
            self._mark(SERVE)
        self.inner.attach(model, optimizer, scheduler)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def after_backward(self) -> None:
        faults.stall(self.sleeps, self.state.global_step + 1)
        self._mark(WAIT)
        self.inner.after_backward()

    def step(self) -> None:
        lr = self.inner.optimizer.param_groups[0]["lr"]
        if self.guard.apply(grads_finite(self.params), self.state.global_step + 1, lr,
                            agreed=self.inner.synced_grads):
            self.inner.step()
        else:
            self.inner.skip_step()
        self._mark(COMPUTE, ahead=2)      # the loop counts this step only after we return

    def finish(self) -> None:
        """Finish the strategy, then stop the watchdog (orderly unless this rank alone failed)."""
        failure = sys.exc_info()[1]
        try:
            self.inner.finish()
        finally:
            if self.watchdog is not None:
                self.watchdog.close(orderly=failure is None or (
                    isinstance(failure, MpicnnError) and failure.collective))
