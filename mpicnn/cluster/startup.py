"""MPI's start, bounded: a rank that cannot start MPI ends with one line instead of hanging.

``MPI_Init`` waits for every rank of the job, before mpicnn's stall watch (which needs
MPI) can run. A rank stuck there would hold its allocation until the time limit. Seen:

- MPICH names each node's shared-memory file after the job step under ``srun`` (the
  FNV-1a hash of ``"<job id>.<step id>"``: ``/dev/shm/mpich_shm_<hash>_<node index>``).
  A run that crashed leaves that file behind; a later step with the same name (a
  requeued job starts its steps at 0 again) finds it, no rank creates the region, and
  every rank waits for a creator that never comes.
- a node that cannot be reached, a rank that never started.

After ``MPICNN_START_TIMEOUT`` seconds (default 600; 0: wait forever) the rank is killed
(SIGKILL: it is stuck inside MPI), after one line saying why, so ``python -m mpicnn.run``
(the job scripts' launcher) relaunches: under ``srun`` as a new step, with a name of its
own.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .errors import error_line

START_TIMEOUT_ENV = "MPICNN_START_TIMEOUT"
DEFAULT_START_TIMEOUT = 600.0
SHM_DIR = Path("/dev/shm")
# The boot time in /proc/stat has whole seconds; this step's own files come later still
# (after a rank has imported torch and entered MPI_Init).
STARTUP_MARGIN_S = 2.0
QUIET_GRACE_S = 5.0
# rank variables of the launchers, read before MPI knows the rank: srun, hydra, Open MPI
LAUNCHER_RANK = ("SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
LAUNCHER_LOCAL_RANK = ("SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")


def start_timeout(env=None) -> float:
    """Seconds MPI may take to start (``MPICNN_START_TIMEOUT``; 0 or less: unbounded)."""
    value = (os.environ if env is None else env).get(START_TIMEOUT_ENV, "")
    try:
        return float(value) if value.strip() else DEFAULT_START_TIMEOUT
    except ValueError:
        return DEFAULT_START_TIMEOUT


def launcher_rank(env=None, names=LAUNCHER_RANK) -> int | None:
    """This process's rank (``names``: its rank on the node) as the launcher numbered it,
    before MPI has started; None when no launcher said."""
    env = os.environ if env is None else env
    for name in names:
        if env.get(name, "").isdigit():
            return int(env[name])
    return None


def fnv1a(text: str) -> int:
    """32-bit FNV-1a, the hash MPICH names a job's shared memory with."""
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def mpich_step_files(steps, shm_dir: Path = SHM_DIR) -> list[Path]:
    """MPICH's shared-memory files (``mpich_shm_<hash>_<node>``, ``mpich_vci_...``) of the
    SLURM job steps ``steps`` (``"<job id>.<step id>"`` each) that exist now."""
    hashes = {f"{fnv1a(step):x}" for step in steps}
    return sorted(p for p in shm_dir.glob("mpich_*_*_*") if p.name.split("_")[2] in hashes)


def leftover_files(env=None) -> list[Path]:
    """MPICH's shared-memory files named for this SLURM step and older than this process:
    an earlier run left them (this step's own are made after its processes start)."""
    env = os.environ if env is None else env
    job, step = env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID")
    if not (job and step):
        return []
    try:
        before = process_start() - STARTUP_MARGIN_S
        return [p for p in mpich_step_files([f"{job}.{step}"]) if p.stat().st_mtime < before]
    except (OSError, ValueError, StopIteration):     # not Linux, or the file just went
        return []


def process_start() -> float:
    """When this process started (seconds since the epoch, Linux ``/proc``)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def stuck_because(files, env=None) -> str:
    """What most likely keeps MPI from starting, as far as this node can tell."""
    env = os.environ if env is None else env
    if files:
        return (f"an earlier run of this job left MPICH's shared memory for SLURM step "
                f"{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']} on {os.uname().nodename} "
                f"({', '.join(map(str, files))}), and every rank of that node waits for a "
                f"creator that never comes; remove it (a relaunch runs as a new step and "
                f"avoids it)")
    return "a rank that never started, or a node that cannot be reached?"


class StartWatch:
    """``with StartWatch():`` around MPI's start; kills the process if it takes too long.

    ``MPI_Init`` holds Python's lock while it waits, so the watching is done by a small
    process of its own (``startwatcher``), which this closes on the way out. Launcher
    rank 0 (or a process whose rank is unknown) prints the error line, and the first rank
    of each node that found a leftover file of MPICH's names it: the other ranks are
    stuck in the same place and end quietly.
    """

    def __init__(self, timeout: float | None = None, env=None):
        self.env = os.environ if env is None else env
        self.timeout = start_timeout(self.env) if timeout is None else timeout
        self._watcher = None

    def __enter__(self) -> "StartWatch":
        if self.timeout > 0:
            line = self.error_line()
            # the quiet ranks last a little longer: the launcher ends the job with the first
            # rank killed, and the line that says why must be out by then
            wait = self.timeout + (0 if line else QUIET_GRACE_S)
            self._watcher = subprocess.Popen(
                [sys.executable, "-I", "-S", str(Path(__file__).with_name("startwatcher.py")),
                 str(os.getpid()), str(wait), line], stdin=subprocess.PIPE, close_fds=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._watcher is not None:
            self._watcher.stdin.close()           # MPI has started (or failed): stand down
            self._watcher.wait()

    def error_line(self) -> str:
        """What this rank prints if MPI does not start in time ("" to stay quiet)."""
        found = leftover_files(self.env)          # before this step's MPI makes its own
        first_here = launcher_rank(self.env, LAUNCHER_LOCAL_RANK) in (0, None)
        if launcher_rank(self.env) in (0, None) or (found and first_here):
            return error_line(f"MPI did not start within {self.timeout:g} s "
                              f"({START_TIMEOUT_ENV}): {stuck_because(found, self.env)}")
        return ""
