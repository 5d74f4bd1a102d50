"""Where a reader keeps the units it has read: a bounded LRU of slots, or a whole range.

Both stores hold rows in one preallocated array, ``rows``, and map every unit ``u``
to ``offsets[u]``: added to a split row of that unit, it gives the row's position in
``rows`` (MISSING while the unit is not held), so a reader locates a whole batch with
one numpy lookup. ``reserve`` says where a unit's rows go when it is read.
"""
from __future__ import annotations

from collections import deque

import numpy as np

MISSING = np.iinfo(np.int64).min    # "this unit is not held" (read its rows directly)


class SlabStore:
    """Up to ``capacity`` units in slots of one preallocated array, oldest evicted first."""

    def __init__(self, capacity: int, unit: int, units: int, sample_shape: tuple, dtype):
        capacity = max(1, capacity)
        self.unit = unit
        self.rows = np.empty((capacity * unit,) + tuple(sample_shape), dtype)
        self.offsets = np.full(units, MISSING, np.int64)
        self.loaded: deque = deque()                   # (unit, slot), oldest first
        self.free = list(range(capacity))[::-1]

    def reserve(self, unit: int, lo: int, n: int, keep) -> int | None:
        """Position in ``rows`` for the ``n`` rows of ``unit`` starting at split row ``lo``;
        evicts the oldest unit not in ``keep``, or returns None when all are in it."""
        if not self.free:
            for _ in range(len(self.loaded)):
                old, slot = self.loaded.popleft()
                if old not in keep:
                    self.offsets[old] = MISSING
                    self.free.append(slot)
                    break
                self.loaded.append((old, slot))
            else:
                return None
        slot = self.free.pop()
        self.loaded.append((unit, slot))
        self.offsets[unit] = slot * self.unit - lo
        return slot * self.unit


class RangeStore:
    """``--cache``: split rows ``[lo, hi)`` in one array, filled unit by unit as first read."""

    def __init__(self, lo: int, hi: int, units: int, sample_shape: tuple, dtype):
        self.lo, self.hi = lo, hi
        # np.empty maps pages lazily: memory is used only as units arrive
        self.rows = np.empty((hi - lo,) + tuple(sample_shape), dtype)
        self.offsets = np.full(units, MISSING, np.int64)

    def reserve(self, unit: int, lo: int, n: int, keep=()) -> int:
        """Position in ``rows`` where the ``n`` rows of ``unit`` from ``lo`` belong."""
        self.offsets[unit] = -self.lo
        return lo - self.lo
