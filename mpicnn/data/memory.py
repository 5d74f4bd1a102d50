"""Node memory for ``--cache``: what the node can still give, and whether the ranks fit."""
from __future__ import annotations

import os

from ..cluster.errors import MpicnnError

MEMINFO = "/proc/meminfo"
USABLE_SHARE = 0.8        # leave room for the OS, page cache and the models


def available_bytes(path: str = MEMINFO) -> int:
    """Memory the node can still give (MemAvailable), in bytes."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_cache_fits(need: int, local_size: int, available: int | None = None,
                     hint: str = "", flag: str = "--cache") -> None:
    """Fail clearly unless ``local_size`` ranks can each keep ``need`` bytes on this node."""
    available = available_bytes() if available is None else available
    budget = int(available * USABLE_SHARE) // max(1, local_size)
    if need > budget:
        raise MpicnnError(
            f"{flag} needs {gib(need)} per rank x {local_size} rank(s) on this node = "
            f"{gib(need * local_size)}, but the node has {gib(available)} available "
            f"({USABLE_SHARE:.0%} usable: {gib(budget)} per rank); run without {flag}"
            f"{hint}, or on more nodes")


def gib(nbytes: float) -> str:
    """``nbytes`` as GiB with two decimals."""
    return f"{nbytes / 2**30:.2f} GiB"
