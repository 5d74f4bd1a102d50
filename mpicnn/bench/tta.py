"""``python -m mpicnn.bench tta``: wall time to a validation accuracy, mpicnn against DDP.

Both programs train one recipe (model, optimizer, schedule, batch, augmentation, label
smoothing, seed) on the same Fashion-MNIST file at the same ranks and evaluate after
every epoch: (a) ``mpicnn.train``; (b) ``_tta_ddp``, DDP over gloo fed by a
``DataLoader`` with a ``DistributedSampler``, the script a PyTorch user would write.
Repetitions alternate which program runs first; medians are reported. Time to
accuracy runs from the start of training (the config record, written once model and
data are ready) to the first epoch record at or above ``--target``, evaluation included.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from ..cluster.errors import MpicnnError
from ..observe.report import load_run
from . import launch

FASHION_DIR = "/usr/share/datasets/fashion-mnist"     # Debian's dataset-fashion-mnist
DEFAULT_DATA = "data/fashion.h5"
# The README's Fashion-MNIST recipe, per rank batch 64 (global 128 at two ranks)
RECIPE = ["--model", "fashionnet", "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.05",
          "--momentum", "0.9", "--weight-decay", "5e-4", "--epochs", "12",
          "--warmup-epochs", "1", "--schedule", "cosine", "--augment", "crop,flip",
          "--label-smoothing", "0.1"]
SYSTEMS = ("mpicnn", "ddp")
LABELS = {"mpicnn": "mpicnn (allreduce engine, HDF5 loader)",
          "ddp": "DDP gloo + DataLoader/DistributedSampler"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpicnn.bench tta",
                                description="Wall time to a validation accuracy on "
                                            "Fashion-MNIST: mpicnn against the DDP script a "
                                            "PyTorch user would write; same recipe.")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"mpicnn HDF5 file (default {DEFAULT_DATA}, converted from "
                        f"{FASHION_DIR} when missing)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of both programs (default 2)")
    p.add_argument("--target", type=float, default=0.92,
                   help="validation accuracy to reach (default 0.92)")
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions of each program, alternating; medians (default 3)")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="DataLoader worker processes per DDP rank (default 0)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per job (3600)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    return launch.parse_with_train_args(p, argv, f"after --: flags for both programs, over "
                                                 f"the recipe's ({' '.join(RECIPE)})")


def fashion_data(path: str, package_dir: str = FASHION_DIR) -> str:
    """``path``, converted from the Debian package's files when it is the missing default."""
    if os.path.exists(path):
        return path
    if path != DEFAULT_DATA:
        raise MpicnnError(f"--data {path!r} does not exist")
    if not os.path.isdir(package_dir):
        raise MpicnnError(f"bench tta runs on Fashion-MNIST, and {package_dir} is absent: "
                          f"apt-get install dataset-fashion-mnist (or convert the IDX files "
                          f"with python -m mpicnn.data convert DIR FILE.h5 and pass --data)")
    from ..data.convert import write_source
    from ..data.formats import open_source

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_source(open_source(package_dir), path)
    return path


def time_to(run, target: float) -> tuple[float | None, int | None]:
    """(seconds from the start of training, epoch) at which ``target`` was first reached."""
    for record in run.epochs:
        if record["val_acc"] >= target:
            return record["time"] - run.config["time"], record["epoch"]
    return None, None


def one_run(system: str, args, workdir: Path, rep: int) -> dict:
    """Train once with ``system``; its time to the target and where the time went."""
    metrics = workdir / f"{system}-{rep}.jsonl"
    flags = [*RECIPE, "--data", args.data, "--progress", "off", *args.train_args]
    if system == "mpicnn":
        run = launch.train(args.ranks, flags, metrics, args.timeout)
    else:
        launch.mpirun(args.ranks, "mpicnn.bench._tta_ddp",
                      ["--loader-workers", args.loader_workers, *flags, "--metrics", metrics],
                      args.timeout)
        run = load_run(str(metrics))
    seconds, epoch = time_to(run, args.target)
    split = run.split_ms()
    epochs = len(run.epochs)
    per_epoch = (run.epochs[-1]["time"] - run.config["time"]) / epochs
    steps_s = run.steps_per_epoch * sum(split.values()) / 1000
    return {"system": system, "tta_s": seconds, "epoch": epoch, "epochs": epochs,
            "final_acc": run.epochs[-1]["val_acc"], "epoch_s": per_epoch,
            "steps_s": steps_s, "eval_other_s": per_epoch - steps_s, "split_ms": split}


def median_row(runs: list[dict]) -> dict:
    """Medians over one system's runs; time to target over the runs that reached it."""
    reached = [r for r in runs if r["tta_s"] is not None]
    row = {"system": runs[0]["system"], "runs": [r["tta_s"] for r in runs],
           "reached": len(reached), "tta_s": statistics.median(r["tta_s"] for r in reached)
           if reached else None,
           "epoch": statistics.median(r["epoch"] for r in reached) if reached else None}
    for key in ("final_acc", "epoch_s", "steps_s", "eval_other_s"):
        row[key] = statistics.median(r[key] for r in runs)
    row["split_ms"] = {p: statistics.median(r["split_ms"].get(p, 0.0) for r in runs)
                       for p in runs[0]["split_ms"]}
    return row


def report(rows: list[dict], args) -> str:
    """The table, the ratio and how to read it."""
    def secs(v):
        return f"{v:8.1f}" if v is not None else "     n/a"
    lines = [f"time to val acc {args.target} on {args.data}, {args.ranks} ranks, "
             f"{args.reps} alternating repetitions (medians)",
             f"{'program':<42} {'tta s':>8} {'epoch':>5} {'reached':>7} {'acc end':>7} "
             f"{'s/epoch':>7} {'steps s':>7} {'eval+ s':>7}  ms/step: "
             + " ".join(rows[0]["split_ms"])]
    for r in rows:
        epoch = f"{r['epoch']:5.1f}" if r["epoch"] is not None else "  n/a"
        lines.append(f"{LABELS[r['system']]:<42} {secs(r['tta_s'])} {epoch} "
                     f"{r['reached']:>3}/{len(r['runs']):<3} {r['final_acc']:7.4f} "
                     f"{r['epoch_s']:7.1f} {r['steps_s']:7.1f} {r['eval_other_s']:7.1f}  "
                     + " ".join(f"{v:.1f}" for v in r["split_ms"].values()))
    by = {r["system"]: r for r in rows}
    if by["mpicnn"]["tta_s"] and by["ddp"]["tta_s"]:
        lines.append(f"DDP / mpicnn time to {args.target}: "
                     f"{by['ddp']['tta_s'] / by['mpicnn']['tta_s']:.2f}x (above 1: mpicnn "
                     f"faster)")
    else:
        lines.append(f"a program did not reach {args.target}: train longer (-- --epochs N)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.data = os.path.abspath(fashion_data(args.data))     # jobs run in the checkout
    runs = {system: [] for system in SYSTEMS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]      # no program always first
            for system in order:
                r = one_run(system, args, Path(tmp), rep)
                runs[system].append(r)
                reached = f"{r['tta_s']:.1f} s (epoch {r['epoch']})" if r["tta_s"] is not None \
                    else "not reached"
                print(f"  rep {rep + 1} {system:<7} {args.target} at {reached}, final acc "
                      f"{r['final_acc']:.4f}", file=sys.stderr, flush=True)
    rows = [median_row(runs[system]) for system in SYSTEMS]
    print(report(rows, args))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
