"""``python -m mpicnn.bench gpu``: the one prepared command for a GPU machine (<= 8 minutes).

Its parts, each side by side with its peer and written to one JSON:

1. ``tests``: the GPU-marked tests (``pytest -m gpu``);
2. ``overhead``: ``bench overhead`` on the device: kernels, launches, device waits and
   milliseconds a step, mpicnn at 1 rank against the bare loop (seednet, fp32);
3. ``eager``: images/s of ``resnet18`` and ``seednet`` on 3x32x32 synthetic data at batch
   256: the bare PyTorch loop against ``mpicnn.train`` at 1 rank, in fp32, bf16 and bf16 +
   channels_last, with ratios;
4. ``compiled``: ``mpicnn.train --compile`` (CUDA graphs on a GPU) against the same
   bare eager loop;
5. ``ranks``: 2 ranks sharing the GPU, gradients staged through pinned host memory and,
   where the MPI is CUDA-aware, handed to MPI directly; what ``--cuda-aware auto`` chose;
6. ``fashion``: the Fashion-MNIST GPU recipe, eager and compiled: training seconds,
   validation accuracy, the first epoch at 0.94.

``--dry-run`` runs the same plan on the CPU with tiny sizes (one compiled variant, one
epoch of a synthetic stand-in for Fashion-MNIST), so the command is testable without a GPU.
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
from . import overhead
from ._bare import OPTIMIZER_FLAGS, WARMUP, BareLoop

PARTS = ("tests", "overhead", "eager", "compiled", "ranks", "fashion")
MODELS = ("resnet18", "seednet")
SHAPE = (3, 32, 32)
# variant -> (--amp of the bare loop, channels_last, mpicnn.train flags)
VARIANTS = {
    "fp32": ("off", False, []),
    "bf16": ("bf16", False, ["--amp", "bf16"]),
    "bf16+channels_last": ("bf16", True, ["--amp", "bf16", "--channels-last"]),
}
COMPILED_VARIANTS = ("fp32", "bf16+channels_last")
FASHION = jobs.ROOT / "data" / "fashion.h5"
FASHION_RECIPE = jobs.ROOT / "examples" / "fashion-gpu.toml"     # the GPU recipe
FASHION_TARGET = 0.94


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpicnn.bench gpu",
                                description="GPU tests, the step's overhead, bare PyTorch "
                                            "against mpicnn.train eager and compiled, 2 ranks "
                                            "staged and CUDA-aware, the Fashion-MNIST recipe.")
    p.add_argument("--dry-run", action="store_true",
                   help="the same plan on the CPU with tiny sizes (for testing)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    p.add_argument("--batch", type=int, default=0, help="batch per rank (default 256; dry 4)")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps (default 40; dry 3); 5 warm-up steps come first")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--fashion", default=str(FASHION), help="Fashion-MNIST as mpicnn HDF5 "
                   "(python -m mpicnn.data convert /usr/share/datasets/fashion-mnist ...)")
    p.add_argument("--fashion-epochs", type=int, default=0, help="default: the recipe's")
    p.add_argument("--timeout", type=float, default=300, help="seconds per job")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    args.batch = args.batch or (4 if args.dry_run else 256)
    args.steps = args.steps or (3 if args.dry_run else 40)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.parts = [m.strip() for m in args.parts.split(",") if m.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def run_gpu_tests(dry_run: bool, timeout: float) -> dict:
    """``pytest -m gpu`` (dry run: two files' GPU tests, which skip on the CPU)."""
    target = (["tests/test_gpu_paths.py", "tests/test_host_syncs.py"] if dry_run
              else ["tests"])
    command = jobs.python_command("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                  "-rfEs", *target)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=jobs.ROOT,
                              env=jobs.job_environment(), timeout=timeout, check=False)
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = 124, f"{exc.stdout or ''}timed out after {timeout:.0f} s"
    lines = [line for line in out.strip().splitlines() if line.strip()]
    return {"returncode": code, "summary": lines[-1] if lines else "",
            "seconds": time.perf_counter() - started, "output": out}


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


def eager_rows(args, data: Path, work: Path) -> list[dict]:
    """Bare loop against mpicnn at 1 rank, every model and variant."""
    rows = []
    for model in args.models:
        for variant, (_, _, flags) in VARIANTS.items():
            bare = bare_loop(model, variant, args.device, args.batch, args.steps)
            run = mpicnn_run(1, model, flags, args, data, work, f"{model}-{variant}")
            rows.append({"model": model, "variant": variant, "bare_images_per_s": bare,
                         "mpicnn_images_per_s": run["images_per_s"],
                         "ratio": ratio(run["images_per_s"], bare)})
            print(f"  eager {model:<9} {variant:<19} bare {bare:9.0f} mpicnn "
                  f"{run['images_per_s']:9.0f}", flush=True)
    return rows


def compiled_rows(args, data: Path, work: Path, eager: list[dict]) -> list[dict]:
    """mpicnn --compile at 1 rank against the bare eager loop (measured here if not yet)."""
    rows = []
    for model in args.models:
        for variant in COMPILED_VARIANTS[:1] if args.dry_run else COMPILED_VARIANTS:
            bare = next((r["bare_images_per_s"] for r in eager
                         if r["model"] == model and r["variant"] == variant), None)
            if bare is None:
                bare = bare_loop(model, variant, args.device, args.batch, args.steps)
            flags = [*VARIANTS[variant][2], "--compile", args.compile_mode]
            run = mpicnn_run(1, model, flags, args, data, work, f"{model}-{variant}-compiled")
            rows.append({"model": model, "variant": variant, "mode": args.compile_mode,
                         "bare_images_per_s": bare,
                         "mpicnn_images_per_s": run["images_per_s"],
                         "ratio": ratio(run["images_per_s"], bare)})
            print(f"  compiled {model:<9} {variant:<19} mpicnn {run['images_per_s']:9.0f}",
                  flush=True)
    return rows


def two_rank_rows(args, data: Path, work: Path) -> list[dict]:
    """2 ranks sharing the device: --cuda-aware auto, and off where auto did not stage."""
    rows = []
    for model in args.models:
        for setting in ("auto", "off"):
            run = mpicnn_run(2, model, ["--cuda-aware", setting], args, data, work,
                             f"{model}-2ranks-{setting}")
            buffers = cuda_aware_choice(run["log"])
            rows.append({"model": model, "cuda_aware": setting,
                         "images_per_s": run["images_per_s"], "buffers": buffers})
            print(f"  2 ranks {model:<9} --cuda-aware {setting}: {run['images_per_s']:9.0f} "
                  f"images/s; buffers {buffers}", flush=True)
            if "staged" in buffers or args.device != "cuda":
                break           # auto already staged (or nothing to stage): no second run
    return rows


def fashion_rows(args, work: Path) -> dict:
    """The Fashion-MNIST recipe, eager and compiled: training seconds and accuracy."""
    data = Path(args.fashion)
    flags = ["--config", FASHION_RECIPE, "--device", args.device]
    if args.dry_run:                      # a small stand-in with Fashion-MNIST's shape
        from ..data.synth import write_synth

        data = work / "fashion-standin.h5"
        write_synth(str(data), 600, (1, 28, 28), 10, val_fraction=0.2)
        flags += ["--batch-size", 32, "--epochs", 1, "--data-on-device", "auto"]
    elif not data.exists():
        return {"skipped": f"{data} not found: python -m mpicnn.data convert "
                           f"/usr/share/datasets/fashion-mnist {data}"}
    if args.fashion_epochs:
        flags += ["--epochs", args.fashion_epochs]
    out = {"data": str(data), "flags": [str(f) for f in flags], "target": FASHION_TARGET}
    for name, extra in (("eager", []), ("compiled", ["--compile", args.compile_mode])):
        metrics = work / f"fashion-{name}.jsonl"
        jobs.mpirun(1, "mpicnn.train", [*flags, "--data", data, *extra, "--progress", "off",
                                        "--metrics", metrics], args.timeout * 2)
        run = load_run(str(metrics))
        reached = next((e for e in run.epochs if e["val_acc"] >= FASHION_TARGET), None)
        out[name] = {"val_acc": run.end["val_acc"], "train_s": run.end["train_s"],
                     "images_per_s": run.end["images_per_s"],
                     "best_val_acc": max(e["val_acc"] for e in run.epochs),
                     "target_epoch": reached["epoch"] if reached else None,
                     "target_train_s": reached["train_s"] if reached else None}
        print(f"  fashion {name}: val acc {run.end['val_acc']:.4f} after "
              f"{run.end['train_s']:.1f} s of training", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    result = {"dry_run": args.dry_run, "device": args.device, "batch": args.batch,
              "steps": args.steps, "parts": args.parts}
    print(f"mpicnn bench gpu{' (dry run, CPU, tiny sizes)' if args.dry_run else ''}: "
          f"{', '.join(args.parts)}; models {', '.join(args.models)}, batch {args.batch}, "
          f"{args.steps} timed steps after {WARMUP}", flush=True)
    if "tests" in args.parts:
        result["tests"] = run_gpu_tests(args.dry_run, args.timeout)
        print(f"pytest -m gpu: {result['tests']['summary']} (exit "
              f"{result['tests']['returncode']})", flush=True)
    if "overhead" in args.parts:
        result["overhead"] = overhead.measure(overhead.parse_args(
            ["--device", args.device, "--model", args.models[-1], "--batch", str(args.batch),
             "--steps", str(args.steps), "--profile-steps", str(min(10, args.steps)),
             "--timeout", str(args.timeout)]))
        overhead.report(result["overhead"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "synth.h5"
        write_data(data, args)
        result["eager"] = eager_rows(args, data, work) if "eager" in args.parts else []
        if "compiled" in args.parts:
            result["compiled"] = compiled_rows(args, data, work, result["eager"])
        if "ranks" in args.parts:
            result["two_ranks"] = two_rank_rows(args, data, work)
        if "fashion" in args.parts:
            result["fashion"] = fashion_rows(args, work)
    result["seconds"] = time.perf_counter() - started
    report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    failed = result.get("tests", {}).get("returncode", 0) not in (0, 5)   # 5: none collected
    return 1 if failed else 0


def _table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n{'model':<9} {'variant':<19} {'bare img/s':>10} {'mpicnn img/s':>12} "
          f"{'mpicnn/bare':>11}")
    for r in rows:
        print(f"{r['model']:<9} {r['variant']:<19} {r['bare_images_per_s']:10.0f} "
              f"{r['mpicnn_images_per_s']:12.0f} {r['ratio']:11.2f}")


def report(result: dict) -> None:
    """The tables: eager and compiled against the bare loop, 2 ranks, Fashion-MNIST."""
    if result.get("eager"):
        _table("eager, 1 rank:", result["eager"])
    if result.get("compiled"):
        _table(f"--compile {result['compiled'][0]['mode']}, 1 rank, against the bare eager "
               f"loop:", result["compiled"])
    if result.get("two_ranks"):
        print(f"\n2 ranks sharing the {result['device']} (fp32, batch {result['batch']} each):")
        for r in result["two_ranks"]:
            print(f"  {r['model']:<9} --cuda-aware {r['cuda_aware']:<4} "
                  f"{r['images_per_s']:9.0f} images/s; buffers: {r['buffers']}")
    fashion = result.get("fashion")
    if fashion and "skipped" in fashion:
        print(f"\nFashion-MNIST: skipped: {fashion['skipped']}")
    elif fashion:
        print(f"\nFashion-MNIST recipe ({' '.join(fashion['flags'][1:])}):")
        for name in ("eager", "compiled"):
            r = fashion[name]
            at = (f"{fashion['target']} at epoch {r['target_epoch']} after "
                  f"{r['target_train_s']:.1f} s" if r["target_epoch"] else
                  f"{fashion['target']} not reached")
            print(f"  {name:<9} val acc {r['val_acc']:.4f} (best {r['best_val_acc']:.4f}) in "
                  f"{r['train_s']:.1f} s of training, {r['images_per_s']:.0f} images/s; {at}")
    print(f"\ntotal {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
