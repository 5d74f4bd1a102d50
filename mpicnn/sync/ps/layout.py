"""Who serves and who trains, and which slice of the flat parameters each server holds.

Pure functions: no MPI, so unit tests call them directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...cluster.errors import MpicnnError

ALIGN_BYTES = 64     # range boundaries on cache-line multiples


def partition(numel: int, servers: int, itemsize: int = 4,
              align_bytes: int = ALIGN_BYTES) -> list[tuple[int, int]]:
    """Split ``numel`` elements into ``servers`` contiguous [lo, hi) ranges of about equal bytes.

    Ranges ignore tensor boundaries (a big tensor may span servers); their sizes differ by
    at most one alignment unit.
    """
    if servers < 1:
        raise ValueError("servers must be at least 1")
    unit = max(1, align_bytes // itemsize)
    units = -(-numel // unit)
    bounds = [min(numel, units * s // servers * unit) for s in range(servers + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def partition_tensors(sizes: list[int], servers: int) -> list[tuple[int, int]]:
    """Split tensors of ``sizes`` elements, in order, into ``servers`` contiguous [lo, hi)
    ranges of whole tensors, each bound at the tensor end nearest an equal share.

    For optimizers that need a whole tensor's norms (LARS, LAMB). Raises MpicnnError when
    some server would get no tensor.
    """
    ends = np.cumsum([0, *sizes])
    numel = int(ends[-1])
    bounds = [0]
    for s in range(1, servers):
        target = numel * s / servers
        bounds.append(int(ends[np.argmin(np.abs(ends - target))]))
    bounds.append(numel)
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise MpicnnError(f"--servers {servers}: layer-wise optimizers keep whole tensors on "
                          f"a server, and these {len(sizes)} tensors ({numel} elements, the "
                          f"largest {max(sizes)}) leave a server without one; use fewer "
                          f"servers", collective=True)
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class Roles:
    """Ranks ``0 .. workers-1`` train; the last ``servers`` ranks hold the parameters.

    Workers first keeps rank 0 a worker, so logging, metrics and checkpoints stay with it.
    """

    size: int
    servers: int

    @property
    def workers(self) -> int:
        return self.size - self.servers

    def is_server(self, rank: int) -> bool:
        return rank >= self.workers

    def server_rank(self, index: int) -> int:
        return self.workers + index


def serves(mode: str, servers: int, rank: int, size: int) -> bool:
    """Whether ``rank`` is a parameter server (its range lives on the CPU) in this job."""
    return mode in ("ps-sync", "ps-async") and 1 <= servers < size and rank >= size - servers


def roles(size: int, servers: int, mode: str) -> Roles:
    """The role layout for ``size`` ranks, or a clear error when it cannot work."""
    if size < 2:
        raise MpicnnError(f"--mode {mode} needs at least 2 ranks (a parameter server and a "
                          f"worker); launch with mpirun -n 2 or more, or use --mode allreduce",
                          collective=True)
    if servers >= size:
        raise MpicnnError(f"--servers {servers} leaves no worker among {size} ranks; use "
                          f"--servers {size - 1} or fewer, or launch more ranks",
                          collective=True)
    return Roles(size, servers)
