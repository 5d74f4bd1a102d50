"""Test-only fault injection: make chosen ranks stall before a chosen step's exchange."""
from __future__ import annotations

import time

from .errors import MpicnnError


def parse_sleeps(spec: str, rank: int) -> dict[int, float]:
    """{step: seconds} for ``rank`` from ``'rank:step:seconds[,...]'`` (steps count from 1)."""
    sleeps = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            r, step, seconds = item.split(":")
            r, step, seconds = int(r), int(step), float(seconds)
        except ValueError:
            raise MpicnnError(f"test sleep {item!r} is not 'rank:step:seconds'") from None
        if r == rank:
            sleeps[step] = sleeps.get(step, 0.0) + seconds
    return sleeps


def stall(sleeps: dict[int, float], step: int) -> None:
    """Sleep as the drill asked for ``step`` (nothing outside drills)."""
    if step in sleeps:
        time.sleep(sleeps[step])
