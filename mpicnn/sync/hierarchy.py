"""The collective that sums one buffer over all ranks: flat, or node by node.

Each owns duplicated communicators, so the engine's collectives (issued from the
communication thread) can never match a collective of the main thread.
"""
from __future__ import annotations

import torch

MAX_COUNT = 1 << 30              # MPI counts are C ints: split larger buffers


def chunks(numel: int, limit: int = MAX_COUNT):
    """(start, stop) element ranges of at most ``limit`` covering ``numel``."""
    return [(start, min(numel, start + limit)) for start in range(0, numel, limit)] or [(0, 0)]


class Collective:
    """Sums a buffer over all ranks, in place; may also own the memory of the buckets."""

    def allocate(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Zeroed memory for a bucket (collective over the ranks when it is shared)."""
        return torch.zeros(numel, dtype=dtype, device=device)

    def release(self, tensor: torch.Tensor) -> None:
        """Give back a bucket's memory from :meth:`allocate`."""

    def averages(self, tensor: torch.Tensor) -> bool:
        """Whether :meth:`average` can sum and divide ``tensor`` in one pass itself."""
        return False


class FlatAllreduce(Collective):
    """One ``Allreduce`` over every rank."""

    def __init__(self, comm):
        self.comm = comm.Dup()

    def describe(self) -> str:
        return "flat Allreduce"

    def __call__(self, buf, datatype, op, spec) -> None:
        from mpi4py import MPI

        for start, stop in chunks(buf.numel()):
            self.comm.Allreduce(MPI.IN_PLACE, spec(buf[start:stop], datatype), op=op)

    def free(self) -> None:
        self.comm.Free()


class HierarchicalAllreduce(Collective):
    """Reduce within each node, allreduce across node leaders, broadcast within the node."""

    def __init__(self, comm, local_comm):
        from mpi4py import MPI

        self.local = local_comm.Dup()
        self.leader = self.local.Get_rank() == 0
        self.leaders = comm.Split(0 if self.leader else MPI.UNDEFINED, comm.Get_rank())
        self.nodes = comm.allreduce(int(self.leader))

    def describe(self) -> str:
        return f"hierarchical ({self.nodes} node(s): Reduce, leaders' Allreduce, Bcast)"

    def __call__(self, buf, datatype, op, spec) -> None:
        from mpi4py import MPI

        for start, stop in chunks(buf.numel()):
            part = spec(buf[start:stop], datatype)
            if self.local.Get_size() > 1:
                if self.leader:
                    self.local.Reduce(MPI.IN_PLACE, part, op=op, root=0)
                else:
                    self.local.Reduce(part, None, op=op, root=0)
            if self.leader and self.leaders.Get_size() > 1:
                self.leaders.Allreduce(MPI.IN_PLACE, part, op=op)
            if self.local.Get_size() > 1:
                self.local.Bcast(part, root=0)

    def free(self) -> None:
        from mpi4py import MPI

        self.local.Free()
        if self.leaders != MPI.COMM_NULL:
            self.leaders.Free()
