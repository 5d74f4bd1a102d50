"""How MPI waits for a message: polling the core, or yielding it to the ranks that compute.

MPICH and Open MPI poll while they wait, so a rank's communication thread waiting on a
collective (or on the other ranks of its node at a barrier) keeps a core busy. Where a
node's ranks have spare cores that costs nothing; where they share cores with compute,
it takes time from the backward pass it waits for. ``--mpi-wait yield`` asks the library
to sleep after a while without progress. It is not the default: on two emulated nodes
of 2 ranks sharing one core each it gave resnet18 +13% at batch 8 and -7% at batch 32
(docs/benchmarks.md), so it is a choice to measure, not a rule.

MPI reads these settings once, at ``MPI_Init``, so the choice is made before MPI starts,
from the command line (``--mpi-wait``) or ``MPICNN_MPI_WAIT``, and set in the process's
environment. Settings the user gave the library (the same variables) are left alone.
"""
from __future__ import annotations

import os

ENV = "MPICNN_MPI_WAIT"
FLAG = "--mpi-wait"
# After this many polls that move nothing MPICH yields (about a millisecond of polling).
IDLE_POLLS = 1000
YIELDING = {
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1",            # MPICH ch4 (5.0.2 has it)
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": str(IDLE_POLLS),
    "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",               # sleep, not sched_yield
    "OMPI_MCA_mpi_yield_when_idle": "1",               # Open MPI
}


def requested(argv, environ=os.environ) -> str:
    """The choice: ``--mpi-wait X`` (or ``--mpi-wait=X``) in ``argv``, else the environment,
    else ``busy``. A value that is not a choice is left for the config's own error."""
    argv = list(argv or ())
    for i, arg in enumerate(argv):
        if arg == FLAG and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(FLAG + "="):
            return arg.split("=", 1)[1]
    return environ.get(ENV, "busy")


def prepare(argv, environ=os.environ) -> str:
    """Before ``MPI_Init``: set the library's variables for the choice; return the choice."""
    choice = requested(argv, environ)
    if choice == "yield":
        for name, value in YIELDING.items():
            environ.setdefault(name, value)
    return choice
