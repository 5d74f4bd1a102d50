"""The MPI world: ranks, nodes, the rank-aware logger, abort, and small reductions.

This package is the only reader of launcher environment variables.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .batchjob import BatchJob, batch_job
from . import mpi_wait
from .errors import MpicnnError, report_failure
from .startup import StartWatch

# Testing aid: group consecutive ranks into fake nodes of this many ranks.
FAKE_RANKS_PER_NODE_ENV = "MPICNN_RANKS_PER_NODE"
CUDA_AWARE_ENV = "MPICNN_CUDA_AWARE"
# Testing aid: ask MPI for a lower thread level (single, funneled, serialized).
THREAD_LEVEL_ENV = "MPICNN_THREAD_LEVEL"
ABORT_GRACE_S = 0.5              # before MPI_Abort: the error line must reach the user
# Set by a restart supervisor (mpicnn.run): each rank appends "rank pid host" to this file,
# so a crash the launcher reports by pid names its rank.
RANKS_FILE_ENV = "MPICNN_RANKS_FILE"


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
    even_nodes: bool = True          # every node runs the same number of ranks
    hostname: str = field(default_factory=socket.gethostname)
    device: object = None            # torch.device, set by bind_device()
    log: logging.Logger = None
    job: "BatchJob | None" = None    # the SLURM/PBS job this run belongs to, if any
    mpi_wait: str = "busy"           # how MPI waits: busy or yield (``mpi_wait``)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def agree(self, check, comm=None):
        """Run ``check()`` on every rank (of ``comm``); if any fails, raise the same error on all.

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
        errors = (comm or self.comm).allgather(error)
        for rank, message in enumerate(errors):
            if message is not None:
                where = f" (rank {rank})" if len(errors) > 1 and errors.count(None) else ""
                raise MpicnnError(message + where, collective=True) from cause
        return result

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (after the launcher has had a moment to forward
        what this rank printed: MPICH's hydra drops output still in the pipe on an abort)."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)


def init_world(argv=()) -> World:
    """Start MPI (thread-multiple when offered) and find this rank's node, within
    ``MPICNN_START_TIMEOUT`` seconds (``startup``: a rank stuck there exits).

    ``argv``: the command line, for ``--mpi-wait`` (read before MPI starts)."""
    with StartWatch():
        return _start_world(argv)


def _start_world(argv=()) -> World:
    waits = mpi_wait.prepare(argv)
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
    seen = comm.allgather((local_rank == 0, local_size))
    leaders = [leader for leader, _ in seen]
    node = sum(leaders[: rank + 1]) - 1 if local_rank == 0 else None
    node = local_comm.bcast(node, root=0)
    world = World(comm=comm, rank=rank, size=size, local_comm=local_comm,
                  local_rank=local_rank, local_size=local_size,
                  node=node, num_nodes=sum(leaders),
                  even_nodes=len({sizes for _, sizes in seen}) == 1,
                  job=comm.bcast(batch_job(), root=0),   # rank 0's view, so all agree
                  mpi_wait=waits)
    world.log = make_logger(world.is_root)
    announce(world)
    return world


def announce(world: World) -> None:
    """Append this rank's ``rank pid host`` to the supervisor's ranks file, if it asked."""
    path = os.environ.get(RANKS_FILE_ENV)
    if path:
        try:
            with open(path, "a") as fh:       # one short append: lines of ranks never mix
                fh.write(f"{world.rank} {os.getpid()} {world.hostname}\n")
        except OSError:
            pass                              # diagnostics only: never fail a run for it


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


def spans(values) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2,5'`` (ranks in messages, cores for ``taskset``)."""
    out, values = [], sorted(values)
    for i, v in enumerate(values):
        if i and v == values[i - 1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def cuda_aware_override() -> str | None:
    """The user's CUDA-aware setting from the environment, if any (on/off)."""
    value = os.environ.get(CUDA_AWARE_ENV, "").strip().lower()
    return {"1": "on", "on": "on", "true": "on", "0": "off", "off": "off",
            "false": "off"}.get(value)


def reduce_sums(comm, values) -> np.ndarray:
    """Sum a short vector of numbers over all ranks (one Allreduce; ``comm`` None or of one
    rank: no MPI)."""
    buf = np.asarray(values, dtype=np.float64).copy()
    if comm is not None and comm.Get_size() > 1:     # one rank: nothing to add up
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return buf


def run_guarded(main, argv, world_factory=None) -> int:
    """Run ``main(world, argv)``; on failure report once and end every rank.

    ``world_factory()`` makes the world (default: ``init_world(argv)``)."""
    debug = "--debug" in (argv or [])
    world = None
    try:
        world = world_factory() if world_factory else init_world(argv)
        return main(world, argv) or 0
    except SystemExit as exc:          # --help and friends
        return exc.code if isinstance(exc.code, int) else 0
    except BaseException as exc:       # noqa: B902 - every failure must end the job
        rank, size = (world.rank, world.size) if world else (0, 1)
        code = report_failure(exc, debug, rank, size)
        collective = isinstance(exc, MpicnnError) and exc.collective
        if world is not None and world.size > 1 and not collective:
            world.abort(code)
        return code
