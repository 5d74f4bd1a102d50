"""The MPI world: ranks, nodes, devices, the rank-aware logger and abort-on-error.

This module is the only reader of launcher environment variables.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field

from .errors import MpicnnError

# Testing aid: group consecutive ranks into fake nodes of this many ranks.
FAKE_RANKS_PER_NODE_ENV = "MPICNN_RANKS_PER_NODE"
CUDA_AWARE_ENV = "MPICNN_CUDA_AWARE"
# Testing aid: ask MPI for a lower thread level (single, funneled, serialized).
THREAD_LEVEL_ENV = "MPICNN_THREAD_LEVEL"
ABORT_GRACE_S = 0.5              # before MPI_Abort: the error line must reach the user
# Testing aid: 'rank:step:seconds[,...]' makes that rank stall before that step's exchange.
TEST_SLEEP_ENV = "MPICNN_TEST_SLEEP"


@dataclass
class World:
    """Who this process is in the job; decided once and passed down."""

    comm: object                     # MPI.Comm (COMM_WORLD)
    rank: int = 0
    size: int = 1
    local_comm: object = None        # ranks on this node
    local_rank: int = 0
    local_size: int = 1
    node: int = 0                    # index of this node among nodes
    num_nodes: int = 1
    hostname: str = field(default_factory=socket.gethostname)
    device: object = None            # torch.device, set by bind_device()
    log: logging.Logger = None
    job: "BatchJob | None" = None    # the SLURM/PBS job this run belongs to, if any

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def agree(self, check):
        """Run ``check()`` on every rank; if any rank fails, raise the same error on all.

        The first failing rank's message wins, so all ranks stop together and
        rank 0 alone reports it. Unexpected exceptions are agreed on too (as
        ``Type: message``) so that a check failing everywhere prints one line.
        """
        cause = None
        try:
            result, error = check(), None
        except MpicnnError as exc:
            result, error = None, str(exc)
        except Exception as exc:      # noqa: B902 - reported once below, cause kept for --debug
            result, error, cause = None, f"{type(exc).__name__}: {exc}", exc
        errors = self.comm.allgather(error)
        for rank, message in enumerate(errors):
            if message is not None:
                where = f" (rank {rank})" if self.size > 1 and errors.count(None) else ""
                raise MpicnnError(message + where, collective=True) from cause
        return result

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (after the launcher has had a moment to forward
        what this rank printed: MPICH's hydra drops output still in the pipe on an abort)."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)


def init_world() -> World:
    """Start MPI (thread-multiple when offered) and find this rank's node."""
    import mpi4py
    mpi4py.rc.thread_level = os.environ.get(THREAD_LEVEL_ENV, "multiple")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    fake = os.environ.get(FAKE_RANKS_PER_NODE_ENV)
    if fake:
        local_comm = comm.Split(color=rank // max(1, int(fake)), key=rank)
    else:
        local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local_comm.Get_rank(), local_comm.Get_size()
    leaders = comm.allgather(local_rank == 0)
    node = sum(leaders[: rank + 1]) - 1 if local_rank == 0 else None
    node = local_comm.bcast(node, root=0)
    world = World(comm=comm, rank=rank, size=size, local_comm=local_comm,
                  local_rank=local_rank, local_size=local_size,
                  node=node, num_nodes=sum(leaders),
                  job=comm.bcast(batch_job(), root=0))   # rank 0's view, so all agree
    world.log = make_logger(world.is_root)
    return world


def make_logger(active: bool) -> logging.Logger:
    """Rank 0 logs to stdout; every other rank gets a logger that does nothing."""
    logger = logging.getLogger("mpicnn" if active else "mpicnn.silent")
    logger.propagate = False
    logger.handlers.clear()
    if active:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("mpicnn: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL + 1)
    return logger


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


def bind_device(world: World, requested: str, threads: int = 0):
    """Choose this rank's device: GPU = local rank mod GPU count; CPU threads shared fairly."""
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise MpicnnError(f"unknown device {requested!r}; choose auto, cpu or cuda")
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise MpicnnError("--device cuda asked for, but torch sees no CUDA GPU "
                          "(use --device cpu or auto)", collective=True)
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
            f"{world.size} rank(s) on {', '.join(hosts)}; devices {', '.join(devices)}{job}")


@dataclass(frozen=True)
class BatchJob:
    """The batch-scheduler job (SLURM or PBS) this process runs in."""

    scheduler: str                   # "slurm" or "pbs"
    job_id: str                      # array tasks: "<array job id>_<task index>"
    name: str = ""
    restarts: int = 0                # times the scheduler requeued the job

    def __str__(self) -> str:
        again = f", restart {self.restarts}" if self.restarts else ""
        return f"{self.scheduler.upper()} job {self.job_id} ({self.name or 'unnamed'}{again})"


def batch_job(env=None) -> BatchJob | None:
    """The SLURM or PBS job from the launcher's environment; None outside a batch job."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        job_id = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        restarts = env.get("SLURM_RESTART_COUNT", "0")
        return BatchJob("slurm", job_id, env.get("SLURM_JOB_NAME", ""),
                        int(restarts) if restarts.isdigit() else 0)
    if env.get("PBS_JOBID"):
        # "1234.server" or, for an array task, "1234[5].server"
        job_id = env["PBS_JOBID"].split(".", 1)[0].replace("[]", "")
        if "[" in job_id:
            job_id = job_id.replace("[", "_").rstrip("]")
        elif env.get("PBS_ARRAY_INDEX"):
            job_id = f"{job_id}_{env['PBS_ARRAY_INDEX']}"
        return BatchJob("pbs", job_id, env.get("PBS_JOBNAME", ""))
    return None


def drill_sleep_spec() -> str:
    """The stall drill's 'rank:step:seconds' list (empty outside tests)."""
    return os.environ.get(TEST_SLEEP_ENV, "")


def cuda_aware_override() -> str | None:
    """The user's CUDA-aware setting from the environment, if any (on/off)."""
    value = os.environ.get(CUDA_AWARE_ENV, "").strip().lower()
    return {"1": "on", "on": "on", "true": "on", "0": "off", "off": "off",
            "false": "off"}.get(value)


def report_failure(world: World | None, exc: BaseException, debug: bool) -> int:
    """Print one ``mpicnn: error:`` line (once per job) and return the exit code."""
    collective = isinstance(exc, MpicnnError) and exc.collective
    rank = world.rank if world else 0
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, MpicnnError):
        message = str(exc)
    else:
        hint = "" if debug else " (rerun with --debug for the traceback)"
        message = f"{type(exc).__name__}: {exc}{hint}"
    if not collective and world and world.size > 1:
        message = f"rank {rank}: {message}"
    if not collective or rank == 0:
        print(f"mpicnn: error: {message}", file=sys.stderr, flush=True)
    return exc.exit_code if isinstance(exc, MpicnnError) else 1


def run_guarded(main, argv, world_factory=init_world) -> int:
    """Run ``main(world, argv)``; on failure report once and end every rank."""
    debug = "--debug" in (argv or [])
    world = None
    try:
        world = world_factory()
        return main(world, argv) or 0
    except SystemExit as exc:          # --help and friends
        return exc.code if isinstance(exc.code, int) else 0
    except BaseException as exc:       # noqa: B902 - every failure must end the job
        code = report_failure(world, exc, debug)
        collective = isinstance(exc, MpicnnError) and exc.collective
        if world is not None and world.size > 1 and not collective:
            world.abort(code)
        return code
