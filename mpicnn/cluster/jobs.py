"""Jobs as processes: the package's one builder of ``mpirun`` commands and job runner.

Benchmarks, tests and the emulated cluster start every job through here: the launcher
found on PATH with the flags it needs, this checkout on PYTHONPATH, unbuffered output,
and a process group of its own that a timeout kills whole.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import MpicnnError

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
    hung: bool = False              # killed at its timeout

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
        check: bool = False, capture: bool = True, cleanup=None) -> Finished:
    """Run ``command`` to its end, or kill its group (and ``cleanup()``) past ``timeout``.

    ``check``: raise JobHung on a hang, JobFailed on a non-zero exit. ``capture=False``
    lets the output through to this process's own. Ctrl-C kills the job too.
    """
    started = time.monotonic()
    pipe = subprocess.PIPE if capture else None
    proc = start(command, env, cwd, stdout=pipe, stderr=pipe)
    hung = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        kill_group(proc)
        out, err = proc.communicate()
    finally:
        kill_group(proc)                  # no rank may outlive its launcher
        if cleanup is not None:
            cleanup()
    finished = Finished(list(map(str, command)), proc.returncode, out or "", err or "",
                        time.monotonic() - started, hung)
    if check and hung:
        raise JobHung(finished.describe(f"hung for {timeout:.0f} s"), finished)
    if check and finished.returncode != 0:
        raise JobFailed(finished.describe(f"exited {finished.returncode}"), finished)
    return finished


def mpirun(n: int, module: str, args=(), timeout: float | None = None,
           env: dict | None = None) -> Finished:
    """Run ``python -m module args`` on ``n`` ranks; raise JobFailed unless it succeeds."""
    return run(mpirun_command(n, python_command("-m", module, *args)), timeout, env,
               check=True)
