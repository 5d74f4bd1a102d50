"""Shared test helpers: launching real MPI jobs and reading what they wrote."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "data" / "digits.h5"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def records(self, path) -> list[dict]:
        return read_jsonl(path)


def read_jsonl(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def mpirun_command(n: int, args, module: str = "mpicnn.train") -> list[str]:
    launcher = shutil.which("mpirun") or shutil.which("mpiexec")
    if launcher is None:
        pytest.skip("no mpirun on PATH (pip install mpich)")
    return [launcher, "-n", str(n), sys.executable, "-m", module, *map(str, args)]


def job_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_command(cmd: list[str], timeout: float, env: dict | None = None,
                cwd=ROOT) -> Run:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=job_env(env), cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        try:                      # no rank may outlive its launcher
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return Run(proc.returncode, out, err, time.monotonic() - start)


def mpirun(n: int, args, timeout: float = 240, module: str = "mpicnn.train",
           env: dict | None = None, check: bool = True) -> Run:
    """Run ``mpirun -n n python -m module args``; fail the test on a hang or (check) an error."""
    run = run_command(mpirun_command(n, args, module), timeout, env)
    if check and run.returncode != 0:
        pytest.fail(f"mpirun -n {n} {' '.join(map(str, args))} exited {run.returncode}:\n"
                    f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return run


@pytest.fixture(scope="session")
def digits() -> Path:
    return DIGITS


def pytest_collection_modifyitems(config, items):
    """Skip GPU-marked tests cleanly on machines without CUDA (CI has none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
