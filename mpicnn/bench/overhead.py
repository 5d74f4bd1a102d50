"""``python -m mpicnn.bench overhead``: what one mpicnn rank adds to a bare PyTorch step.

Runs the bare loop (``_bare``) and ``mpicnn.train`` on one rank with the same model,
optimizer, precision and batch, each twice: timed, and under torch.profiler (the run's
``--profile``). Per step it reports the host operators dispatched, the kernels and
launches (on a GPU), the waits for the device, and milliseconds; then mpicnn less bare,
and the operators mpicnn dispatches that the bare loop does not. On the CPU it is the
proxy for the GPU's launch-bound regime: every extra operator is an extra kernel there.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ..cluster import jobs
from ..observe.report import load_run
from ._bare import OPTIMIZER_FLAGS, WARMUP, BareLoop

COLUMNS = ("host_ops", "aten_ops", "kernels", "launches", "syncs", "ms_per_step", "images_per_s")
FLAGS = {"off": [], "bf16": ["--amp", "bf16"], "fp16": ["--amp", "fp16"]}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpicnn.bench overhead",
                                description="Per-step host operators, kernels, device waits "
                                            "and time: mpicnn.train at 1 rank against a bare "
                                            "PyTorch loop, like for like.")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="seednet")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shape", default="3,32,32", help="C,H,W of the synthetic images")
    p.add_argument("--amp", default="off", choices=list(FLAGS))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=60, help="timed steps (after 5 warm-up)")
    p.add_argument("--profile-steps", type=int, default=10, help="profiled steps")
    p.add_argument("--timeout", type=float, default=600, help="seconds per job")
    p.add_argument("--out", default="", help="also write the result as JSON here")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: more mpicnn.train flags (e.g. -- --compile default)")
    args = p.parse_args(argv)
    args.shape = tuple(int(v) for v in args.shape.split(","))
    args.train_args = [a for a in args.train_args if a != "--"]
    return args


def synthetic_data(path: Path, shape, samples: int) -> None:
    from ..data.synth import write_synth

    write_synth(str(path), int(samples / 0.9) + 2, shape, 10, val_fraction=0.1)


def mpicnn_step(args, data: Path, work: Path, profiled: bool) -> dict:
    """One single-rank mpicnn.train run: its images/s, or its profile summary."""
    metrics = work / f"m{int(profiled)}.jsonl"
    steps = WARMUP + (args.profile_steps if profiled else args.steps)
    flags = ["--data", data, "--model", args.model, "--batch-size", args.batch, "--epochs", 1,
             "--max-steps", steps, *OPTIMIZER_FLAGS, "--device", args.device,
             "--progress", "off", "--log-every", 100_000, "--metrics", metrics,
             *FLAGS[args.amp], *(["--channels-last"] if args.channels_last else []),
             *args.train_args]
    if profiled:
        flags += ["--profile", work / "profile", "--profile-steps", f"{WARMUP}:{steps}"]
    jobs.mpirun(1, "mpicnn.train", flags, args.timeout)
    if profiled:
        return json.loads((work / "profile" / "rank0.summary.json").read_text())
    return {"images_per_s": load_run(str(metrics)).end["images_per_s"]}


def measure(args) -> dict:
    bare = BareLoop(args.model, args.shape, 10, args.device, args.batch, args.amp,
                    args.channels_last)
    try:
        rows = {"bare": {**bare.profile(args.profile_steps),
                         "images_per_s": bare.images_per_s(args.steps)}}
    finally:
        bare.close()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "synth.h5"
        synthetic_data(data, args.shape, args.batch * (WARMUP + max(args.steps,
                                                                    args.profile_steps)))
        rows["mpicnn"] = {**mpicnn_step(args, data, work, profiled=True),
                          **mpicnn_step(args, data, work, profiled=False)}
    for row in rows.values():
        row["ms_per_step"] = 1000 * args.batch / row["images_per_s"]
    extra = {c: rows["mpicnn"][c] - rows["bare"][c] for c in COLUMNS}
    ops = rows["mpicnn"]["ops"]
    extra_ops = {k: round(v - rows["bare"]["ops"].get(k, 0.0), 2) for k, v in ops.items()}
    extra["ops"] = {k: v for k, v in sorted(extra_ops.items(), key=lambda kv: -kv[1]) if v > 0}
    return {"device": args.device, "model": args.model, "batch": args.batch,
            "shape": list(args.shape), "amp": args.amp, "channels_last": args.channels_last,
            "train_args": [str(a) for a in args.train_args], "rows": rows, "extra": extra,
            "ratio": rows["mpicnn"]["images_per_s"] / rows["bare"]["images_per_s"]}


def report(result: dict) -> None:
    print(f"\n{result['model']}, batch {result['batch']}, {result['device']}, amp "
          f"{result['amp']}{', channels_last' if result['channels_last'] else ''}"
          f"{' ' + ' '.join(result['train_args']) if result['train_args'] else ''}; per step:")
    print(f"{'':<16}" + "".join(f"{c:>13}" for c in COLUMNS))
    for name, row in (("bare loop", result["rows"]["bare"]),
                      ("mpicnn 1 rank", result["rows"]["mpicnn"]),
                      ("mpicnn - bare", result["extra"])):
        print(f"{name:<16}" + "".join(f"{row[c]:13.2f}" for c in COLUMNS))
    print(f"mpicnn / bare images/s: {result['ratio']:.3f}")
    shown = ", ".join(f"{k.removeprefix('aten::')} {v:g}" for k, v in
                      list(result["extra"]["ops"].items())[:15])
    print(f"operators mpicnn adds per step: {shown or 'none'}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = measure(args)
    report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
