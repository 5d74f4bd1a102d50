"""MPI messages that fit MPI's int counts: the one splitter for every buffer the package sends."""
from __future__ import annotations

MAX_MESSAGE_BYTES = 1 << 30      # far below 2**31-1, counted in elements or in bytes


def chunk_bounds(count: int, itemsize: int,
                 max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[int, int]]:
    """Split ``count`` items into [lo, hi) ranges of at most ``max_bytes``; (0, 0) if none."""
    per = max(1, max_bytes // itemsize)
    # An empty buffer is still one (empty) message, so that sends and receives pair up.
    return [(lo, min(count, lo + per)) for lo in range(0, count, per)] or [(0, 0)]


def chunks(buffer, max_bytes: int = MAX_MESSAGE_BYTES) -> list:
    """Cut the 1-D ``buffer`` (a tensor or an array) into views, one per message."""
    return [buffer[lo:hi] for lo, hi in chunk_bounds(len(buffer), buffer.itemsize, max_bytes)]
