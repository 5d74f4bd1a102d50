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
QUIET = ["--progress", "off"]


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


def fail_with_output(what: str, stdout: str, stderr: str):
    """Fail the test, showing the tails of what the job printed."""
    pytest.fail(f"{what}:\n{stdout[-3000:]}\n{stderr[-3000:]}")


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
        fail_with_output(f"{' '.join(cmd)} hung for {timeout} s", out, err)
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
        fail_with_output(f"mpirun -n {n} {' '.join(map(str, args))} exited {run.returncode}",
                         run.stdout, run.stderr)
    return run


def train(tmp_path, name, n, *args, launch=mpirun) -> tuple:
    """Launch one run of n ranks writing into tmp_path/name; return (checkpoint dir, end record).

    ``launch(n, args)`` starts the ranks and fails the test unless they succeed.
    """
    from mpicnn.metrics import check_record

    out = tmp_path / name
    launch(n, [*args, "--checkpoint-dir", out, "--metrics", out / "m.jsonl", *QUIET])
    records = read_jsonl(out / "m.jsonl")
    assert not [p for r in records for p in check_record(r)]      # schema-valid metrics
    return out, records[-1]


def records(directory, event: str) -> list[dict]:
    """The metrics records of one event type that a :func:`train` run wrote."""
    return [r for r in read_jsonl(directory / "m.jsonl") if r["event"] == event]


def final(directory) -> dict:
    """The final checkpoint a :func:`train` run wrote."""
    import torch

    return torch.load(directory / "final.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    """Largest difference between two checkpoints' parameters and optimizer states."""
    import torch

    diffs = [(a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]]
    for i, state in a["optimizer"]["state"].items():
        diffs += [(torch.as_tensor(v) - torch.as_tensor(b["optimizer"]["state"][i][k]))
                  .abs().max().item() for k, v in state.items()]
    return max(diffs)


@pytest.fixture(scope="session")
def digits() -> Path:
    return DIGITS


@pytest.fixture(scope="session")
def emulated_cluster():
    """Two emulated nodes for the session (own name and subnet); skip where they cannot be made."""
    from mpicnn.cluster import Cluster, ClusterError

    cluster = Cluster(name="mpicnntest", nodes=2, subnet="10.77.250.0/24")
    try:
        cluster.up()
    except ClusterError as exc:
        pytest.skip(f"cannot emulate nodes here: {exc}")
    try:
        yield cluster
    finally:
        cluster.down()


def pytest_collection_modifyitems(config, items):
    """Skip GPU-marked tests cleanly on machines without CUDA (CI has none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
