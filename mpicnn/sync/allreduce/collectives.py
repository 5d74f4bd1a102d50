"""The ``Collective`` family: how one buffer is summed over all ranks.

Flat (one Allreduce), hierarchical (node by node) and shared-memory (MPI-3 windows of
one node on CPU). Each owns duplicated communicators, so the engine's collectives
(issued from the communication thread) can never match a collective of the main thread.
Across 3 or more nodes, large buffers go around mpicnn's ring (``ring``) instead of the
MPI library's Allreduce unless ``--cross-node mpi``.
"""
from __future__ import annotations

import torch

from ..messages import chunks
from .ring import ring_allreduce, worth_a_ring
from .transport import mpi_buffer


def _sum(comm, part: torch.Tensor, datatype, op, spec, ring: bool) -> None:
    """Sum ``part`` over ``comm`` in place: the ring where asked and worth it, else MPI."""
    from mpi4py import MPI

    if ring and worth_a_ring(part, comm.Get_size()):
        ring_allreduce(comm, part, datatype, spec)
    else:
        comm.Allreduce(MPI.IN_PLACE, spec(part, datatype), op=op)


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
    """One ``Allreduce`` over every rank (``ring``: mpicnn's ring for large buffers)."""

    def __init__(self, comm, ring: bool = False):
        self.comm, self.ring = comm.Dup(), ring

    def describe(self) -> str:
        return "flat ring (mpicnn's, large buckets)" if self.ring else "flat Allreduce"

    def __call__(self, buf, datatype, op, spec) -> None:
        for part in chunks(buf):
            _sum(self.comm, part, datatype, op, spec, self.ring)

    def free(self) -> None:
        self.comm.Free()


class HierarchicalAllreduce(Collective):
    """Reduce within each node, allreduce across node leaders, broadcast within the node."""

    def __init__(self, comm, local_comm, ring: bool = False):
        from mpi4py import MPI

        self.ring = ring
        self.local = local_comm.Dup()
        self.leader = self.local.Get_rank() == 0
        self.leaders = comm.Split(0 if self.leader else MPI.UNDEFINED, comm.Get_rank())
        self.nodes = comm.allreduce(int(self.leader))

    def describe(self) -> str:
        across = "leaders' ring" if self.ring else "leaders' Allreduce"
        return f"hierarchical ({self.nodes} node(s): Reduce, {across}, Bcast)"

    def __call__(self, buf, datatype, op, spec) -> None:
        from mpi4py import MPI

        for chunk in chunks(buf):
            part = spec(chunk, datatype)
            if self.local.Get_size() > 1:
                if self.leader:
                    self.local.Reduce(MPI.IN_PLACE, part, op=op, root=0)
                else:
                    self.local.Reduce(part, None, op=op, root=0)
            if self.leader and self.leaders.Get_size() > 1:
                _sum(self.leaders, chunk, datatype, op, spec, self.ring)
            if self.local.Get_size() > 1:
                self.local.Bcast(part, root=0)

    def free(self) -> None:
        from mpi4py import MPI

        self.local.Free()
        if self.leaders != MPI.COMM_NULL:
            self.leaders.Free()

SLICE_BYTES = 256 << 10          # summed then divided while still in cache
# Across nodes a slice travels in pieces: a message on another channel (--overlap-forward's
# last bucket) then waits behind one piece in the shared connection, not a whole slice.
# Measured at 2x2, 1 Gbit/s, seednet batch 8, --overlap-forward, medians of 3 images/s:
# fp32 pieces of 256 KiB 262, 1 MiB 276; bf16 256 KiB 389, 512 KiB 392, 1 MiB 371.
ACROSS_PIECE_ELEMENTS = 1 << 18


class SharedMemoryAllreduce(Collective):
    """Buckets in shared windows of each node, slices summed across nodes by MPI.

    Each bucket lives in an MPI-3 shared window (``Win.Allocate_shared`` on the node's
    communicator), so every rank can read every other rank's bucket. To average one,
    each rank sums its own slice of all ranks' buckets in rank order, divides it, and
    writes the mean into that slice of every rank's bucket. Nobody else touches that
    slice meanwhile, so two barriers suffice (gradients written; means written), and
    there is no message pipeline: a rank works on its slice at its own pace, so the
    exchange tolerates cores shared with backward. Memory traffic is two bucket sizes
    per rank, against about five for a two-copy Allreduce. Summing in rank order makes
    the result independent of the bucket layout.

    Across nodes (every node with the same number of ranks), the owner of a slice
    allreduces its node's sum of that slice with the owners of the same slice on the
    other nodes before dividing: every local rank carries its share of the cross-node
    traffic, and each node's link carries the leaders' volume of a hierarchical
    allreduce, not the flat ring's.
    """

    def __init__(self, local_comm, comm=None, ring: bool = False):
        self.ring = ring
        self.comm = local_comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.total = self.size if comm is None else comm.Get_size()
        self.nodes = self.total // self.size
        # the owners of one slice, one per node, in node order
        self.across = comm.Split(self.rank, comm.Get_rank()) if self.nodes > 1 else None
        self.fallback = FlatAllreduce(self.comm if comm is None else comm, ring)
        self._windows = {}       # data_ptr of this rank's segment -> (window, all segments)

    def describe(self) -> str:
        if self.across is None:
            return f"MPI shared-memory windows ({self.size} ranks of one node)"
        how = "mpicnn's ring" if self.ring else "MPI Allreduce"
        return (f"MPI shared-memory windows within each of {self.nodes} nodes ({self.size} "
                f"ranks each), each rank's slice summed across nodes by {how}")

    def allocate(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        from mpi4py import MPI

        itemsize = torch.empty(0, dtype=dtype).element_size()
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")   # each segment on its owner's pages
        window = MPI.Win.Allocate_shared(numel * itemsize, itemsize, info=info, comm=self.comm)
        info.Free()
        window.Lock_all(MPI.MODE_NOCHECK)            # the epoch in which Sync orders memory
        segments = [torch.frombuffer(window.Shared_query(r)[0], dtype=dtype, count=numel)
                    for r in range(self.size)]
        own = segments[self.rank]
        own.zero_()
        self._windows[own.data_ptr()] = (window, segments)
        return own

    def release(self, tensor: torch.Tensor) -> None:
        window, _ = self._windows.pop(tensor.data_ptr())
        window.Unlock_all()
        window.Free()

    def averages(self, tensor: torch.Tensor) -> bool:
        return tensor.data_ptr() in self._windows

    def average(self, flat: torch.Tensor, codec=None) -> None:
        """Replace this rank's bucket ``flat`` by the mean of all ranks' buckets.

        With a compressing ``codec`` only the exchange across nodes is compressed: each
        node's sums are exact, then cast (already divided) for the wire.
        """
        window, segments = self._windows[flat.data_ptr()]
        n, size = flat.numel(), self.size
        lo, hi = n * self.rank // size, n * (self.rank + 1) // size
        step = max(1, SLICE_BYTES // flat.element_size())
        divisor = self.total
        self._fence(window)                          # every rank's gradients are written
        if self.across is not None:                  # the node's sums, then one Allreduce
            sums = torch.empty(max(hi - lo, 1), dtype=flat.dtype)
            for start in range(lo, hi, step):
                self._sum_local(segments, start, min(hi, start + step),
                                sums[start - lo: min(hi, start + step) - lo])
            if self._across_nodes(sums[: hi - lo], codec):
                divisor = 1                          # the wire carried means already
        else:
            sums = torch.empty(min(step, max(hi - lo, 1)), dtype=flat.dtype)
        for start in range(lo, hi, step):
            stop = min(hi, start + step)
            if self.across is not None:
                total = sums[start - lo: stop - lo]
            else:
                total = sums[: stop - start]
                self._sum_local(segments, start, stop, total)
            mean = flat[start:stop]
            torch.div(total, divisor, out=mean)
            for segment in segments:                 # the owner of a slice writes it everywhere
                if segment is not flat:
                    segment[start:stop].copy_(mean)
        self._fence(window)                          # every slice is averaged, in every bucket

    def share(self, flat: torch.Tensor, finish, unit: int = 1, met: bool = False) -> None:
        """Replace the node's buckets ``flat`` by what ``finish`` makes of their sum.

        Each rank takes its share of ``flat`` (whole multiples of ``unit`` elements), sums
        it over the node's buckets, calls ``finish(start, stop, total)`` to turn that sum
        into the final values in place, and writes them into every rank's bucket.
        ``met``: every rank has called :meth:`publish` and met the others in a collective
        since writing its bucket, so no barrier is needed to read them.
        """
        window, segments = self._windows[flat.data_ptr()]
        units = flat.numel() // unit
        lo = unit * (units * self.rank // self.size)
        hi = unit * (units * (self.rank + 1) // self.size)
        if met:
            window.Sync()                            # see what the others published
        else:
            self._fence(window)                      # every rank's gradients are written
        total = torch.empty(hi - lo, dtype=flat.dtype)
        self._sum_local(segments, lo, hi, total)
        finish(lo, hi, total)
        for segment in segments:
            segment[lo:hi].copy_(total)
        self._fence(window)                          # every share is in every bucket

    def publish(self, flat: torch.Tensor) -> None:
        """Make this rank's writes to bucket ``flat`` visible to the node after the next
        collective that all of its ranks join (the write side of :meth:`share`'s ``met``)."""
        self._windows[flat.data_ptr()][0].Sync()

    def _sum_local(self, segments, start: int, stop: int, total: torch.Tensor) -> None:
        """``total`` = the sum of this node's buckets over ``[start, stop)``, in rank order."""
        if len(segments) == 1:
            total.copy_(segments[0][start:stop])
            return
        torch.add(segments[0][start:stop], segments[1][start:stop], out=total)
        for other in segments[2:]:
            total.add_(other[start:stop])

    def _across_nodes(self, sums: torch.Tensor, codec=None) -> bool:
        """Sum ``sums`` with the same slice of every other node; True when ``codec``
        compressed them, which leaves the means (divided before the cast) in ``sums``."""
        from mpi4py import MPI

        if codec is None or codec.wire_dtype is None:
            datatype = MPI.DOUBLE if sums.dtype == torch.float64 else MPI.FLOAT
            for part in chunks(sums, ACROSS_PIECE_ELEMENTS * sums.element_size()):
                _sum(self.across, part, datatype, MPI.SUM, mpi_buffer, self.ring)
            return False
        wire = codec.encode(("slice", sums.numel()), sums)     # one buffer per bucket size
        datatype, op = codec.mpi_spec(wire.dtype)
        for part in chunks(wire, ACROSS_PIECE_ELEMENTS * wire.element_size()):
            _sum(self.across, part, datatype, op, mpi_buffer, self.ring)
        sums.copy_(wire)
        return True

    def _fence(self, window) -> None:
        window.Sync()
        self.comm.Barrier()
        window.Sync()

    def __call__(self, buf, datatype, op, spec) -> None:
        self.fallback(buf, datatype, op, spec)

    def free(self) -> None:
        for window, _ in self._windows.values():
            window.Unlock_all()
            window.Free()
        self._windows = {}
        self.fallback.free()
        if self.across is not None:
            self.across.Free()
        self.comm.Free()
