"""Helpers for failure drills: tagged MPI jobs that can be watched, killed and audited."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import DIGITS, ROOT, mpirun_command

from mpicnn.cluster import jobs

TAG_ENV = "MPICNN_DRILL_TAG"      # marks every process of one drill, found through /proc
RANK_ENVS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
ERROR = "mpicnn: error:"


@dataclass(frozen=True)
class Process:
    """One live process of a drill, as /proc shows it."""

    parent: int
    rank: int | None          # None: the launcher and its helpers
    command: str              # the command line, arguments joined by spaces


def tagged_processes(tag: str) -> dict[int, Process]:
    """{pid: process} of the live processes carrying ``tag``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat[0] == "Z":
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                   if "=" in item)
        if env.get(TAG_ENV) == tag:
            rank = next((int(env[k]) for k in RANK_ENVS if k in env), None)
            found[int(entry.name)] = Process(int(stat[1]), rank, command.replace(
                b"\0", b" ").decode(errors="replace").strip())
    return found


def rank_pids(processes: dict[int, Process]) -> dict[int, int]:
    """{MPI rank: pid} of the ranks themselves among ``processes``.

    A rank's helpers (prefetch readers) inherit its rank variables: the rank is the one
    process of that rank whose parent is not of it.
    """
    return {p.rank: pid for pid, p in processes.items() if p.rank is not None and
            getattr(processes.get(p.parent), "rank", None) != p.rank}


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float            # from launch, or from ``since`` (e.g. the kill) to the exit
    survivors: dict

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(ERROR)]


class Job:
    """``mpirun -n N python -m mpicnn.train ...`` in the background, its output collected."""

    def __init__(self, n: int, args, env: dict | None = None, cwd=None,
                 module: str = "mpicnn.train", command: list | None = None):
        """``command``: a whole launcher command line (e.g. across emulated nodes) instead."""
        self.tag = uuid.uuid4().hex
        self.lines = {"stdout": [], "stderr": []}
        self.started, self.ended = time.monotonic(), None
        self.proc = jobs.start(command or mpirun_command(n, args, module),
                               {**(env or {}), TAG_ENV: self.tag}, cwd or ROOT)
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True)
                        for name in self.lines]
        for reader in self.readers:
            reader.start()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()                   # a failed assertion must not leave ranks running

    def _read(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.lines[name].append(line)

    def _output_tail(self) -> str:
        return f"{''.join(self.lines['stdout'])[-3000:]}\n{''.join(self.lines['stderr'])[-3000:]}"

    def wait_until(self, ready, timeout: float, what: str) -> None:
        """Block until ``ready()`` is true; fail on the job's exit or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill_all()
        pytest.fail(f"never saw {what}:\n{self._output_tail()}")

    def wait_for(self, text: str, timeout: float) -> None:
        """Block until some output line contains ``text``; fail on exit or timeout."""
        self.wait_until(lambda: any(text in line for lines in self.lines.values()
                                    for line in lines), timeout, repr(text))

    def processes(self) -> dict[int, Process]:
        """{pid: process} of this job's live processes."""
        return tagged_processes(self.tag)

    def rank_pid(self, rank: int, timeout: float = 60) -> int:
        """The pid of MPI rank ``rank`` (waiting for it to start)."""
        self.wait_until(lambda: rank in rank_pids(self.processes()), timeout,
                        f"a process of rank {rank}")
        return rank_pids(self.processes())[rank]

    def wait_exit(self, timeout: float) -> float:
        """Wait for mpirun to exit, leaving its ranks alone; when it exited (monotonic).

        Fail the test if it runs past ``timeout`` seconds.
        """
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"job still running after {timeout} s:\n{self._output_tail()}")
        if self.ended is None:
            self.ended = time.monotonic()
        return self.ended

    def finish(self, timeout: float, since: float | None = None) -> Outcome:
        """Wait for mpirun to exit; fail the test if it hangs past ``timeout`` seconds."""
        ended = self.wait_exit(timeout)
        for reader in self.readers:
            reader.join(timeout=10)
        survivors = self._survivors()
        self.kill_all()
        return Outcome(self.proc.returncode, "".join(self.lines["stdout"]),
                       "".join(self.lines["stderr"]), ended - (since or self.started),
                       survivors)

    def _survivors(self, grace: float = 5.0) -> dict:
        """Processes of this job still alive shortly after mpirun exited (should be none)."""
        deadline = time.monotonic() + grace
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def kill_all(self) -> None:
        """SIGKILL everything this drill started (launcher group and tagged ranks)."""
        jobs.kill_group(self.proc)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def file_contains(path: Path, text: str) -> bool:
    """Whether the file at ``path`` exists and contains ``text`` (e.g. a metrics record)."""
    return path.exists() and text in path.read_text()


def run_job(n: int, args, timeout: float = 240, env: dict | None = None, cwd=None) -> Outcome:
    """Run a job to completion and audit it (exit code, output, leftover processes)."""
    return Job(n, args, env, cwd).finish(timeout)


def assert_one_clean_error(outcome: Outcome, expect: str = "") -> str:
    """Non-zero exit, exactly one ``mpicnn: error:`` line (containing ``expect``), no
    traceback, no process left; returns the error line."""
    detail = f"\n{outcome.stdout[-3000:]}\n{outcome.stderr[-3000:]}"
    assert outcome.returncode != 0, "job succeeded" + detail
    assert len(outcome.errors) == 1, f"{len(outcome.errors)} error lines" + detail
    assert "Traceback" not in outcome.output, detail
    assert not outcome.survivors, f"processes left: {outcome.survivors}"
    assert expect in outcome.errors[0], f"{expect!r} not in {outcome.errors[0]!r}"
    return outcome.errors[0]


def record(name: str, outcome: Outcome) -> None:
    """Append one drill result to $MPICNN_DRILL_REPORT (for the closing notes), if set."""
    path = os.environ.get("MPICNN_DRILL_REPORT")
    if path:
        message = outcome.errors[0] if outcome.errors else "(no error line)"
        with open(path, "a") as fh:
            fh.write(f"{name}\t{outcome.returncode}\t{outcome.seconds:.1f}\t{message}\n")


# --- data files ---------------------------------------------------------------

def digits_arrays():
    """(train images, train labels, val images, val labels) of the shipped digits."""
    with h5py.File(DIGITS, "r") as f:
        return (f["train/images"][:], f["train/labels"][:], f["val/images"][:],
                f["val/labels"][:])


def write_h5(path, splits: dict | None = None, root: dict | None = None,
             attrs: dict | None = None) -> Path:
    """Write raw datasets as given, right or wrong: ``{"train": {"images": a, ...}}``."""
    with h5py.File(path, "w") as f:
        for group, datasets in (splits or {}).items():
            g = f.create_group(group)
            for key, value in datasets.items():
                g.create_dataset(key, data=value)
        for key, value in (root or {}).items():
            f.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return Path(path)


def small_digits(path, train: int = 128, val: int = 64, dtype=np.uint8) -> Path:
    """The first samples of the digits as a well-formed file (fast epochs)."""
    xt, yt, xv, yv = digits_arrays()
    scale = 1.0 if dtype == np.uint8 else 1 / 255.0
    return write_h5(path, {"train": {"images": (xt[:train] * scale).astype(dtype),
                                     "labels": yt[:train]},
                           "val": {"images": (xv[:val] * scale).astype(dtype),
                                   "labels": yv[:val]}})


def flip_tensor_byte(source: Path, target: Path) -> Path:
    """Copy ``source`` with one bit flipped inside its largest tensor (zip headers intact)."""
    import zipfile

    raw = bytearray(Path(source).read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    extra = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + len(info.filename.encode()) + extra
    raw[start + info.file_size // 2] ^= 0x01
    Path(target).write_bytes(raw)
    return Path(target)


@dataclass
class KilledWrite:
    """What a kill during a checkpoint write left."""

    args: list                # the run's arguments (resume with them)
    ckpt: Path
    leftover: Path            # the temporary file of the cut write
    complete: list            # the checkpoints left, newest first
    done: int                 # epochs the newest of them holds
    outcome: Outcome


def kill_during_a_write(tmp_path: Path, extra=(), timeout: float = 180) -> KilledWrite:
    """2 ranks of resnet18 on 64 samples (2 steps an epoch, a checkpoint each): SIGKILL rank
    0 while it writes a checkpoint; checks every rank ended and every checkpoint left loads."""
    from mpicnn.checkpoint import files as checkpoint

    data = small_digits(tmp_path / "d.h5", train=64, val=32)
    ckpt = tmp_path / "ckpt"
    args = ["--data", data, "--model", "resnet18", "--checkpoint-dir", ckpt,
            "--keep-checkpoints", "2", "--progress", "off", *extra]
    with Job(2, args + ["--epochs", "1000"]) as job:
        leftover = kill_mid_write(job, ckpt, timeout)
        outcome = job.finish(timeout=timeout, since=time.monotonic())
    assert outcome.returncode != 0 and not outcome.survivors
    assert leftover.exists(), "the kill did not interrupt the write"
    complete = checkpoint.candidates(ckpt)
    assert complete and all(checkpoint.load(p)["model_name"] == "resnet18" for p in complete)
    done = int(checkpoint.PATTERN.match(complete[0].name).group(1)) // 2
    return KilledWrite(args, ckpt, leftover, complete, done, outcome)


def kill_mid_write(job: Job, ckpt: Path, timeout: float) -> Path:
    """Wait for a complete checkpoint, then SIGKILL rank 0 while it writes the next one;
    returns the temporary file the write left."""
    from mpicnn.checkpoint import files as checkpoint

    deadline = time.monotonic() + timeout
    rank0 = job.rank_pid(0)
    while time.monotonic() < deadline and job.proc.poll() is None:
        if checkpoint.candidates(ckpt):
            for tmp in ckpt.glob(".checkpoint-*.pt.tmp*"):
                if tmp.stat().st_size > 0:
                    os.kill(rank0, signal.SIGKILL)
                    return tmp
        time.sleep(0.002)
    job.kill_all()
    pytest.fail("never caught rank 0 writing a second checkpoint")
