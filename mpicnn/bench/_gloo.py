"""A gloo process group over the MPI ranks, for the DDP peers of the benchmarks."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(world):
    """Run the block in a gloo process group (MPI numbers the ranks and shares the port).

    Rank 0 listens on ``MASTER_ADDR`` (across emulated nodes: its address on the bridge),
    else on the loopback of this node.
    """
    import torch.distributed as dist

    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = world.comm.bcast(free_port(address) if world.is_root else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}",
                            rank=world.rank, world_size=world.size)
    try:
        yield
    finally:
        dist.destroy_process_group()
