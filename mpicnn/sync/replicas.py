"""Keeping model replicas equal: broadcast from rank 0, average buffers (no pickling)."""
from __future__ import annotations

import torch

from .flat import flatten, unflatten_into


def host_view(tensor: torch.Tensor):
    """A contiguous CPU buffer for ``tensor`` (CUDA tensors are copied to the host)."""
    if tensor.device.type == "cpu" and tensor.is_contiguous():
        return tensor, False
    return tensor.detach().to("cpu", copy=True).contiguous(), True


def flat_state(module: torch.nn.Module, floating_only: bool = False):
    """Parameters and buffers of ``module`` grouped by dtype (for one collective per dtype)."""
    groups = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        if floating_only and not tensor.is_floating_point():
            continue
        groups.setdefault(tensor.dtype, []).append(tensor)
    return groups


def broadcast_module(comm, module: torch.nn.Module, root: int = 0) -> None:
    """Copy ``root``'s parameters and buffers to every rank."""
    for tensors in flat_state(module).values():
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
