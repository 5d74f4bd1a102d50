"""What failure handling costs per step: the NaN check, and the stall watchdog's heartbeats.

``python -m mpicnn.bench failure_overhead [--ranks 2 --steps 80]``

Part 1 (one process): time of the gradient finiteness check against a whole
forward/backward/step, per zoo model. Part 2 (``mpirun``): training images/s with
the watchdog off, at its default heartbeat (5 s) and at its fastest (0.05 s), side by
side in one run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from . import launch

MODELS = {"digitnet": (1, 8, 8), "lenet": (1, 8, 8), "seednet": (3, 32, 32),
          "resnet18": (3, 32, 32)}
WATCHDOG = {"off": ["--stall-warn", "0", "--stall-abort", "0", "--unreachable-abort", "0"],
            "default (5 s beats)": [],
            "fastest (0.05 s beats)": ["--stall-warn", "0.2"]}


def time_check(name: str, shape, batch: int, repeats: int) -> dict:
    """Median seconds of one training step and of one grads_finite() on its gradients."""
    import torch
    import torch.nn.functional as F

    from ..resilience.nan_policy import grads_finite
    from ..training.models import build_model

    model = build_model(name, shape, 10)
    optimizer = torch.optim.AdamW(model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    steps, checks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        grads_finite(params)
        checks.append(time.perf_counter() - start)
    step, check = sorted(steps)[len(steps) // 2], sorted(checks)[len(checks) // 2]
    return {"model": name, "params": sum(p.numel() for p in params), "step_ms": 1e3 * step,
            "check_ms": 1e3 * check, "check_pct": 100 * check / step}


def run_training(ranks: int, steps: int, extra, workdir: Path) -> float:
    """images/s of one short real run (from its ``end`` metrics record)."""
    train = ["--max-steps", steps, "--epochs", 100, "--progress", "off", "--log-every", 1000,
             *extra]
    metrics = workdir / f"m{time.monotonic_ns()}.jsonl"
    return launch.train(ranks, train, metrics).end["images_per_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpicnn.bench failure_overhead",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of part 2")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    checks = [time_check(name, shape, args.batch, args.repeats) for name, shape in MODELS.items()]
    print(f"{'model':10} {'params':>10} {'step ms':>9} {'check ms':>9} {'check %':>8}")
    for row in checks:
        print(f"{row['model']:10} {row['params']:>10} {row['step_ms']:>9.2f} "
              f"{row['check_ms']:>9.3f} {row['check_pct']:>7.2f}%")

    runs = {name: [] for name in WATCHDOG}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):                 # alternate so drift hits all alike
            for name, extra in WATCHDOG.items():
                runs[name].append(run_training(args.ranks, args.steps, extra, Path(tmp)))
    print(f"\ndigitnet, {args.ranks} ranks, {args.steps} steps: training images/s "
          f"(best of {args.rounds})")
    for name, values in runs.items():
        print(f"  watchdog {name:24} {max(values):9.0f}   runs: "
              f"{', '.join(f'{v:.0f}' for v in values)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"check": checks, "watchdog": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
