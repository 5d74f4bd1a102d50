"""Run the allreduce engine on real ranks and write what it did to a JSON file.

``mpirun -n N python -m tests.engine_worker OUT.json``: every check compares the
engine's averaged gradients with the exact float64 mean of all ranks' gradients
(gathered separately), so nothing here can pass by agreeing with itself.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpicnn.cluster.world import init_world
from mpicnn.config import parse_config
from mpicnn.sync.allreduce.strategy import AllreduceStrategy
from mpicnn.sync.allreduce.transport import probe_cuda_support
from mpicnn.training.optim import build_optimizer, build_scheduler


class Shuffled(nn.Module):
    """Uses its layers in an order unlike their registration, and one parameter not at all."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(32, 4)
        self.unused = nn.Parameter(torch.ones(7))
        self.early = nn.Linear(6, 32)
        self.middle = nn.Linear(32, 32)

    def forward(self, x):
        return self.late(torch.relu(self.middle(torch.relu(self.early(x)))))


def make(world, flags, seed=0):
    cfg = parse_config(["--optimizer", "sgd", "--lr", "0.1", *flags])
    torch.manual_seed(seed)
    model = Shuffled()
    optimizer = build_optimizer(cfg.training, model.parameters(), 1)
    strategy = AllreduceStrategy(world, cfg)
    strategy.attach(model, optimizer, build_scheduler(cfg.training, optimizer, 10, 10))
    return model, strategy


def loss_of(model, world, step, scale=1.0):
    """A loss of this rank's data at ``step``; ``scale`` < 0: the same data on every rank."""
    gen = torch.Generator().manual_seed(1000 * step + (world.rank if scale > 0 else 0))
    x = torch.randn(5, 6, generator=gen)
    return (model(x) ** 2).mean() * abs(scale)


def local_grads(model, world, step, scale=1.0):
    """This rank's own gradients, computed aside (the engine averages .grad during backward)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_of(model, world, step, scale), params, allow_unused=True)
    return [torch.zeros_like(p, dtype=torch.float64) if g is None else g.double()
            for p, g in zip(params, grads)]


def exact_mean(world, grads):
    """Float64 mean over ranks, from an allgather of every rank's local gradients."""
    gathered = world.comm.allgather([g.numpy() for g in grads])
    return [np.mean([rank[i] for rank in gathered], axis=0) for i in range(len(grads))], \
        [np.sum([np.abs(rank[i]) for rank in gathered], axis=0) for i in range(len(grads))]


def errors(model, mean, abs_sum, unit):
    """Max |engine - exact| and the same relative to the bound ``ranks x unit x sum|g| / ranks``."""
    worst = worst_ratio = 0.0
    for p, m, s in zip(model.parameters(), mean, abs_sum):
        diff = np.abs(p.grad.double().numpy() - m)
        worst = max(worst, float(diff.max()))
        if unit:
            bound = unit * s + 2.0 ** -24       # per-add rounding, plus fp16 underflow
            worst_ratio = max(worst_ratio, float((diff / bound).max()))
    return worst, worst_ratio


def views_ok(strategy):
    for bucket in strategy.buckets:
        lo = bucket.flat.data_ptr()
        hi = lo + bucket.nbytes
        for p in bucket.params:
            if not lo <= p.grad.data_ptr() < hi:
                return False
    return bool(strategy.buckets)


def run_case(world, flags, steps=3, unit=0.0, scale=1.0, near_max=0.0):
    """Average ``steps`` steps' gradients through the engine; ``near_max``: one step whose
    largest gradient is that value on every rank (so an undivided fp16 sum overflows)."""
    model, strategy = make(world, flags)
    if near_max:
        largest = max(float(g.abs().max()) for g in local_grads(model, world, 0, -1.0))
        scale = -near_max / world.comm.allreduce(largest, op=MPI.MAX)
    result = {"max_error": 0.0, "bound_ratio": 0.0, "max_grad": 0.0}
    for step in range(steps):
        mean, abs_sum = exact_mean(world, local_grads(model, world, step, scale))
        result["max_grad"] = max(result["max_grad"], max(float(np.abs(m).max()) for m in mean))
        strategy.zero_grad()
        loss_of(model, world, step, scale).backward()
        strategy.after_backward()
        err, ratio = errors(model, mean, abs_sum, unit)
        result["max_error"] = max(result["max_error"], err)
        result["bound_ratio"] = max(result["bound_ratio"], ratio)
        strategy.step()
    result["views"] = views_ok(strategy)
    result["buckets"] = [b.members for b in strategy.buckets]
    result["overlaps"] = bool(strategy.runner and strategy.runner.overlaps)
    result["unused_grad_zero"] = bool((model.unused.grad == 0).all())
    result["describe"] = strategy.describe()
    result["params"] = [p.detach().double().numpy().tolist() for p in model.parameters()]
    strategy.finish()
    return result


def accumulation(world):
    """Two micro-batches under no_sync + one synced equal the gradient of the whole batch."""
    model, strategy = make(world, ["--bucket-mb", "0.001"])
    both = [a + b for a, b in zip(local_grads(model, world, 0), local_grads(model, world, 1))]
    mean, _ = exact_mean(world, both)
    strategy.zero_grad()
    with strategy.no_sync():
        loss_of(model, world, 0).backward()
    launched_in_no_sync = strategy.runner._outstanding
    loss_of(model, world, 1).backward()
    strategy.after_backward()
    err, _ = errors(model, mean, mean, 0.0)
    strategy.finish()
    return {"launched_in_no_sync": launched_in_no_sync, "max_error": err}


def main(out):
    world = init_world()
    small = ["--bucket-mb", "0.003"]          # several buckets on the tiny model
    results = {
        "size": world.size, "nodes": world.num_nodes,
        "probe": list(probe_cuda_support()),
        "engine": run_case(world, small),
        "mpi_engine": run_case(world, small + ["--shared-memory", "off"]),
        "one_bucket": run_case(world, ["--bucket-mb", "25"]),
        "plain": run_case(world, ["--bucket-mb", "0"]),
        "hierarchical": run_case(world, small + ["--hierarchical"]),
        "fp16": run_case(world, small + ["--compression", "fp16"], unit=2.0 ** -11),
        "bf16": run_case(world, small + ["--compression", "bf16"], unit=2.0 ** -8),
        "fp16_near_max": run_case(world, small + ["--compression", "fp16"], steps=1,
                                  unit=2.0 ** -11, near_max=60000.0),
        "accumulation": accumulation(world),
    }
    if world.is_root:
        with open(out, "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main(sys.argv[1])
