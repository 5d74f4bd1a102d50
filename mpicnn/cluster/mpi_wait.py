"""How MPI waits for a message: polling the core, or yielding it to the ranks that compute.

MPICH and Open MPI poll while they wait, so a rank's communication thread waiting on a
collective (or on the other ranks of its node at a barrier) takes a core whole. Where a
node's ranks have a spare core each that costs nothing; where they do not (a laptop, a
CPU node whose ranks fill the cores with compute) it takes time from the very backward
pass it waits for. ``--mpi-wait yield`` asks the library to give the core up after a
while without progress; ``auto`` does so when this node's ranks cannot each have two
cores (one computing, one communicating).

MPI reads these settings once, at ``MPI_Init``, so the choice is made before MPI starts,
from the command line (``--mpi-wait``) or ``MPICNN_MPI_WAIT``, and set in the process's
environment. Settings the user gave the library (the same variables) are left alone.
"""
from __future__ import annotations

import os

CHOICES = ("auto", "busy", "yield")
ENV = "MPICNN_MPI_WAIT"
FLAG = "--mpi-wait"
# After this many polls that move nothing MPICH yields (about a millisecond of polling).
IDLE_POLLS = 1000
YIELDING = {
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1",            # MPICH 4.3 and later (ch4)
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": str(IDLE_POLLS),
    "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",               # sleep, not sched_yield
    "OMPI_MCA_mpi_yield_when_idle": "1",               # Open MPI
}
# Launchers' count of this node's ranks: hydra, Open MPI, SLURM's srun.
LOCAL_RANKS_ENV = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def requested(argv, environ=os.environ) -> str:
    """The choice: ``--mpi-wait X`` (or ``--mpi-wait=X``) in ``argv``, else the environment,
    else ``auto``. A value that is not a choice is left for the config's own error."""
    argv = list(argv or ())
    for i, arg in enumerate(argv):
        if arg == FLAG and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(FLAG + "="):
            return arg.split("=", 1)[1]
    return environ.get(ENV, "auto")


def local_ranks(environ=os.environ) -> int:
    """This node's rank count as the launcher tells it (1 when it does not)."""
    for name in LOCAL_RANKS_ENV:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def decide(choice: str, ranks: int, cores: int) -> str:
    """``busy`` or ``yield``: ``auto`` yields when ``ranks`` cannot have two cores each."""
    if choice == "auto":
        return "yield" if 2 * ranks > cores else "busy"
    return "yield" if choice == "yield" else "busy"


def prepare(argv, environ=os.environ) -> str:
    """Decide before ``MPI_Init`` and set the library's variables; return the decision."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    decision = decide(requested(argv, environ), local_ranks(environ), cores)
    if decision == "yield":
        for name, value in YIELDING.items():
            environ.setdefault(name, value)
    return decision
