"""How long a checkpoint stalls training: synchronous writes against ``--checkpoint-async``.

``python -m mpicnn.bench checkpoint [--model resnet18 --steps 60 --every 10 --rounds 3]``

One process trains ``--model`` with AdamW on random data and checkpoints its model and
optimizer state every ``--every`` steps, the same way rank 0 does (``checkpoint.writer``):
written before the next step (sync) or copied to host memory and written by a thread
(async). Both run side by side, alternating over ``--rounds``. The stall is the median
time of a step that checkpointed minus the median of one that did not; the other steps'
median shows what the background write costs the steps it overlaps. Needs a quiet
machine: other load moves the medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"digitnet": (1, 8, 8), "lenet": (1, 8, 8), "kerasnet": (1, 8, 8),
          "seednet": (3, 32, 32), "resnet18": (3, 32, 32)}
MODES = ("sync", "async")


def run_mode(background: bool, args, directory: Path) -> dict:
    """Step times (seconds) of steps with and without a checkpoint, and the writer's times."""
    import torch
    import torch.nn.functional as F

    from ..checkpoint import files
    from ..checkpoint.writer import Writer
    from ..config import parse_config
    from ..training.models import build_model
    from ..training.optim import build_optimizer

    device = torch.device(args.device)
    shape = SHAPES[args.model]
    torch.manual_seed(0)
    model = build_model(args.model, shape, 10).to(device)
    optimizer = build_optimizer(parse_config([]).training, model.parameters(), args.batch)
    x = torch.randn(args.batch, *shape, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    writer = Writer(background=background)
    plain, saving = [], []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in range(1, args.steps + 1):
        sync()
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        due = step % args.every == 0
        if due:                       # at the step boundary, as the Checkpointer saves
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            writer.save(state, directory / files.checkpoint_name(step),
                        after=lambda: files.prune(directory, 2))
        sync()
        seconds = time.perf_counter() - start
        if step > args.warmup:
            (saving if due else plain).append(seconds)
    writer.wait()
    return {"plain": plain, "saving": saving, "copy": writer.stall_s, "write": writer.write_s,
            "bytes": max((p.stat().st_size for p in files.candidates(directory)), default=0)}


def summarize(runs: list[dict]) -> dict:
    """Medians (ms) over every round of one mode."""
    def median_ms(key):
        values = [v for run in runs for v in run[key]]
        return 1000 * statistics.median(values) if values else float("nan")

    plain, saving = median_ms("plain"), median_ms("saving")
    return {"step_ms": plain, "checkpoint_step_ms": saving, "stall_ms": saving - plain,
            "wait_ms": median_ms("copy"), "write_ms": median_ms("write"),
            "checkpoints": sum(len(run["saving"]) for run in runs),
            "mb": max(run["bytes"] for run in runs) / 2 ** 20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpicnn.bench checkpoint",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="steps per round and mode")
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--rounds", type=int, default=3, help="alternating sync/async rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--dir", default="", help="where to write (default: a temporary "
                        "directory; put it on the filesystem the runs use)")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.every < 1 or args.steps < args.every + args.warmup:
        parser.error("need --every >= 1 and --steps >= --every + --warmup")

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        for round_ in range(args.rounds):       # alternate so drift hits both alike
            for mode in MODES:
                directory = Path(tmp) / f"{mode}-{round_}"
                directory.mkdir()
                runs[mode].append(run_mode(mode == "async", args, directory))
    figures = {mode: summarize(rows) for mode, rows in runs.items()}
    mb = figures["sync"]["mb"]
    print(f"{args.model} + AdamW, batch {args.batch} on {args.device}, {mb:.1f} MB a "
          f"checkpoint, every {args.every} steps, {args.rounds} round(s): medians in ms")
    print(f"{'mode':6} {'step':>9} {'ckpt step':>10} {'stall':>9} {'waited':>9} "
          f"{'write':>9} {'checkpoints':>12}")
    for mode, f in figures.items():
        print(f"{mode:6} {f['step_ms']:9.1f} {f['checkpoint_step_ms']:10.1f} "
              f"{f['stall_ms']:9.1f} {f['wait_ms']:9.1f} {f['write_ms']:9.1f} "
              f"{f['checkpoints']:12d}")
    sync, background = figures["sync"]["stall_ms"], figures["async"]["stall_ms"]
    print(f"stall async / sync: {background / sync:.3f}" if sync > 0 else
          "stall async / sync: n/a (no sync stall measured)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "figures": figures,
                                               "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
