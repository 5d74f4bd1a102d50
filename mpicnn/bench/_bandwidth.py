"""Bus bandwidth of one 25 MB bucket through the engine, against raw ``comm.Allreduce``.

``mpirun -n N python -m mpicnn.bench._bandwidth [--mb 25] [--reps 15] [engine flags]``
prints one JSON line (rank 0). The engine's time is ``after_backward()`` on a
model whose only parameter fills one bucket: handoff to the communication
thread, Allreduce and averaging, and the wait. Repetitions alternate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from ..cluster.world import run_guarded
from ..config import parse_config
from ..sync.allreduce.strategy import AllreduceStrategy


def bus_bandwidth(nbytes: int, seconds: float, ranks: int) -> float:
    """GB/s each rank's link carries in a ring allreduce (the nccl-tests convention)."""
    return nbytes * 2 * (ranks - 1) / max(ranks, 1) / seconds / 1e9


def run(world, argv) -> int:
    from mpi4py import MPI

    parser = argparse.ArgumentParser(prog="python -m mpicnn.bench._bandwidth")
    parser.add_argument("--mb", type=float, default=25.0)
    parser.add_argument("--reps", type=int, default=15)
    args, engine_flags = parser.parse_known_args(argv)
    numel = int(args.mb * (1 << 20)) // 4
    cfg = parse_config(["--bucket-mb", str(args.mb), *engine_flags])
    torch.set_num_threads(1)
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.zeros(numel))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    strategy = AllreduceStrategy(world, cfg)
    strategy.attach(model, optimizer, None)
    raw = np.ones(numel, dtype=np.float32)
    times = {"engine": [], "raw": []}

    def engine():
        strategy.after_backward()

    def plain():
        world.comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)

    for rep in range(args.reps + 1):             # the first repetition warms up
        order = [("engine", engine), ("raw", plain)]
        for name, call in order if rep % 2 else order[::-1]:
            for bucket in strategy.buckets:
                bucket.flat.fill_(1.0)
            raw.fill(1.0)                        # no denormals after repeated averaging
            world.comm.Barrier()
            start = time.perf_counter()
            call()
            elapsed = world.comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
            if rep:
                times[name].append(elapsed)
    strategy.finish()
    nbytes = numel * 4
    result = {"bytes": nbytes, "ranks": world.size, "buckets": 1}
    for name, values in times.items():
        median = statistics.median(values)
        result[f"{name}_ms"] = 1000 * median
        result[f"{name}_busbw_gbs"] = bus_bandwidth(nbytes, median, world.size)
    result["ratio"] = result["engine_busbw_gbs"] / result["raw_busbw_gbs"]
    if world.is_root:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(run, sys.argv[1:]))
