"""What ended a launch: exit status, the rank, its node and signal, read from what it printed.

Pure functions over the launcher's output lines (MPICH's hydra, Open MPI's mpirun, srun)
and mpicnn's own ``mpicnn: error:`` line, plus the ranks file the ranks write when
``MPICNN_RANKS_FILE`` names one (``cluster.world``): hydra names a dead process by pid
and host only, the ranks file turns that pid into a rank.
"""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass

# exit statuses that end supervision instead of a restart
BAD_INPUT = 2             # mpicnn.cluster.errors.MpicnnError.exit_code
PREEMPTED = 75            # mpicnn.resilience.preemption.PREEMPTED_EXIT
UNWRITABLE = 74           # mpicnn.resilience.write_failure.EXIT_CODE (disk full, permission)

HYDRA_PID = re.compile(r"PID (\d+) RUNNING AT (\S+)")
HYDRA_SIGNAL = re.compile(r"EXIT STRING: .*\(signal (\d+)\)")
OPENMPI = re.compile(r"process rank (\d+) with PID (\d+) on node (\S+) exited on signal (\d+)")
SRUN = re.compile(r"srun: error: ([^:\s]+): tasks? (\d+)(?:[-,][\d,-]*)?: (.+)")
# How srun reports a task it ended itself (--kill-on-bad-exit, scancel): a victim, not a cause.
SRUN_TERMINATED = ("Terminated", "Exited with exit code 143")
MPICNN = re.compile(r"mpicnn: error: (?:rank (\d+): )?(.+)")


@dataclass
class Cause:
    """Why a launch ended, as far as its output tells."""

    exit_code: int                  # the launcher's status (negative: killed by that signal)
    rank: int | None = None
    node: str | None = None
    pid: int | None = None
    signal: int | None = None
    message: str = ""               # mpicnn's error line, if a rank printed one

    def describe(self) -> str:
        """One phrase: ``exit 9: rank 1 (pid 4604) on n01 killed by SIGKILL``."""
        status = (f"killed by {signal_name(-self.exit_code)}" if self.exit_code < 0
                  else f"exit {self.exit_code}")
        who = []
        if self.rank is not None:
            who.append(f"rank {self.rank}")
        if self.pid is not None:
            who.append(f"(pid {self.pid})" if who else f"pid {self.pid}")
        if self.node:
            who.append(f"on {self.node}")
        if self.signal:
            who.append(f"killed by {signal_name(self.signal)}")
        text = status + (": " + " ".join(who) if who else "")
        return text + (f"; {self.message}" if self.message else "")

    def fields(self) -> dict:
        """For the ``restart`` metrics record (unknown: -1 and "")."""
        return {"exit_code": self.exit_code, "rank": -1 if self.rank is None else self.rank,
                "node": self.node or "", "signal": self.signal or 0, "cause": self.describe()}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def read_ranks(text: str) -> dict[int, tuple[int, str]]:
    """{pid: (rank, host)} from the ranks file's ``rank pid host`` lines."""
    ranks = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            ranks[int(parts[1])] = (int(parts[0]), parts[2])
    return ranks


def find_cause(exit_code: int, lines, ranks: dict | None = None) -> Cause:
    """The cause of a launch's end from its output ``lines`` (the first rank that died).

    Tasks that srun ended with SIGTERM after another one failed name no rank or node:
    blaming their node would leave a healthy node out after two such launches.
    """
    cause = Cause(exit_code)
    for line in lines:
        if (m := OPENMPI.search(line)) and cause.rank is None:
            cause.rank, cause.pid, cause.node = int(m[1]), int(m[2]), m[3]
            cause.signal = int(m[4])
        elif ((m := SRUN.search(line)) and cause.node is None
              and m[3].strip().rstrip(".") not in SRUN_TERMINATED):
            cause.node, cause.rank = m[1], int(m[2])
            name = m[3].strip().rstrip(".")
            cause.signal = {"Killed": signal.SIGKILL, "Segmentation fault": signal.SIGSEGV,
                            "Aborted": signal.SIGABRT}.get(name)
        elif (m := HYDRA_PID.search(line)) and cause.pid is None:
            cause.pid, cause.node = int(m[1]), m[2]
        elif (m := HYDRA_SIGNAL.search(line)) and cause.signal is None:
            cause.signal = int(m[1])
        elif (m := MPICNN.match(line.strip())) and not cause.message:
            cause.message = line.strip()
            if m[1] is not None and cause.rank is None:
                cause.rank = int(m[1])
    if cause.pid is not None and ranks and cause.pid in ranks:
        cause.rank, host = ranks[cause.pid]
        cause.node = cause.node or host
    return cause
