"""The hooks the training loop calls around each step: stall heartbeats, NaN policy, drills.

The loop marks each step's exchange for the watchdog (from before after_backward()
until the update is applied), asks the NaN policy whether to apply the update, and
lets a stall drill (tests only) sleep where it asked to.

A step's verdict is a device tensor (``FINE``, ``NONFINITE`` or ``OVERFLOW``, see
``step_code``). Where the optimizer skips a non-finite update on the device itself,
the loop ``defer``s the verdict and the guard judges the deferred steps in order at
the next ``settle`` (log intervals and the end of the loop), with one host read for
all of them: the bad update never landed, and the policy aborts (naming the first bad
step) or counts skips exactly as it would have step by step, only later.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from . import drills
from .nan_policy import NanGuard
from .watchdog import COMPUTE, PEER, SERVE, WAIT, Watchdog

FINE, NONFINITE, OVERFLOW = 0, 1, 2


def step_code(found: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """A step's verdict on the device: FINE, NONFINITE (the NaN policy's) or OVERFLOW.

    ``found``: the update's gradient is not finite; ``policy``: the NaN policy counts it
    (``found`` unless a loss scale overflowed, see ``Precision.verdict``).
    """
    return 2 * found - policy


class StepGuard:
    """The NaN policy and stall heartbeats of the failure section (built on every rank)."""

    def __init__(self, failure, world):
        self.policy = NanGuard(failure.nan_policy, world.log)
        self.pending: list = []         # deferred verdicts: (code, step, lr, agreed)
        self.overflows = 0              # steps skipped for a loss-scale overflow
        spec = drills.drill_sleep_spec()
        self.sleeps = drills.parse_sleeps(spec, world.rank)
        self.forward_sleeps = drills.parse_sleeps(spec, world.rank, where="forward")
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

    def waiting_for_peer(self):
        """Within a step, this rank waits for a neighbouring rank (a pipeline stage's input).

        Without the mark such a wait would count as computing, and a pipeline whose stage is
        stuck mid-step would show no rank waiting at all.
        """
        return self._marked_while(PEER, steps_back=0)

    def waiting_at_last_exchange(self):
        """This rank waits, in the next step, for the last step's gradient exchange
        (``--overlap-forward``): marked as that exchange, so a stuck one is reported and,
        past ``--stall-abort``, ends the job as it would after backward."""
        return self._marked_while(WAIT, steps_back=1)

    @contextmanager
    def _marked_while(self, state: int, steps_back: int):
        """Mark ``state`` at the current step (less ``steps_back``), then restore the mark."""
        if self.watchdog is None:
            yield
            return
        before, step, _ = self.watchdog.status
        self.watchdog.mark(state, max(1, step - steps_back))
        try:
            yield
        finally:
            self.watchdog.mark(before, step)

    def forwarding(self, step: int) -> None:
        """Step ``step``'s forward begins (a stall drill may sleep here)."""
        drills.stall(self.forward_sleeps, step)

    def exchanging(self, step: int) -> None:
        """Step ``step``'s gradient exchange begins (a stall drill may sleep first)."""
        drills.stall(self.sleeps, step)
        self._mark(WAIT, step)

    def allows_update(self, code, step: int, lr: float, agreed: bool) -> bool:
        """Whether to apply step ``step``'s update by its verdict ``code`` (reads it; may raise)."""
        return self._judge(int(code), step, lr, agreed)

    def defer(self, code: torch.Tensor, step: int, lr: float, agreed: bool) -> None:
        """Keep step ``step``'s verdict for the next ``settle`` (its update was skipped on the
        device if it was not FINE)."""
        self.pending.append((code, step, lr, agreed))

    def settle(self) -> None:
        """Judge the deferred steps in order: one host read for all of them (may raise)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        codes = torch.stack([code for code, *_ in pending]).tolist()
        for code, (_, step, lr, agreed) in zip(codes, pending):
            self._judge(int(code), step, lr, agreed)

    def _judge(self, code: int, step: int, lr: float, agreed: bool) -> bool:
        if code == OVERFLOW:          # the loss scale backs off; not the NaN policy's business
            self.overflows += 1
            return False
        return self.policy.apply(code == FINE, step, lr, agreed=agreed)

    def computing(self, step: int) -> None:
        """Step ``step``'s exchange is over; the rank computes toward step ``step + 1``."""
        self._mark(COMPUTE, step + 1)

    def close(self) -> None:
        """Stop the watchdog once every rank finished (it waits for their last heartbeats)."""
        if self.watchdog is not None:
            self.watchdog.close(orderly=True)
