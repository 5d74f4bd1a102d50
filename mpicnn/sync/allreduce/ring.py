"""Ring allreduce of point-to-point messages: mpicnn's own sum across 3 or more nodes.

Reduce-scatter, then allgather, around the ring of ranks (Patarasuk and Yuan): each of
2(P-1) steps sends one P-th of the buffer to the right neighbour while receiving one from
the left. Every rank's link carries 2(P-1)/P of the buffer each way, the least any
allreduce can. A segment is summed once, in ring order, and then copied, so every rank ends
with the same bits.

Why not the MPI library's own Allreduce: MPICH 5.0.2 picks recursive doubling or
reduce-scatter/allgather by halving for large buffers, which on 4 nodes over TCP at 1 Gbit/s
took 175 ms (UCX) and 117 ms (OFI) for 8 MB where this ring takes about 100 ms (the link
bound is 96 ms). With 2 nodes both send the buffer once each way: the ring is used from
3 nodes on (``--cross-node``).
"""
from __future__ import annotations

import torch

RING_MIN_BYTES = 1 << 20        # smaller buffers: latency (2(P-1) steps) outweighs bandwidth
RING_MIN_NODES = 3              # on 2 nodes every algorithm moves the same bytes
TAG = 23


def uses_ring(choice: str, nodes: int) -> bool:
    """Whether ``--cross-node choice`` sums across ``nodes`` nodes with the ring."""
    return choice == "ring" and nodes >= RING_MIN_NODES


def worth_a_ring(tensor: torch.Tensor, ranks: int) -> bool:
    """Whether ``tensor`` is large enough (and the ranks many enough) for the ring."""
    return ranks >= RING_MIN_NODES and tensor.numel() * tensor.element_size() >= RING_MIN_BYTES


def _sync(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cuda":    # MPI must not read what a kernel still writes
        torch.cuda.current_stream(tensor.device).synchronize()


def ring_allreduce(comm, buf: torch.Tensor, datatype, spec) -> None:
    """Sum the 1-D ``buf`` over the ranks of ``comm``, in place.

    ``spec(tensor, datatype)`` turns a tensor into an mpi4py buffer (``transport.mpi_buffer``).
    The sums are the tensor dtype's own additions (fp32, or fp16/bf16 on the wire).
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    n = buf.numel()
    bounds = [n * i // size for i in range(size + 1)]

    def segment(i: int) -> torch.Tensor:
        i %= size
        return buf[bounds[i]: bounds[i + 1]]

    right, left = (rank + 1) % size, (rank - 1) % size
    scratch = torch.empty(-(-n // size), dtype=buf.dtype, device=buf.device)
    for step in range(size - 1):                  # reduce-scatter
        send, target = segment(rank - step), segment(rank - step - 1)
        incoming = scratch[: target.numel()]
        comm.Sendrecv(spec(send, datatype), dest=right, sendtag=TAG,
                      recvbuf=spec(incoming, datatype), source=left, recvtag=TAG)
        target.add_(incoming)
        _sync(target)
    for step in range(size - 1):                  # allgather: rank r owns segment r + 1
        comm.Sendrecv(spec(segment(rank + 1 - step), datatype), dest=right, sendtag=TAG,
                      recvbuf=spec(segment(rank - step), datatype), source=left, recvtag=TAG)
