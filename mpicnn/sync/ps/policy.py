"""Server-side decisions, as pure functions: SSP replies and handing out batches."""
from __future__ import annotations

from .protocol import NO_ITEM


def may_proceed(clock: int, clocks, active, bound: int | None) -> bool:
    """SSP: may a worker that has pushed ``clock`` gradients compute its next one?

    Yes when every still-active worker has pushed at least ``clock - bound`` gradients,
    so no worker runs more than ``bound`` clocks ahead of the slowest; ``bound`` None
    is unbounded (Downpour) and 0 is bulk-synchronous.
    """
    if bound is None:
        return True
    live = [c for c, a in zip(clocks, active) if a]
    return not live or min(live) >= clock - bound


class Dispatcher:
    """Hands out the items (per-worker batches) of an epoch in order, first come first served.

    Item ``i`` of an epoch is slice ``i % workers`` of global batch ``i // workers``, so
    the epoch trains on exactly the batches of the synchronous modes, whoever computes them.
    """

    def __init__(self):
        self.epoch, self.next, self.end = -1, 0, 0

    def open(self, epoch: int, first: int, end: int) -> None:
        """Start handing out items ``first .. end-1`` of ``epoch`` (once per epoch)."""
        if epoch != self.epoch:
            self.epoch, self.next, self.end = epoch, first, end

    def take(self) -> int:
        """The next item, or NO_ITEM when the epoch's items are all handed out."""
        if self.next >= self.end:
            return NO_ITEM
        self.next += 1
        return self.next - 1
