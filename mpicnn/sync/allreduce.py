"""Synchronous data parallelism: average gradients over all ranks every step."""
from __future__ import annotations

import torch

from .base import Strategy
from .collectives import average_buffers, broadcast_module, host_view


class AllreduceStrategy(Strategy):
    """Plain and correct: one flat Allreduce of all gradients after backward."""

    name = "allreduce"

    def attach(self, model, optimizer, scheduler) -> None:
        super().attach(model, optimizer, scheduler)
        broadcast_module(self.world.comm, model)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def after_backward(self) -> None:
        from mpi4py import MPI

        if self.world.size == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        buf, staged = host_view(flat)
        self.world.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if staged:
            flat.copy_(buf)
        flat /= self.world.size
        offset = 0
        for p in self.params:
            p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def sync_buffers(self) -> None:
        average_buffers(self.world.comm, self.model)
