"""The hooks the training loop calls around each step: stall heartbeats, NaN policy, drills.

The loop marks each step's exchange for the watchdog (from before after_backward()
until the update is applied), asks the NaN policy whether to apply the update, and
lets a stall drill (tests only) sleep where it asked to.
"""
from __future__ import annotations

from . import drills
from .nan_policy import NanGuard, grads_finite
from .watchdog import COMPUTE, SERVE, WAIT, Watchdog


class StepGuard:
    """The NaN policy and stall heartbeats of the failure section (built on every rank)."""

    def __init__(self, failure, world):
        self.policy = NanGuard(failure.nan_policy, world.log)
        self.sleeps = drills.parse_sleeps(drills.drill_sleep_spec(), world.rank)
        limits = (failure.stall_warn, failure.stall_abort, failure.unreachable_abort)
        watch = world.size > 1 and any(limit > 0 for limit in limits)
        self.watchdog = Watchdog(world, *limits) if watch else None

    def _mark(self, state: int, step: int) -> None:
        if self.watchdog is not None:
            self.watchdog.mark(state, step)

    def name_ranks(self, labels) -> None:
        """What each rank is (e.g. "stage 1 of 2, replica 0"), named in stall reports."""
        if self.watchdog is not None and labels:
            self.watchdog.labels = list(labels)

    def serving(self) -> None:
        """This rank serves the others (a parameter server): it waits by design."""
        self._mark(SERVE, 0)

    def exchanging(self, step: int) -> None:
        """Step ``step``'s gradient exchange begins (a stall drill may sleep first)."""
        drills.stall(self.sleeps, step)
        self._mark(WAIT, step)

    def allows_update(self, params, step: int, lr: float, agreed: bool) -> bool:
        """Whether to apply step ``step``'s update by the NaN policy (may raise)."""
        return self.policy.apply(grads_finite(params), step, lr, agreed=agreed)

    def computing(self, step: int) -> None:
        """Step ``step``'s exchange is over; the rank computes toward step ``step + 1``."""
        self._mark(COMPUTE, step + 1)

    def close(self) -> None:
        """Stop the watchdog once every rank finished (it waits for their last heartbeats)."""
        if self.watchdog is not None:
            self.watchdog.close(orderly=True)
