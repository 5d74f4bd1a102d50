"""``--profile DIR``: torch.profiler over a window of steps, and what a step costs the host.

The loop calls ``step(global_step)`` at the start of every step (as it does the
timeline) and ``pause()`` when an epoch's steps end (the window ends there, so
evaluation stays out of it); between ``--profile-steps a:b`` the profiler records host operators and, on a
GPU, kernels and CUDA runtime calls. At the end each rank writes ``rank{r}.trace.json``
(open it in ui.perfetto.dev) and ``rank{r}.summary.json``: per step, the operators the
host dispatched, the kernels it launched and the times it waited for the device.
``python -m mpicnn.bench overhead`` compares that summary with a bare PyTorch loop's.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from .timeline import parse_steps

# Host calls that wait for the device (or, on the CPU, read a tensor's value back).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaStreamWaitEvent_sync", "aten::_local_scalar_dense")
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaGraphLaunch")

_profiler = None            # the StepProfiler while --profile is on, else None


def summarize(events, steps: int) -> dict:
    """Per-step counts from profiler events given as (name, kind, nested) triples.

    ``kind``: "cpu" (an operator or a range on the host), "runtime" (a CUDA runtime
    call) or "kernel" (device work); ``nested``: the operator runs inside another
    operator (counted in ``aten_ops``, not in ``host_ops``).
    """
    top, every, launches, kernels, syncs = Counter(), Counter(), 0, 0, Counter()
    for name, kind, nested in events:
        if kind == "kernel":
            kernels += 1
        elif kind == "runtime":
            launches += name in LAUNCH_CALLS
            if name in SYNC_CALLS:
                syncs[name] += 1
        elif name.startswith("aten::"):
            every[name] += 1
            if not nested:
                top[name] += 1
            if name in SYNC_CALLS:
                syncs[name] += 1
    per = max(1, steps)
    return {"steps": steps,
            "host_ops": round(sum(top.values()) / per, 2),
            "aten_ops": round(sum(every.values()) / per, 2),
            "kernels": round(kernels / per, 2),
            "launches": round(launches / per, 2),
            "syncs": round(sum(syncs.values()) / per, 2),
            "sync_calls": {k: round(v / per, 2) for k, v in syncs.most_common()},
            "ops": {k: round(v / per, 2) for k, v in top.most_common()}}


def profiler_events(prof) -> list[tuple[str, str, bool]]:
    """(name, kind, nested) of every event a finished torch.profiler recorded."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out.append((e.name, "kernel", False))
            continue
        if not e.name.startswith("aten::"):
            kind = "runtime" if e.name.startswith(("cuda", "cu")) else "cpu"
            out.append((e.name, kind, False))
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
                break
            parent = parent.cpu_parent
        out.append((e.name, "cpu", nested))
    return out


class StepProfiler:
    """torch.profiler over global steps ``a <= step < b`` of this rank."""

    def __init__(self, directory: str, window: tuple[int, int], rank: int, device):
        self.directory, self.window, self.rank, self.device = directory, window, rank, device
        self.prof = None
        self.steps = 0
        self.summary = None

    def at_step(self, global_step: int) -> None:
        first, last = self.window
        if self.prof is None and self.summary is None and first <= global_step < last:
            self._start()
        if self.prof is not None:
            if global_step >= last:
                self.stop()
            else:
                self.steps += 1

    def _start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            activities.append(ProfilerActivity.CUDA)
        self.prof = profile(activities=activities)
        self.prof.__enter__()

    def stop(self) -> dict | None:
        """End the window (also when the run ends inside it); write trace and summary."""
        if self.prof is None:
            return self.summary
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.summary = {"rank": self.rank, "device": self.device.type,
                        "window": list(self.window), **summarize(profiler_events(prof),
                                                                 self.steps)}
        os.makedirs(self.directory, exist_ok=True)
        prof.export_chrome_trace(os.path.join(self.directory, f"rank{self.rank}.trace.json"))
        with open(os.path.join(self.directory, f"rank{self.rank}.summary.json"), "w") as fh:
            json.dump(self.summary, fh, indent=1)
        return self.summary


def start(world, directory: str, steps: str) -> StepProfiler | None:
    """Profile ``--profile-steps`` when ``directory`` is set (every rank its own files)."""
    global _profiler
    window = parse_steps(steps, "--profile-steps")
    _profiler = StepProfiler(directory, window, world.rank, world.device) if directory else None
    return _profiler


def step(global_step: int) -> None:
    """The loop starts step ``global_step + 1``: open or close the window."""
    if _profiler is not None:
        _profiler.at_step(global_step)


def pause() -> None:
    """An epoch's steps ended: the window ends here too (evaluation stays out of it)."""
    if _profiler is not None:
        _profiler.stop()


def finish(log) -> dict | None:
    """Close the window if the run ended inside it; log one line of the summary."""
    global _profiler
    profiler, _profiler = _profiler, None
    if profiler is None:
        return None
    summary = profiler.stop()
    if summary is not None and summary["steps"]:
        log.info(f"profile: {summary['steps']} steps, per step {summary['host_ops']:g} host "
                 f"operators, {summary['kernels']:g} kernels, {summary['syncs']:g} device "
                 f"waits; trace and summary in {profiler.directory}")
    return summary
