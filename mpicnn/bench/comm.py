"""``python -m mpicnn.bench comm``: the allreduce engine against DDP-gloo and a flat Allreduce.

Runs side by side, alternating repetitions, on seednet with synthetic 3x32x32 data:

* ``mpicnn engine``   - ``mpicnn.train`` with its defaults (25 MB buckets, overlapped);
* ``DDP gloo``        - PyTorch DistributedDataParallel over gloo, same loop and loader;
* ``flat Allreduce``  - ``mpicnn.train --bucket-mb 0``: one blocking Allreduce after backward;
* ``1 rank 1 thread`` - the single-process reference for scaling efficiency;
* ``no-comm ceiling``  - as many independent single-rank runs at once as the parallel
  runs have ranks, summed: what the machine allows when nothing is communicated (cores,
  caches and memory bandwidth shared). Efficiency against it isolates the cost of
  communication from that of sharing the machine.

Images/s is the training loop's own figure (all steps but the first 5, data loading
included). Then the bus bandwidth of one 25 MB bucket through the engine against raw
``comm.Allreduce`` on a numpy buffer of the same size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from . import launch

VARIANTS = ("mpicnn engine", "DDP gloo", "flat Allreduce", "1 rank 1 thread", "no-comm ceiling")
REFERENCES = ("1 rank 1 thread", "no-comm ceiling")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpicnn.bench comm", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="ranks of the parallel runs")
    p.add_argument("--batches", default="8,32", help="per-rank batch sizes, comma-separated")
    p.add_argument("--reps", type=int, default=5, help="repetitions of every run")
    p.add_argument("--steps", type=int, default=80, help="training steps per run")
    p.add_argument("--bw-reps", type=int, default=15, help="repetitions of the bandwidth test")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a run is killed")
    p.add_argument("--extra", default="", help="extra flags for the engine runs, e.g. "
                   "'--compression bf16'")
    return p.parse_args(argv)


def write_data(path: Path, samples: int) -> None:
    """Random uint8 CIFAR-shaped images with random labels (throughput only)."""
    from ..data.writer import write_splits

    rng = np.random.default_rng(0)
    val = 64
    write_splits(str(path), {
        "train": (rng.integers(0, 256, (samples, 3, 32, 32), dtype=np.uint8),
                  rng.integers(0, 10, samples)),
        "val": (rng.integers(0, 256, (val, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, val)),
    }, attrs={"source": "synthetic (mpicnn.bench.comm)"})


def run_variant(variant: str, batch: int, args, data: Path, work: Path) -> float:
    """Images/s of one run of ``variant`` at per-rank ``batch``."""
    train = ["--model", "seednet", "--data", data, "--batch-size", batch, "--epochs", 1,
             "--max-steps", args.steps, "--progress", "off"]
    if variant == "DDP gloo":
        return launch.json_result(args.ranks, "mpicnn.bench._ddp_peer", train,
                                  args.timeout)["images_per_s"]
    if variant == "no-comm ceiling":
        threads = max(1, (os.cpu_count() or 1) // args.ranks)
        solo = partial(run_train, train=train + ["--threads", threads], args=args, work=work)
        with ThreadPoolExecutor(args.ranks) as pool:
            return sum(pool.map(solo, range(args.ranks)))
    if variant == "1 rank 1 thread":
        return run_train(0, train + ["--threads", 1], args, work)
    if variant == "flat Allreduce":
        train += ["--bucket-mb", 0]
    else:
        train += args.extra.split()
    return run_train(0, train, args, work, args.ranks)


def run_train(index: int, train: list, args, work: Path, ranks: int = 1) -> float:
    """Images/s of one ``mpicnn.train`` job, from the end record of its metrics."""
    metrics = work / f"run{time.monotonic_ns()}-{index}.jsonl"
    return launch.train(ranks, train, metrics, args.timeout).end["images_per_s"]


def table(results: dict, ranks: int) -> str:
    """Medians, ratios to DDP and to the flat Allreduce, and scaling efficiency."""
    lines = [f"{'batch/rank':>10}  {'variant':<16} {'images/s':>9} {'runs':>24}  "
             f"{'x DDP':>6} {'x flat':>6} {'efficiency':>10} {'x ceiling':>10}"]
    for batch, by_variant in results.items():
        med = {v: statistics.median(x) for v, x in by_variant.items()}
        single = med["1 rank 1 thread"]
        for variant in VARIANTS:
            runs = "/".join(f"{x:.0f}" for x in by_variant[variant])
            ratio = flat = efficiency = of_ceiling = ""
            if variant != "1 rank 1 thread":
                efficiency = f"{med[variant] / (ranks * single):.3f}"
            if variant not in REFERENCES:
                ratio = f"{med[variant] / med['DDP gloo']:.2f}"
                flat = f"{med[variant] / med['flat Allreduce']:.2f}"
                of_ceiling = f"{med[variant] / med['no-comm ceiling']:.3f}"
            lines.append(f"{batch:>10}  {variant:<16} {med[variant]:>9.1f} {runs:>24}  "
                         f"{ratio:>6} {flat:>6} {efficiency:>10} {of_ceiling:>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="mpicnn-bench-") as tmp:
        work = Path(tmp)
        data = work / "synthetic.h5"
        write_data(data, samples=(args.steps + 1) * max(batches) * max(args.ranks, 1))
        results = {b: {v: [] for v in VARIANTS} for b in batches}
        print(f"bench comm: seednet, {args.ranks} ranks vs 1 rank 1 thread, batches {batches} "
              f"per rank, {args.steps} steps, {args.reps} alternating repetitions",
              file=sys.stderr, flush=True)
        for rep in range(args.reps):
            for batch in batches:
                shift = rep % len(VARIANTS)          # rotate the order: no variant always first
                for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                    value = run_variant(variant, batch, args, data, work)
                    results[batch][variant].append(value)
                    print(f"  rep {rep + 1} batch {batch:>3} {variant:<16} {value:8.1f} images/s",
                          file=sys.stderr, flush=True)
        bw = launch.json_result(args.ranks, "mpicnn.bench._bandwidth",
                                ["--mb", 25, "--reps", args.bw_reps, *args.extra.split()],
                                args.timeout)
    print(table(results, args.ranks))
    print(f"\n25 MB bucket at {bw['ranks']} ranks: engine {bw['engine_ms']:.2f} ms = "
          f"{bw['engine_busbw_gbs']:.2f} GB/s bus bandwidth; raw comm.Allreduce "
          f"{bw['raw_ms']:.2f} ms = {bw['raw_busbw_gbs']:.2f} GB/s; ratio {bw['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
