"""Keeping model replicas equal: broadcast from rank 0, average buffers (no pickling)."""
from __future__ import annotations

import torch

from .flat import flatten, unflatten_into


def by_dtype(module: torch.nn.Module) -> dict:
    """Group the parameters and buffers of ``module`` by dtype (one collective per dtype)."""
    groups = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        groups.setdefault(tensor.dtype, []).append(tensor)
    return groups


def broadcast_module(comm, module: torch.nn.Module, root: int = 0) -> None:
    """Copy ``root``'s parameters and buffers to every rank."""
    for tensors in by_dtype(module).values():
        flat = flatten(tensors, device="cpu")
        comm.Bcast(flat, root=root)
        unflatten_into(flat, tensors)


def average_buffers(comm, module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks."""
    from mpi4py import MPI

    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers or comm.Get_size() == 1:
        return
    flat = flatten(buffers, dtype=torch.float64, device="cpu")
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    flat /= comm.Get_size()
    unflatten_into(flat, buffers)
