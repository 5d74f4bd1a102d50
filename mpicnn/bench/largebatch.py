"""``python -m mpicnn.bench largebatch``: final accuracy against the global batch, per optimizer.

Every cell is one ``mpicnn.train`` job of the same epochs on the same data (by default
the Fashion-MNIST recipe's model and augmentation): SGD with linear lr scaling and
warmup, LARS, AdamW and LAMB at global batches 256, 2,048 and 8,192. A rank's batch
larger than ``--micro-batch`` runs as ``--accum-steps`` slices, so memory stays bounded.
The lr grows with the batch: linearly for SGD and LARS (Goyal et al.; You et al.), with
its square root for AdamW and LAMB (as the LAMB paper scales it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from . import launch
from .tta import DEFAULT_DATA, fashion_data

BASE_BATCH = 256
# optimizer -> (lr at BASE_BATCH, scaling, flags of its own)
OPTIMIZERS = {
    "sgd": (0.1, "linear", ["--momentum", "0.9", "--weight-decay", "5e-4"]),
    "lars": (0.8, "linear", ["--momentum", "0.9", "--weight-decay", "5e-5",
                             "--trust-coefficient", "0.001"]),
    "adamw": (0.002, "sqrt", ["--weight-decay", "0.05"]),
    "lamb": (0.004, "sqrt", ["--weight-decay", "0.05"]),
}
NAMES = {"sgd": "SGD (linear + warmup)", "lars": "LARS", "adamw": "AdamW", "lamb": "LAMB"}
COMMON = ["--model", "fashionnet", "--augment", "crop,flip", "--label-smoothing", "0.1",
          "--schedule", "cosine", "--warmup-epochs", "2", "--progress", "off"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpicnn.bench largebatch",
                                description="Final validation accuracy after the same epochs "
                                            "at growing global batches, per optimizer.")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"mpicnn HDF5 file (default {DEFAULT_DATA}, converted from Debian's "
                        f"Fashion-MNIST when missing)")
    p.add_argument("--ranks", type=int, default=2, help="ranks per job (default 2)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of every job (default 10)")
    p.add_argument("--batches", default="256,2048,8192", help="global batches (comma list)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list")
    p.add_argument("--micro-batch", type=int, default=512,
                   help="largest slice a rank computes at once (default 512)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per job (7200)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    return launch.parse_with_train_args(p, argv, "after --: flags for every job (e.g. "
                                                 "--model lenet)")


def accum_steps(rank_batch: int, micro_batch: int) -> int:
    """The fewest slices of at most ``micro_batch`` that divide ``rank_batch`` evenly."""
    return next(k for k in range(-(-rank_batch // micro_batch), rank_batch + 1)
                if rank_batch % k == 0)


def job_flags(optimizer: str, batch: int, ranks: int, micro_batch: int) -> list:
    """The flags of one cell: optimizer, its scaled lr, per-rank batch and slices."""
    base_lr, scaling, own = OPTIMIZERS[optimizer]
    ratio = batch / BASE_BATCH
    lr = base_lr * (ratio if scaling == "linear" else math.sqrt(ratio))
    rank_batch = batch // ranks
    return [*COMMON, "--optimizer", optimizer, "--lr", f"{lr:.6g}", *own,
            "--batch-size", rank_batch, "--accum-steps", accum_steps(rank_batch, micro_batch)]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    data = str(Path(fashion_data(args.data)).resolve())
    batches = [int(b) for b in args.batches.split(",") if b]
    optimizers = [o for o in args.optimizers.split(",") if o]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in optimizers:
            for batch in batches:
                flags = [*job_flags(optimizer, batch, args.ranks, args.micro_batch),
                         "--data", data, "--epochs", args.epochs, *args.train_args]
                run = launch.train(args.ranks, flags, Path(tmp) / f"{optimizer}-{batch}.jsonl",
                                   args.timeout)
                results.append({"optimizer": optimizer, "batch": batch,
                                "lr": float(flags[flags.index("--lr") + 1]),
                                "val_acc": run.end["val_acc"], "steps": run.end["steps"],
                                "wall_s": run.end["wall_s"]})
                print(f"  {optimizer:<6} batch {batch:>5}: val acc {run.end['val_acc']:.4f} "
                      f"({run.end['steps']} steps)", file=sys.stderr, flush=True)
    acc = {(r["optimizer"], r["batch"]): r["val_acc"] for r in results}
    print(f"final val acc after {args.epochs} epochs, {args.ranks} ranks, {data}")
    print(f"{'optimizer':<22}" + "".join(f"{b:>9}" for b in batches))
    for optimizer in optimizers:
        print(f"{NAMES[optimizer]:<22}" + "".join(f"{acc[optimizer, b]:>9.4f}" for b in batches))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
