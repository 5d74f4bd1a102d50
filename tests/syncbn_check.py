"""Run under mpirun: SyncBatchNorm at n ranks x local batches equals BatchNorm on the whole batch.

Writes the largest differences (outputs, gradients, running statistics) per case to argv[1].
Losses are sums over the global batch divided by its size and gradients are summed over
ranks, so uneven and empty local batches compare exactly with one process.
"""
import copy
import json
import sys

import torch
from mpi4py import MPI
from torch import nn

from mpicnn.training.syncbn import convert

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))
X = torch.randn(16, 3, 8, 8)
T = torch.randn(16, 5)


def splits(case):
    """Per-rank sample counts of the global batch of 16."""
    if case == "even":
        return [16 // size + (r < 16 % size) for r in range(size)]
    if case == "uneven":
        return [3] + [13 // (size - 1) + (r < 13 % (size - 1)) for r in range(size - 1)]
    return [0] + [16 // (size - 1) + (r < 16 % (size - 1)) for r in range(size - 1)]   # empty


def run(net, x, t, total, reduce):
    """Two training steps' forward and backward; (last output, summed gradients)."""
    for _ in range(2):
        net.zero_grad()
        y = net(x)
        (((y - t) ** 2).sum() / total).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    if reduce:
        for g in grads:
            comm.Allreduce(MPI.IN_PLACE, g.numpy(), op=MPI.SUM)
    return y.detach(), grads


result = {}
for case in ("even", "uneven", "empty"):
    counts = splits(case)
    lo = sum(counts[:rank])
    synced = convert(copy.deepcopy(model), comm.Dup())
    y, grads = run(synced, X[lo: lo + counts[rank]], T[lo: lo + counts[rank]], 16, True)
    outputs = comm.gather(y, root=0)
    buffers = [b.clone() for b in synced.buffers()]
    if rank == 0:
        reference = copy.deepcopy(model)
        y_ref, g_ref = run(reference, X, T, 16, False)
        result[case] = {
            "counts": counts,
            "output": (torch.cat(outputs) - y_ref).abs().max().item(),
            "grads": max((a - b).abs().max().item() for a, b in zip(grads, g_ref)),
            "buffers": max((a.double() - b.double()).abs().max().item()
                           for a, b in zip(buffers, reference.buffers())),
            "grad_scale": max(g.abs().max().item() for g in g_ref),
        }
if rank == 0:
    with open(sys.argv[1], "w") as fh:
        json.dump(result, fh)
