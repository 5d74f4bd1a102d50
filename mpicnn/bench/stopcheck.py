"""``mpirun -n N python -m mpicnn.bench stopcheck``: what the per-step stop agreement costs.

Measures (1) the latency of the agreement alone (one 8-byte allreduce, as
``Strategy.agree_stop`` does) and (2) training throughput of the real loop with the check
every step against the check switched off (``--stop-check-every 0``), alternating runs so
machine noise hits both alike. Extra arguments go to ``mpicnn.train``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def agreement_latency_us(comm, calls: int) -> float:
    """Mean microseconds of one stop agreement (after a barrier, so ranks start together)."""
    from ..cluster.world import reduce_sums

    comm.Barrier()
    start = time.perf_counter()
    for _ in range(calls):
        reduce_sums(comm, [0.0])
    return (time.perf_counter() - start) / calls * 1e6


def step_rate(path: Path) -> tuple[float, float]:
    """(images per second, milliseconds per step) from a run's metrics file."""
    from ..observe.report import load_run

    run = load_run(str(path))
    rate = run.end["images_per_s"]
    return rate, 1000 * run.config["batch_size"] * run.config["world_size"] / rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpicnn.bench stopcheck")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting")
    parser.add_argument("--calls", type=int, default=5000, help="agreements timed alone")
    args, train_args = parser.parse_known_args(argv)

    from ..cluster.world import init_world, make_logger
    from ..train import train

    world = init_world()
    latency = agreement_latency_us(world.comm, args.calls)
    latency = world.comm.allreduce(latency) / world.size
    out = Path(world.comm.bcast(tempfile.mkdtemp(prefix="mpicnn-stopcheck-")
                                if world.is_root else None, root=0))
    log, world.log = world.log, make_logger(False)
    rates = {0: [], 1: []}
    for repeat in range(args.repeats):
        for every in rates:
            metrics = out / f"run-{repeat}-{every}.jsonl"
            train(world, [*train_args, "--max-steps", str(args.steps), "--epochs", "1000",
                          "--stop-check-every", str(every), "--progress", "off",
                          "--metrics", str(metrics)])
            if world.is_root:
                rates[every].append(step_rate(metrics))
    world.log = log
    if world.is_root:
        off, on = (statistics.median(r for r, _ in rates[every]) for every in (0, 1))
        step_ms = statistics.median(ms for _, ms in rates[0])
        log.info(f"stopcheck: {world.size} rank(s); one agreement (8-byte allreduce) "
                 f"{latency:.1f} us; training {off:.0f} images/s without the check, "
                 f"{on:.0f} with it every step (median of {args.repeats}; ratio "
                 f"{on / off:.3f}); check = {latency / 1000 / step_ms * 100:.2f}% of a "
                 f"{step_ms:.1f} ms step")
    return 0
