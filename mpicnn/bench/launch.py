"""Launch jobs and read what they wrote: the package's one builder of ``mpirun`` commands.

Benchmarks and tests start every ``mpirun -n N python -m MODULE ...`` through here:
the launcher found on PATH with the flags it needs, this checkout on PYTHONPATH,
unbuffered output, a process group of its own that a timeout kills whole, and the
run's metrics read back through ``observe.report.load_run``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..cluster.errors import MpicnnError
from ..observe.report import Run, load_run

ROOT = Path(__file__).resolve().parents[2]      # the checkout every job imports mpicnn from
LAUNCHERS = ("mpirun", "mpiexec")
TAIL_CHARS = 3000                               # of each output stream, quoted in an error


class LauncherMissing(MpicnnError):
    """No MPI launcher on PATH."""


class JobFailed(MpicnnError):
    """A job exited with an error or hung; ``finished`` holds what it printed."""

    def __init__(self, message: str, finished: Finished):
        super().__init__(message)
        self.finished = finished


class JobHung(JobFailed):
    """A job ran past its timeout and was killed."""


@dataclass
class Finished:
    """What a finished command left: exit status, output, seconds it ran."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self, outcome: str) -> str:
        """``outcome`` of the command line, followed by the tails of its output."""
        return (f"{' '.join(self.command)} {outcome}:\n{self.stdout[-TAIL_CHARS:]}\n"
                f"{self.stderr[-TAIL_CHARS:]}")


def find_launcher() -> str:
    """Path of ``mpirun`` (or ``mpiexec``) on PATH."""
    for name in LAUNCHERS:
        path = shutil.which(name)
        if path:
            return path
    raise LauncherMissing("no mpirun on PATH (pip install mpich)")


def flags_for(version_text: str) -> list[str]:
    """Flags the launcher that printed ``version_text`` (its ``--version``) needs."""
    # Open MPI refuses more ranks than cores without it; MPICH's hydra has no such limit
    return ["--oversubscribe"] if "Open MPI" in version_text or "OpenRTE" in version_text else []


@functools.lru_cache(maxsize=None)
def launcher_flags(launcher: str) -> tuple[str, ...]:
    """Flags ``launcher`` needs, from its ``--version`` (asked once per launcher)."""
    try:
        version = subprocess.run([launcher, "--version"], capture_output=True, text=True,
                                 timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(flags_for(version.stdout + version.stderr))


def python_command(*argv) -> list[str]:
    """This interpreter with ``argv`` (``"-m", module, ...`` or a script and its arguments)."""
    return [sys.executable, *map(str, argv)]


def mpirun_command(n: int, program: list) -> list[str]:
    """The command line that starts ``program`` on ``n`` ranks."""
    launcher = find_launcher()
    return [launcher, "-n", str(n), *launcher_flags(launcher), *map(str, program)]


def job_environment(extra: dict | None = None) -> dict:
    """This process's environment, made fit for a job, with ``extra`` on top."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # Open MPI will not start as root without both; other launchers ignore them
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["PYTHONUNBUFFERED"] = "1"      # output arrives as written, even from a killed rank
    env.update(extra or {})
    return env


def start(command: list, env: dict | None = None, cwd=ROOT,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """Start ``command`` with the job environment, in a process group of its own."""
    return subprocess.Popen(list(map(str, command)), stdout=stdout, stderr=stderr, text=True,
                            env=job_environment(env), cwd=cwd, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in ``proc``'s group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(command: list, timeout: float | None = None, env: dict | None = None, cwd=ROOT,
        check: bool = False) -> Finished:
    """Run ``command`` to its end; raise JobHung past ``timeout``, JobFailed on error (check)."""
    started = time.monotonic()
    proc = start(command, env, cwd)
    hung = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        kill_group(proc)
        out, err = proc.communicate()
    finally:
        kill_group(proc)                  # no rank may outlive its launcher
    finished = Finished(list(map(str, command)), proc.returncode, out, err,
                        time.monotonic() - started)
    if hung:
        raise JobHung(finished.describe(f"hung for {timeout:.0f} s"), finished)
    if check and finished.returncode != 0:
        raise JobFailed(finished.describe(f"exited {finished.returncode}"), finished)
    return finished


def mpirun(n: int, module: str, args=(), timeout: float | None = None,
           env: dict | None = None) -> Finished:
    """Run ``python -m module args`` on ``n`` ranks; raise JobFailed unless it succeeds."""
    return run(mpirun_command(n, python_command("-m", module, *args)), timeout, env,
               check=True)


def train(n: int, args, metrics, timeout: float | None = None) -> Run:
    """Run ``mpicnn.train args`` on ``n`` ranks; return the records it wrote to ``metrics``."""
    mpirun(n, "mpicnn.train", [*args, "--metrics", metrics], timeout)
    return load_run(str(metrics))


def json_result(n: int, module: str, args=(), timeout: float | None = None) -> dict:
    """Run ``python -m module args`` on ``n`` ranks; return the JSON line rank 0 printed last."""
    stdout = mpirun(n, module, args, timeout).stdout
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise MpicnnError(f"python -m {module} printed no JSON result:\n{stdout[-TAIL_CHARS:]}")
    return json.loads(lines[-1])


def parse_with_train_args(parser: argparse.ArgumentParser, argv, help: str):
    """Parse ``argv``; what follows ``--`` lands in ``args.train_args``, flags for the jobs."""
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help=help)
    args = parser.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    return args
