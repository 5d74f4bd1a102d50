"""``python -m mpicnn.bench gpu``: the one prepared command for a GPU machine (<= 8 minutes).

1. the GPU-marked tests (``pytest -m gpu``);
2. images/s of ``resnet18`` and ``seednet`` on 3x32x32 synthetic data at batch 256: a
   bare PyTorch loop (data resident on the device) against ``mpicnn.train`` at 1 rank, in
   fp32, bf16 and bf16 + channels_last, side by side, with ratios;
3. 2 ranks sharing the GPU (gradients staged through pinned host memory), and what
   ``--cuda-aware auto`` chose and why (from the run's startup log).

``--dry-run`` runs the same plan on the CPU with tiny sizes, so the command is testable
without a GPU. Variants whose flags ``python -m mpicnn.train --help`` does not list are
reported as "skipped: flag not available".
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..cluster import jobs
from ..observe.report import load_run
from ._bare import OPTIMIZER_FLAGS, WARMUP, BareLoop

MODELS = ("resnet18", "seednet")
SHAPE = (3, 32, 32)
# variant -> (--amp of the bare loop, channels_last, mpicnn.train flags)
VARIANTS = {
    "fp32": ("off", False, []),
    "bf16": ("bf16", False, ["--amp", "bf16"]),
    "bf16+channels_last": ("bf16", True, ["--amp", "bf16", "--channels-last"]),
}
SKIPPED = "skipped: flag not available"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpicnn.bench gpu",
                                description="GPU tests, then images/s of a bare PyTorch loop "
                                            "against mpicnn.train (1 and 2 ranks).")
    p.add_argument("--dry-run", action="store_true",
                   help="the same plan on the CPU with tiny sizes (for testing)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    p.add_argument("--batch", type=int, default=0, help="batch per rank (default 256; dry 4)")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps (default 40; dry 3); 5 warm-up steps come first")
    p.add_argument("--skip-tests", action="store_true", help="leave out pytest -m gpu")
    p.add_argument("--timeout", type=float, default=300, help="seconds per job")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    args.batch = args.batch or (4 if args.dry_run else 256)
    args.steps = args.steps or (3 if args.dry_run else 40)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args



def train_flags() -> set[str]:
    """The ``--flags`` that ``python -m mpicnn.train --help`` lists on this checkout."""
    done = subprocess.run(jobs.python_command("-m", "mpicnn.train", "--help"),
                          capture_output=True, text=True, env=jobs.job_environment(),
                          cwd=jobs.ROOT, timeout=120, check=False)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", done.stdout))


def missing(flags: list, available: set) -> list:
    """The flags of ``flags`` that mpicnn.train does not know here."""
    return [f for f in flags if f.startswith("--") and f not in available]


def run_gpu_tests(dry_run: bool, timeout: float) -> dict:
    """``pytest -m gpu`` (dry run: this file's GPU tests only, which skip on the CPU)."""
    target = ["tests/test_gpu_paths.py"] if dry_run else ["tests"]
    command = jobs.python_command("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                  *target)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=jobs.ROOT,
                              env=jobs.job_environment(), timeout=timeout, check=False)
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = 124, f"{exc.stdout or ''}timed out after {timeout:.0f} s"
    lines = [line for line in out.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    return {"returncode": code, "summary": summary, "seconds": time.perf_counter() - started,
            "tail": out[-4000:]}


def bare_loop(model_name: str, variant: str, device: str, batch: int, steps: int) -> float:
    """Images/s of the bare PyTorch loop (``_bare``) in ``variant``'s precision and format."""
    amp, channels_last, _ = VARIANTS[variant]
    loop = BareLoop(model_name, SHAPE, 10, device, batch, amp, channels_last)
    try:
        return loop.images_per_s(steps)
    finally:
        loop.close()


def mpicnn_run(n: int, model: str, flags: list, args, data: Path, work: Path,
               name: str) -> dict:
    """One ``mpirun -n n python -m mpicnn.train`` job: its images/s and startup log."""
    metrics = work / f"{name}.jsonl"
    train = ["--data", data, "--model", model, "--batch-size", args.batch, "--epochs", 1,
             "--max-steps", WARMUP + args.steps, *OPTIMIZER_FLAGS,
             "--device", args.device, "--progress", "off", "--log-every", 1000,
             "--metrics", metrics, *flags]
    done = jobs.mpirun(n, "mpicnn.train", train, args.timeout)
    end = load_run(str(metrics)).end
    return {"images_per_s": end["images_per_s"], "log": done.stdout + done.stderr}


def cuda_aware_choice(log: str) -> str:
    """What the gradient-sync startup line says about CUDA buffers (or why none was needed)."""
    for line in log.splitlines():
        if "gradient sync:" in line:
            found = re.search(r"CUDA buffers (.*)", line)
            return found.group(1) if found else "no CUDA buffers (host tensors go to MPI)"
    return "no gradient-sync line in the log"


def write_data(path: Path, args) -> None:
    from ..data.synth import write_synth

    train = 2 * args.batch * (WARMUP + args.steps)      # 2 ranks: one epoch holds every step
    write_synth(str(path), int(train / 0.9) + 2, SHAPE, 10, val_fraction=0.1)


def ratio(a, b) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def fmt(value) -> str:
    return f"{value:9.0f}" if isinstance(value, (int, float)) else f"{'-':>9}"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    result = {"dry_run": args.dry_run, "device": args.device, "batch": args.batch,
              "steps": args.steps, "rows": [], "two_ranks": []}
    print(f"mpicnn bench gpu{' (dry run, CPU, tiny sizes)' if args.dry_run else ''}: "
          f"models {', '.join(args.models)}, batch {args.batch}, {args.steps} timed steps "
          f"after {WARMUP}", flush=True)
    if not args.skip_tests:
        tests = run_gpu_tests(args.dry_run, args.timeout)
        result["tests"] = tests
        print(f"pytest -m gpu: {tests['summary']} (exit {tests['returncode']})", flush=True)
    available = train_flags()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "synth.h5"
        write_data(data, args)
        for model in args.models:
            for variant, (_, _, flags) in VARIANTS.items():
                row = {"model": model, "variant": variant}
                row["bare_images_per_s"] = bare_loop(model, variant, args.device, args.batch,
                                                     args.steps)
                absent = missing(flags, available)
                if absent:
                    row["mpicnn_images_per_s"] = SKIPPED + " (" + " ".join(absent) + ")"
                else:
                    run = mpicnn_run(1, model, flags, args, data, work, f"{model}-{variant}")
                    row["mpicnn_images_per_s"] = run["images_per_s"]
                row["ratio"] = ratio(row["mpicnn_images_per_s"], row["bare_images_per_s"])
                result["rows"].append(row)
                shown = row["mpicnn_images_per_s"]
                print(f"  {model:<9} {variant:<19} bare {fmt(row['bare_images_per_s'])} "
                      f"mpicnn {shown if absent else fmt(shown)}", flush=True)
            one = next(r for r in result["rows"]
                       if r["model"] == model and r["variant"] == "fp32")
            for setting in ("auto", "off"):
                run = mpicnn_run(2, model, ["--cuda-aware", setting], args, data, work,
                                 f"{model}-2ranks-{setting}")
                buffers = cuda_aware_choice(run["log"])
                result["two_ranks"].append({
                    "model": model, "cuda_aware": setting,
                    "images_per_s": run["images_per_s"],
                    "vs_one_rank": ratio(run["images_per_s"], one["mpicnn_images_per_s"]),
                    "buffers": buffers})
                if "staged" in buffers or args.device != "cuda":
                    break           # auto already staged (or nothing to stage): no second run
    result["seconds"] = time.perf_counter() - started
    report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    failed = result.get("tests", {}).get("returncode", 0) not in (0, 5)   # 5: none collected
    return 1 if failed else 0


def report(result: dict) -> None:
    """The table: bare loop against mpicnn at 1 rank, then 2 ranks sharing the device."""
    print(f"\n{'model':<9} {'variant':<19} {'bare img/s':>10} {'mpicnn img/s':>12} "
          f"{'mpicnn/bare':>11}")
    for r in result["rows"]:
        mp = r["mpicnn_images_per_s"]
        shown = f"{mp:12.0f}" if isinstance(mp, (int, float)) else f"  {mp}"
        print(f"{r['model']:<9} {r['variant']:<19} {r['bare_images_per_s']:10.0f} {shown}"
              + (f" {r['ratio']:11.2f}" if r["ratio"] is not None else ""))
    print(f"\n2 ranks sharing the {result['device']} (fp32, batch {result['batch']} each):")
    for r in result["two_ranks"]:
        vs = f"{r['vs_one_rank']:.2f}x 1 rank" if r["vs_one_rank"] is not None else "-"
        print(f"  {r['model']:<9} --cuda-aware {r['cuda_aware']:<4} "
              f"{r['images_per_s']:9.0f} images/s ({vs}); buffers: {r['buffers']}")
    print(f"\ntotal {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
