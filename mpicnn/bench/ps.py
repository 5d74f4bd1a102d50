"""``python -m mpicnn.bench ps``: allreduce vs ps-sync vs ps-async, with and without a straggler.

Each configuration is one real ``mpirun ... python -m mpicnn.train`` job on the same data,
model and epochs; allreduce runs on the workers alone, the PS modes on workers + servers.
Reported per job: training images/s (the end record's, and whole-run: trained images over
the time from the first to the last metrics record), final validation accuracy, wall time.

With ``--nodes N`` (root) every job runs across N emulated nodes instead
(``mpicnn.cluster``), ranks placed one per node in turn: with 2 workers, 1 server and 2
nodes, worker 0 and the server share node 1, and the straggler (the last worker) has
node 2 to itself. Where each node has a core of its own, a slowed worker's idle time is
not handed to the other ranks, as it is when all ranks share the machine's cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..cluster.netns import Cluster, free_subnet, rate_bits
from . import launch


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpicnn.bench ps",
                                description="Images/s and accuracy of allreduce, ps-sync and "
                                            "ps-async, with and without a straggler.")
    p.add_argument("--workers", type=int, default=4, help="training ranks (default 4)")
    p.add_argument("--servers", type=int, default=1, help="PS server ranks (default 1)")
    p.add_argument("--epochs", type=int, default=12, help="epochs per job (default 12)")
    p.add_argument("--slow-factor", type=float, default=2.0,
                   help="straggler: the last worker computes this many times slower")
    p.add_argument("--modes", default="allreduce,ps-sync,ps-async",
                   help="comma-separated modes to run (default: all three)")
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions of every job, in rotating order; medians reported")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    p.add_argument("--nodes", type=int, default=0,
                   help="run every job across this many emulated nodes, ranks placed one per "
                        "node in turn (root; default 0: plain mpirun on this machine)")
    p.add_argument("--rate", default="", help="with --nodes: link rate, e.g. 1gbit (default "
                                              "unshaped)")
    p.add_argument("--netmod", default="ucx", choices=["ucx", "ofi"],
                   help="with --nodes: MPICH's netmod across nodes (default ucx)")
    args = launch.parse_with_train_args(p, argv, "after --: more mpicnn.train flags for every "
                                                 "job (e.g. --model lenet)")
    if args.rate:
        rate_bits(args.rate)
    return args


@contextmanager
def launcher(args):
    """How jobs start: plain mpirun, or across emulated nodes made for this benchmark."""
    if not args.nodes:
        yield launch.train
        return
    cluster = Cluster(f"ps{os.getpid() % 10000}", args.nodes, free_subnet(os.getpid() % 256),
                      rate=args.rate or None).up()
    try:
        print(f"bench ps: {cluster.describe(1)}; ranks placed one per node in turn",
              flush=True)
        yield lambda n, train, metrics: launch.train_across(cluster, n, train, metrics,
                                                            args.netmod, cycle=True)
    finally:
        cluster.down()


def run_job(mode: str, args, slow: bool, workdir: Path, rep: int = 0,
            start=launch.train) -> dict:
    """One training job (``start``: its launcher); its figures from the metrics it wrote."""
    ranks = args.workers + (args.servers if mode.startswith("ps") else 0)
    metrics = workdir / f"{mode}-{'slow' if slow else 'even'}-{rep}.jsonl"
    train = ["--mode", mode, "--epochs", args.epochs, "--progress", "off", *args.train_args]
    if mode.startswith("ps"):
        train += ["--servers", args.servers]
    if slow:
        train += ["--slow-rank", args.workers - 1, "--slow-factor", args.slow_factor]
    run = start(ranks, train, metrics)
    config, end = run.config, run.end
    trained = end["steps"] * config["batch_size"] * args.workers
    return {"mode": mode, "straggler": args.slow_factor if slow else 1.0, "ranks": ranks,
            "images_per_s": end["images_per_s"],
            "run_images_per_s": trained / max(1e-9, end["time"] - config["time"]),
            "val_acc": end["val_acc"], "wall_s": end["wall_s"],
            "staleness_mean": end.get("ps_staleness_mean"), "pushes": end.get("ps_pushes")}


def median_of(runs: list[dict]) -> dict:
    """One row for repeated runs of a job: medians of the figures, each run's throughput."""
    row = dict(runs[0], runs=[r["run_images_per_s"] for r in runs])
    for key in ("images_per_s", "run_images_per_s", "val_acc", "wall_s", "staleness_mean"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    return row


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    jobs = [(mode, slow) for slow in (False, True) for mode in modes]
    runs = {job: [] for job in jobs}
    print(f"{args.workers} workers (+{args.servers} server(s) in PS modes), {args.epochs} "
          f"epochs, {args.reps} rotating repetitions; straggler = worker {args.workers - 1} "
          f"at {args.slow_factor}x compute", flush=True)
    with tempfile.TemporaryDirectory() as tmp, launcher(args) as start:
        for rep in range(args.reps):
            shift = rep % len(jobs)                  # no job always first
            for mode, slow in jobs[shift:] + jobs[:shift]:
                r = run_job(mode, args, slow, Path(tmp), rep, start)
                runs[mode, slow].append(r)
                print(f"  rep {rep + 1} {mode:<10} {r['straggler']:.1f}x "
                      f"{r['run_images_per_s']:7.0f} images/s  val acc {r['val_acc']:.4f}",
                      file=sys.stderr, flush=True)
    results = [median_of(runs[job]) for job in jobs]
    print(f"{'mode':<10} {'straggler':>9} {'images/s':>9} {'run img/s':>9} {'val acc':>8} "
          f"{'wall s':>7}  {'runs (run img/s)':<22} pushes per worker")
    for r in results:
        each = "/".join(f"{x:.0f}" for x in r["runs"])
        print(f"{r['mode']:<10} {r['straggler']:>8.1f}x {r['images_per_s']:>9.0f} "
              f"{r['run_images_per_s']:>9.0f} {r['val_acc']:>8.4f} {r['wall_s']:>7.1f}"
              f"  {each:<22} {r['pushes'] or ''}")
    by = {(r["mode"], r["straggler"] > 1): r for r in results}
    if ("ps-sync", True) in by and ("ps-async", True) in by:
        sync, async_ = by["ps-sync", True], by["ps-async", True]
        print(f"with the straggler: ps-async / ps-sync throughput "
              f"{async_['run_images_per_s'] / sync['run_images_per_s']:.2f}x (run) "
              f"{async_['images_per_s'] / sync['images_per_s']:.2f}x (end record); "
              f"accuracy {100 * (async_['val_acc'] - sync['val_acc']):+.2f} points (medians)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
