"""``python -m mpicnn.bench pipeline``: pipeline x data parallelism at one global batch.

Every grid of ``--ranks`` ranks (K stages x R replicas: K x 1 pipeline, ..., 1 x K data
parallel) at every ``--micro-batches`` M is one real ``mpirun ... python -m mpicnn.train
--mode pipeline`` job on the same data, model, global batch and steps, plus one plain
``--mode allreduce`` job. Reported per job: training images/s (the end record's), the
measured bubble (the share of a stage's step spent waiting, mean over stages) against the
ideal (K-1)/(M+K-1), and the parameter memory of the largest stage (what one rank holds
and updates).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ..cluster.errors import MpicnnError
from . import launch


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpicnn.bench pipeline",
                                description="Images/s, bubble and parameter memory per rank "
                                            "of pipeline grids against data parallelism.")
    p.add_argument("--ranks", type=int, default=4, help="ranks of every job (default 4)")
    p.add_argument("--model", default="resnet18", help="model (default resnet18)")
    p.add_argument("--global-batch", type=int, default=32, help="global batch (default 32)")
    p.add_argument("--micro-batches", default="1,4,8", help="values of M (default 1,4,8)")
    p.add_argument("--steps", type=int, default=25,
                   help="steps per job (the first 5 are not timed; default 25)")
    p.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    p.add_argument("--out", default="", help="also write the results as JSON here")
    return launch.parse_with_train_args(p, argv, "after --: more mpicnn.train flags for every "
                                                 "job (e.g. --data FILE)")


def grids(ranks: int) -> list[tuple[int, int]]:
    """(K, R) with K x R = ranks, from the deepest pipeline to pure data parallelism."""
    return [(k, ranks // k) for k in range(ranks, 0, -1) if ranks % k == 0]


def run_job(args, workdir: Path, stages: int, replicas: int, micro: int) -> dict:
    """One training job; its figures from the metrics it wrote (stages 0: --mode allreduce)."""
    batch = args.global_batch // (replicas if stages else args.ranks)
    common = ["--model", args.model, "--epochs", 1, "--max-steps", args.steps,
              "--batch-size", batch, "--progress", "off", *args.train_args]
    if stages:
        mode = ["--mode", "pipeline", "--stages", stages, "--micro-batches", micro,
                "--pipeline-schedule", args.schedule]
    else:
        mode = ["--mode", "allreduce"]
    metrics = workdir / f"{stages}x{replicas}-M{micro}.jsonl"
    run = launch.train(args.ranks, [*common, *mode], metrics)
    epoch = run.epochs[-1]
    end = run.end
    bubble = epoch.get("stage_bubble")
    params = end.get("stage_params_mb")
    return {"grid": f"{stages}x{replicas}" if stages else f"allreduce x{args.ranks}",
            "stages": stages, "replicas": replicas, "micro_batches": micro,
            "images_per_s": end["images_per_s"],
            "bubble": sum(bubble) / len(bubble) if bubble else None,
            "stage_bubble": bubble, "bubble_ideal": epoch.get("bubble_ideal"),
            "params_mb_per_rank": max(params) if params else None,
            "wall_s": end["wall_s"]}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    micros = [int(m) for m in args.micro_batches.split(",") if m.strip()]
    jobs = [(k, r, m) for k, r in grids(args.ranks) for m in micros] + [(0, args.ranks, 1)]
    print(f"{args.model}, {args.ranks} ranks, global batch {args.global_batch}, "
          f"{args.steps} steps, {args.schedule}", flush=True)
    results, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for stages, replicas, micro in jobs:
            if args.global_batch // max(1, replicas) < micro:
                continue                       # fewer samples than micro-batches
            try:
                r = run_job(args, Path(tmp), stages, replicas, micro)
            except MpicnnError as exc:         # e.g. BatchNorm on a 1-sample micro-batch
                reason = next((line for line in str(exc).splitlines()
                               if "error: rank" in line), str(exc).splitlines()[0])
                failed.append(f"{stages}x{replicas} M={micro}: {reason[:200]}")
                print(f"  {stages}x{replicas} M={micro}: failed", file=sys.stderr, flush=True)
                continue
            results.append(r)
            print(f"  {r['grid']:<14} M={micro}: {r['images_per_s']:.0f} images/s",
                  file=sys.stderr, flush=True)
    base = next((r["images_per_s"] for r in results if not r["stages"]), float("nan"))
    print(f"{'grid (KxR)':<14} {'M':>2} {'images/s':>9} {'vs DP':>6} {'bubble':>7} "
          f"{'ideal':>6} {'params MB/rank':>14}")
    for r in results:
        bubble = f"{r['bubble']:.2f}" if r["bubble"] is not None else "-"
        ideal = f"{r['bubble_ideal']:.2f}" if r["bubble_ideal"] is not None else "-"
        params = f"{r['params_mb_per_rank']:.2f}" if r["params_mb_per_rank"] else "all"
        print(f"{r['grid']:<14} {r['micro_batches']:>2} {r['images_per_s']:>9.0f} "
              f"{r['images_per_s'] / base:>5.2f}x {bubble:>7} {ideal:>6} {params:>14}")
    for line in failed:
        print(f"failed: {line}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
