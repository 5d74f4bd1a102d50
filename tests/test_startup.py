"""MPI's start, bounded (``mpicnn.cluster.startup``): a rank stuck there is killed after one
line, and leftover MPICH shared memory of the same SLURM step is named.

The real hang (MPICH waiting behind a leftover file under srun) and the relaunch that
gets past it are in tests/test_slurm.py.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from mpicnn.cluster.startup import (
    DEFAULT_START_TIMEOUT,
    SHM_DIR,
    StartWatch,
    fnv1a,
    process_start,
    start_timeout,
)

STUCK = ("import time\nfrom mpicnn.cluster.startup import StartWatch\n"
         "with StartWatch({timeout}):\n    time.sleep(60)\n")


def run_stuck(timeout: float, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_"))}
    return subprocess.run([sys.executable, "-c", STUCK.format(timeout=timeout)],
                          env={**clean, **env}, capture_output=True, text=True, timeout=50)


def test_a_rank_stuck_in_the_start_is_killed_after_one_line():
    done = run_stuck(1.0, PMI_RANK="0")
    assert done.returncode == -9, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "mpicnn: error: MPI did not start within 1 s (MPICNN_START_TIMEOUT): "), lines


def test_the_other_ranks_end_quietly():
    done = run_stuck(0.5, PMI_RANK="3")
    assert done.returncode == -9 and done.stderr == "", done


def test_a_start_in_time_stops_its_watcher():
    with StartWatch(30.0) as watch:
        watcher = watch._watcher
        assert watcher.poll() is None                   # watching
    assert watcher.poll() == 0                          # stood down, reaped


def test_zero_waits_forever_and_starts_no_watcher():
    with StartWatch(0) as watch:
        assert watch._watcher is None


def test_start_timeout_from_the_environment():
    assert start_timeout({}) == DEFAULT_START_TIMEOUT
    assert start_timeout({"MPICNN_START_TIMEOUT": "90"}) == 90.0
    assert start_timeout({"MPICNN_START_TIMEOUT": "0"}) == 0.0
    assert start_timeout({"MPICNN_START_TIMEOUT": "soon"}) == DEFAULT_START_TIMEOUT


def test_fnv1a_is_the_hash_mpich_names_a_slurm_step_with():
    # /dev/shm/mpich_shm_ccb66491_0 was made by MPICH 5.0.2 for SLURM step 23255003.0
    assert fnv1a("23255003.0") == 0xCCB66491
    assert fnv1a("") == 0x811C9DC5


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason=f"no {SHM_DIR} here")
def test_leftover_shared_memory_of_this_step_is_named_by_the_first_rank_of_its_node():
    job = str(random.randrange(10**7, 6 * 10**7))
    key = f"{fnv1a(f'{job}.0'):x}"
    old, fresh = SHM_DIR / f"mpich_shm_{key}_1", SHM_DIR / f"mpich_shm_{key}_0"
    other = SHM_DIR / f"mpich_shm_{fnv1a(f'{job}.1'):x}_1"      # another step's: not ours
    try:
        for path in (old, fresh, other):
            path.touch()
        before = process_start() - 60          # a file of an earlier run predates this process
        for path in (old, other):
            os.utime(path, (before, before))
        slurm = {"SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_PROCID": "5"}
        line = StartWatch(60.0, env={**slurm, "SLURM_LOCALID": "0"}).error_line()
        assert str(old) in line and str(fresh) not in line and str(other) not in line, line
        assert f"SLURM step {job}.0" in line and "remove it" in line
        assert StartWatch(60.0, env={**slurm, "SLURM_LOCALID": "1"}).error_line() == ""
        rank0 = StartWatch(60.0, env={**slurm, "SLURM_PROCID": "0", "SLURM_STEP_ID": "2"})
        assert "a rank that never started" in rank0.error_line()
    finally:
        for path in (old, fresh, other):
            path.unlink(missing_ok=True)
