"""Restart supervision: relaunch a crashed job from its newest checkpoint, within a budget.

``python -m mpicnn.run --max-restarts 3 -- mpirun -n 8 python -m mpicnn.train ...`` (and
the job scripts, which run their launcher through it). When a launch exits non-zero for
another reason than bad input (exit 2), a clean stop (exit 75) or a write that cannot
succeed (exit 74: disk full, no permission, read-only file system), the supervisor logs
the cause (exit status or signal, rank, node where known: ``crash``), records a
``restart`` event in the run's metrics, waits a back-off that doubles with each restart,
and launches again with ``--resume auto``. After ``--max-restarts`` restarts it gives
up with one error line naming the last cause. Under ``srun`` a node that failed
``--exclude-after`` times is left out (``srun --exclude``) and the run continues on
the remaining nodes at the smaller world size. Stop signals go to the launcher once,
and end supervision.
"""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..cluster.batchjob import STOP_SIGNALS, batch_job, job_defaults
from ..cluster.errors import print_error
from ..cluster.world import RANKS_FILE_ENV
from ..config.fields import OFF_WORDS
from ..observe.records import MetricsWriter
from .crash import BAD_INPUT, PREEMPTED, UNWRITABLE, Cause, find_cause, read_ranks
from .write_failure import WriteFailed

TAIL_LINES = 400              # of a launch's output, searched for the cause of its end


@dataclass
class Policy:
    """How often and how soon to restart."""

    max_restarts: int = 3
    backoff: float = 10.0         # seconds before the first restart; doubles after each
    backoff_max: float = 300.0
    exclude_after: int = 2        # failures of one node before srun leaves it out

    def wait(self, restart: int) -> float:
        """Seconds to wait before restart number ``restart`` (1, 2, ...)."""
        return min(self.backoff_max, self.backoff * 2 ** (restart - 1))


# --- the command line ------------------------------------------------------------------

def option_value(command, name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``command`` (the last one)."""
    value = None
    for i, word in enumerate(command):
        if word == name and i + 1 < len(command):
            value = command[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def with_resume(command) -> list[str]:
    """``command`` resuming from the newest checkpoint: ``--resume auto`` replaces any other."""
    out, skip = [], False
    for i, word in enumerate(command):
        if skip:
            skip = False
        elif word == "--resume" and i + 1 < len(command):
            skip = True
        elif not word.startswith("--resume="):
            out.append(word)
    return [*out, "--resume", "auto"]


def tasks_per_node(env) -> int | None:
    """Tasks SLURM starts on each node of this job, when it is the same on all."""
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    counts = set(re.findall(r"(\d+)(?:\(x\d+\))?", env.get("SLURM_TASKS_PER_NODE", "")))
    return int(counts.pop()) if len(counts) == 1 else None


def srun_excluding(command, excluded, nodes, per_node: int | None) -> list[str] | None:
    """``command`` with its ``srun`` leaving ``excluded`` out of ``nodes``; None if it cannot
    (no srun, no node left, or tasks per node unknown)."""
    at = next((i for i, word in enumerate(command) if os.path.basename(word) == "srun"), None)
    remaining = [node for node in nodes if node not in excluded]
    if at is None or not remaining or per_node is None:
        return None
    return [*command[: at + 1], f"--exclude={','.join(sorted(excluded))}",
            f"--nodes={len(remaining)}", f"--ntasks={per_node * len(remaining)}",
            *command[at + 1:]]


def job_nodes(env) -> list[str]:
    """The hostnames of this SLURM allocation (``scontrol show hostnames``)."""
    listing = env.get("SLURM_JOB_NODELIST", "")
    if not listing:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", listing], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return [] if "[" in listing else listing.split(",")
    return out.split()


# --- running it ------------------------------------------------------------------------

class Supervisor:
    """Runs ``command`` until it succeeds, stops cleanly, fails for good or the budget ends."""

    def __init__(self, command, policy: Policy, env=None, out=None):
        self.command, self.policy = list(command), policy
        self.env = dict(os.environ if env is None else env)
        self.out = out or sys.stdout
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        self.woken = threading.Event()
        self.started = time.time()              # "time" of restart records counts from here
        defaults = job_defaults(batch_job(self.env))
        self.metrics = option_value(command, "--metrics") or defaults.get("metrics", "")
        directory = option_value(command, "--checkpoint-dir")
        if directory is not None and directory.strip().lower() in OFF_WORDS:
            directory = ""                     # --checkpoint-dir off: none written
        self.can_resume = bool(directory or option_value(command, "--config") or
                               (directory is None and defaults.get("checkpoint_dir")))

    def log(self, message: str) -> None:
        print(f"mpicnn: run: {message}", file=self.out, flush=True)

    def run(self) -> int:
        """Supervise; returns the exit status for the caller (the job script)."""
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            return self._supervise()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _supervise(self) -> int:
        if not self.can_resume:
            self.log("warning: no --checkpoint-dir on the command line: a restart begins "
                     "from scratch")
        command, restarts = self.command, 0
        failures, excluded = collections.Counter(), set()
        while True:
            code, cause = self._launch(command, restarts)
            if code == 0:
                if restarts:
                    self.log(f"finished after {restarts} restart(s)")
                return 0
            if self.stop_signal is not None:
                self.log(f"stopped by {signal.Signals(self.stop_signal).name}: not restarting "
                         f"({cause.describe()})")
                return status(code)
            if code == BAD_INPUT:
                self.log("not restarting: exit 2 is bad input, which a restart cannot fix")
                return code
            if code == UNWRITABLE:
                self.log("not restarting: exit 74 is a write that failed for good (disk full, "
                         "no permission or a read-only file system), which a restart cannot "
                         "fix; make room or fix the path, then continue with --resume auto")
                return code
            if code == PREEMPTED:
                self.log("not restarting: exit 75 is a clean stop with a checkpoint written; "
                         "continue with --resume auto")
                return code
            if restarts >= self.policy.max_restarts:
                print_error(f"gave up after {restarts} restart(s) (--max-restarts "
                            f"{self.policy.max_restarts}): the last launch ended with "
                            f"{cause.describe()}")
                return status(code)
            restarts += 1
            wait = self.policy.wait(restarts)
            if cause.node:
                failures[cause.node] += 1
                if failures[cause.node] >= self.policy.exclude_after:
                    command = self._exclude(cause.node, excluded, command)
            self.log(f"launch {restarts} ended with {cause.describe()}; restart {restarts} of "
                     f"at most {self.policy.max_restarts} in {wait:g} s"
                     + (", resuming from the newest checkpoint" if self.can_resume else ""))
            self._record(restarts, cause, wait)
            if self.woken.wait(wait):          # a stop signal during the back-off
                self.log(f"stopped by {signal.Signals(self.stop_signal).name} before the "
                         f"restart")
                return PREEMPTED
            if self.can_resume:
                command = with_resume(command)

    def _exclude(self, node: str, excluded: set, command) -> list[str]:
        """The command leaving ``node`` out, if the launcher and allocation allow it."""
        changed = srun_excluding(self.command, excluded | {node}, job_nodes(self.env),
                                 tasks_per_node(self.env))
        if changed is None:
            self.log(f"node {node} failed {self.policy.exclude_after} times, but it cannot be "
                     f"left out (srun only, and some other node must remain)")
            return command
        excluded.add(node)
        flags = " ".join(word for word in changed if word not in self.command)
        self.log(f"node {node} failed {self.policy.exclude_after} times: leaving it out "
                 f"(srun {flags})")
        return with_resume(changed) if self.can_resume else changed

    def _launch(self, command, restarts: int) -> tuple[int, Cause]:
        """Run one launch, passing its output through; (exit status, cause of its end)."""
        tail = collections.deque(maxlen=TAIL_LINES)
        with tempfile.TemporaryDirectory(prefix="mpicnn-run-") as tmp:
            ranks_file = Path(tmp) / "ranks"
            env = {**self.env, RANKS_FILE_ENV: str(ranks_file),
                   "MPICNN_RESTART": str(restarts)}
            self.log(f"launch {restarts + 1}: {' '.join(command)}")
            # its own session: a terminal's Ctrl-C reaches the ranks once, through us
            self.child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True)
            if self.stop_signal is not None:          # arrived while starting
                self.child.send_signal(self.stop_signal)
            copies = [threading.Thread(target=copy_lines, args=(pipe, sink, tail), daemon=True)
                      for pipe, sink in ((self.child.stdout, sys.stdout),
                                         (self.child.stderr, sys.stderr))]
            for thread in copies:
                thread.start()
            code = self.child.wait()
            for thread in copies:
                thread.join()
            ranks = read_ranks(ranks_file.read_text()) if ranks_file.exists() else {}
        self.child = None
        return code, find_cause(code, list(tail), ranks)

    def _record(self, restart: int, cause: Cause, wait: float) -> None:
        if not self.metrics:
            return
        try:
            writer = MetricsWriter(self.metrics, run_start=self.started)
            try:
                writer.write("restart", restart=restart, backoff_s=wait, **cause.fields())
            finally:
                writer.close()
        except WriteFailed as exc:        # a lost record must not stop the restart
            self.log(f"warning: {exc}")

    def _on_signal(self, signum, frame=None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        self.woken.set()


def copy_lines(pipe, sink, tail) -> None:
    """Copy a launch's output to ``sink`` as it comes, keeping the last lines in ``tail``."""
    for raw in iter(pipe.readline, b""):
        line = raw.decode(errors="replace")
        tail.append(line)
        sink.write(line)
        sink.flush()
    pipe.close()


def status(code: int) -> int:
    """A shell's exit status for a launch status (killed by signal N: 128 + N)."""
    return 128 - code if code < 0 else code
