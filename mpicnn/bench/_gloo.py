"""A gloo process group over the MPI ranks, for the DDP peers of the benchmarks."""
from __future__ import annotations

import socket
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(world):
    """Run the block in a gloo process group on this node (MPI numbers ranks, shares the port)."""
    import torch.distributed as dist

    port = world.comm.bcast(free_port() if world.is_root else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=world.rank, world_size=world.size)
    try:
        yield
    finally:
        dist.destroy_process_group()
