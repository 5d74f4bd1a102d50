"""This rank's device and CPU threads, and the startup line that describes the world."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import MpicnnError

if TYPE_CHECKING:
    from .world import World


def cpu_threads_per_rank(local_size: int) -> int:
    """Cores this rank may use without oversubscribing the node."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = os.cpu_count() or 1
    if usable < total:               # the launcher bound this rank to its own cores
        return max(1, usable)
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm_cpus and slurm_cpus.isdigit():
        return max(1, int(slurm_cpus))
    return max(1, total // max(1, local_size))


def bind_device(world: World, requested: str, threads: int = 0, server: bool = False):
    """Choose this rank's device: GPU = local rank mod GPU count; CPU threads shared fairly.

    A parameter server (``server``) is bound to the CPU whatever was requested: its range
    and optimizer live in host memory, so a CUDA context, a GPU model copy and a fused
    CUDA optimizer there would only take GPU memory from the workers.
    """
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise MpicnnError(f"unknown device {requested!r}; choose auto, cpu or cuda")
    has_cuda = requested != "cpu" and torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:     # on every rank alike, servers too
        raise MpicnnError("--device cuda asked for, but torch sees no CUDA GPU "
                          "(use --device cpu or auto)", collective=True)
    if server:
        world.device = torch.device("cpu")
    else:
        if requested == "cuda" or (requested == "auto" and has_cuda):
            index = world.local_rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            world.device = torch.device("cuda", index)
        else:
            world.device = torch.device("cpu")
    torch.set_num_threads(threads if threads > 0 else cpu_threads_per_rank(world.local_size))
    return world.device


def describe(world: World) -> str:
    """One line: nodes x ranks x devices, for the startup log."""
    rows = world.comm.gather((world.hostname, str(world.device)), root=0)
    if not world.is_root:
        return ""
    hosts = sorted({h for h, _ in rows})
    devices = sorted({d for _, d in rows})
    job = f"; {world.job}" if world.job else ""
    return (f"world: {world.num_nodes} node(s) x {world.local_size} rank(s)/node = "
            f"{world.size} rank(s) on {', '.join(hosts)}; devices {', '.join(devices)}{job}; "
            f"MPI waits: {world.mpi_wait}")
