"""The NaN policy: what to do when a step's gradient holds NaN or Inf.

The check reads the gradient after synchronisation. With allreduce that gradient is
the same on every rank and a non-finite loss anywhere makes it non-finite everywhere
(NaN + x = NaN), so every rank reaches the same decision without an extra collective.
"""
from __future__ import annotations

import torch

from ..cluster.errors import MpicnnError

# A run that only produces non-finite gradients is not training; stop it.
MAX_CONSECUTIVE_SKIPS = 20


def nonfinite_flag(grads, device=None) -> torch.Tensor:
    """1.0 (a float 0-d tensor on the device) when some element of ``grads`` is NaN or Inf.

    One multi-tensor pass over all gradients (GradScaler's non-finite check with a scale
    of 1, which leaves every value as it is): a few kernels however many tensors, and on
    the CPU 1.3x faster than a sum per tensor (seednet). Nothing is read back to the host.
    """
    found = torch.zeros((), device=device if device is not None else
                        (grads[0].device if grads else None))
    if grads:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, _one(found.device))
    return found


_ONES: dict = {}


def _one(device) -> torch.Tensor:
    """A float 1 on ``device``, made once (the unscale factor that changes nothing)."""
    if device not in _ONES:
        _ONES[device] = torch.ones((), device=device)
    return _ONES[device]


def grads_finite(params) -> bool:
    """Whether every gradient element of ``params`` is finite (reads the device)."""
    return not bool(nonfinite_flag([p.grad for p in params if p.grad is not None]))


class NanGuard:
    """Decide per step whether to apply the update; abort or count skips by ``policy``."""

    def __init__(self, policy: str, log, max_consecutive: int = MAX_CONSECUTIVE_SKIPS):
        self.policy, self.log, self.max_consecutive = policy, log, max_consecutive
        self.skipped = self.consecutive = 0

    def apply(self, finite: bool, step: int, lr: float, agreed: bool) -> bool:
        """True to apply step ``step``'s update; raise when the policy says stop.

        ``agreed``: every rank saw the same gradient, so the error is collective.
        """
        if finite:
            self.consecutive = 0
            return True
        where = f"non-finite loss or gradient at step {step} (lr {lr:.6g})"
        if self.policy == "abort":
            raise MpicnnError(f"{where}: training diverged or the data holds NaN/Inf; lower "
                              f"--lr, check the data, or pass --nan-policy skip",
                              collective=agreed)
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise MpicnnError(f"{where}: the last {self.consecutive} updates were all "
                              f"skipped; lower --lr or check the data", collective=agreed)
        self.log.warning(f"{where}: update skipped ({self.skipped} so far)")
        return False
