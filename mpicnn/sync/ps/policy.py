"""Server-side decisions, as pure functions: SSP replies and handing out batches."""
from __future__ import annotations

from ...cluster.errors import MpicnnError
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


def stop_step(position: int, every: int) -> int:
    """The first global step >= ``position`` at which the loop checks for a stop."""
    every = max(1, every)
    return -(-position // every) * every


class Dispatcher:
    """Hands out the items (per-worker batches) of an epoch, first come first served.

    Item ``i`` of an epoch is slice ``i % workers`` of global batch ``i // workers``, so
    the epoch trains on exactly the batches of the synchronous modes, whoever computes
    them. Each worker's first request of an epoch gets "its" item ``first + worker``, so
    every worker trains (and checks for a stop) at least once per epoch; the others go
    in order to whoever asks.
    """

    def __init__(self, workers: int):
        self.workers, self.stop_at = workers, None
        self.epoch, self.first, self.next, self.end, self.base = -1, 0, 0, 0, 0
        self.served: set[int] = set()

    def open(self, epoch: int, first: int, end: int, base: int) -> None:
        """Hand out items ``first .. end-1`` of ``epoch``, whose item 0 is global item ``base``."""
        if epoch != self.epoch:
            self.epoch, self.first, self.end, self.base = epoch, first, end, base
            self.next, self.served = min(first + self.workers, end), set()
            self._cap()

    def take(self, worker: int) -> int:
        """The next item for ``worker``, or NO_ITEM when the epoch's items are all handed out."""
        if worker not in self.served:
            self.served.add(worker)
            if self.first + worker < self.end:
                return self.first + worker
        if self.next >= self.end:
            return NO_ITEM
        self.next += 1
        return self.next - 1

    def stop(self, every: int) -> int:
        """Stop at the first checked global step after every item handed out; returns it.

        When the epoch's items are all out, some worker may already have ended the epoch
        without hearing of the stop, so the stop moves to the next epoch.
        """
        if self.stop_at is None:
            after = -(-(self.base + self.next) // self.workers)
            self.stop_at = stop_step(after + (self.next >= self.end), every)
            self._cap()
        return self.stop_at

    def _cap(self) -> None:
        if self.stop_at is not None:
            self.end = max(self.first, min(self.end, self.stop_at * self.workers - self.base))


def staleness_bound(text: str) -> int | None:
    """``--staleness`` as a whole number of clocks >= 0, or None for unbounded."""
    text = text.strip().lower()
    if text in ("none", "inf", "unbounded"):
        return None
    try:
        bound = int(text)
    except ValueError:
        bound = -1
    if bound < 0:
        raise MpicnnError(f"--staleness must be a whole number >= 0 or 'none' (unbounded), "
                          f"got {text!r}", collective=True)
    return bound
