"""A gloo process group over the MPI ranks, for the DDP peers of the benchmarks."""
from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(world):
    """Run the block in a gloo process group (MPI numbers the ranks and shares the port).

    Rank 0 listens on ``MASTER_ADDR`` (across emulated nodes: its address on the bridge),
    else on the loopback of this node. On the way out every rank meets at a barrier, so no
    rank closes its gloo connections while another still uses them.
    """
    import torch.distributed as dist

    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = world.comm.bcast(free_port(address) if world.is_root else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}",
                            rank=world.rank, world_size=world.size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def exit_skipping_finalization(code: int) -> None:
    """End a DDP peer: finalize MPI, flush, and leave without Python's finalization.

    torch 2.13's gloo worker threads outlive ``destroy_process_group``; one that frees the
    last collective's Python tensor while the interpreter finalizes cannot take the GIL,
    is unwound and aborts the process ("terminate called without an active exception",
    about 1 run in 40 here). Nothing is left to run at that point but destructors.
    """
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
