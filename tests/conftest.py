"""Shared test helpers: launching real MPI jobs and reading what they wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpicnn.bench import launch

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "data" / "digits.h5"


def read_jsonl(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def mpirun_command(n: int, args, module: str = "mpicnn.train", script=None) -> list[str]:
    """``python -m module args`` (or ``python script args``) on n ranks; skip without MPI."""
    program = launch.python_command(*([script] if script else ["-m", module]), *args)
    try:
        return launch.mpirun_command(n, program)
    except launch.LauncherMissing as exc:
        pytest.skip(str(exc))


def job_env(extra: dict | None = None) -> dict:
    """The environment every job gets, with ``extra`` on top."""
    return launch.job_environment(extra)


def run_command(cmd: list, timeout: float, env: dict | None = None, cwd=ROOT,
                check: bool = False) -> launch.Finished:
    """Run ``cmd`` in its own process group; fail the test on a hang or (check) an error."""
    try:
        return launch.run(cmd, timeout, env, cwd, check)
    except launch.JobFailed as exc:
        pytest.fail(str(exc))


def mpirun(n: int, args, timeout: float = 240, module: str = "mpicnn.train",
           env: dict | None = None, check: bool = True, script=None) -> launch.Finished:
    """Run ``python -m module args`` on n ranks; fail the test on a hang or (check) an error."""
    return run_command(mpirun_command(n, args, module, script), timeout, env, check=check)


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
