"""The job scripts in jobs/, submitted to a real SLURM on localhost and run under a simulated PBS.

The SLURM cluster (munged, slurmctld, slurmd; see slurm_cluster.py) is started once for
this module and stopped at its end. Jobs are submitted from a temporary directory, so
their logs and runs/<job>/ directories land there.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, job_env, read_jsonl, slurm_tier
from slurm_cluster import LocalSlurm, running_slurm

from mpicnn.cluster.startup import SHM_DIR, fnv1a
from mpicnn.config import FIELDS

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

JOBS = ROOT / "jobs"
SCRIPTS = sorted(JOBS.glob("slurm/*.sbatch")) + sorted(JOBS.glob("pbs/*.pbs"))
# One short deterministic CPU training, the same for the plain run and the preemption drill.
TRAIN_ARGS = ["--epochs", "6", "--deterministic", "--device", "cpu", "--progress", "off"]
SMALL_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15"]
PREEMPTED_EXIT = 75
JOB_TIMEOUT = 420


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_tier(), running_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def submit(cluster: LocalSlurm, where: Path, script: str, sbatch_args=(), train_args=(),
           **env) -> str:
    """sbatch a script of jobs/slurm from ``where``, with this checkout and this Python."""
    where.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch(*SMALL_JOB, *sbatch_args, JOBS / "slurm" / script, *train_args,
                          cwd=where, env=job_env({"MPICNN_DIR": str(ROOT),
                                                  "PYTHON": sys.executable, **env}))


def finished(cluster: LocalSlurm, job_id: str) -> dict:
    records = cluster.wait(job_id, JOB_TIMEOUT)
    assert len(records) == 1, records
    return records[0]


def job_log(where: Path, name: str) -> str:
    path = where / name
    return path.read_text() if path.exists() else f"(no log {path})"


def params(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    """train.sbatch through srun (pmi2), start to end: (job id, submit dir, seconds)."""
    where = tmp_path_factory.mktemp("plain")
    start = time.monotonic()
    job_id = submit(slurm, where, "train.sbatch", train_args=TRAIN_ARGS, LAUNCHER="srun")
    record = finished(slurm, job_id)
    log = job_log(where, f"mpicnn-{job_id}.out")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, log)
    return job_id, where, time.monotonic() - start


def test_train_sbatch_completes_and_reaches_accuracy(uninterrupted):
    job_id, where, seconds = uninterrupted
    log = job_log(where, f"mpicnn-{job_id}.out")
    run_dir = where / "runs" / f"mpicnn-{job_id}"          # the per-job default
    records = read_jsonl(run_dir / "metrics.jsonl")
    end = records[-1]
    assert end["event"] == "end" and end["world_size"] == 2 and end["epochs"] == 6, end
    assert end["val_acc"] >= 0.97, end
    assert (run_dir / "final.pt").exists() and (run_dir / "config.toml").exists()
    assert f"SLURM job {job_id} (mpicnn)" in log             # the startup line names the job
    assert "running: srun --mpi=pmi2" in log and "mpicnn: error" not in log
    print(f"\ntrain.sbatch job {job_id}: {seconds:.0f} s, val acc {end['val_acc']:.4f}")


def test_preemption_drill_requeues_and_matches_uninterrupted_run(slurm, uninterrupted, tmp_path):
    """USR1 to the batch shell mid-run: checkpoint, requeue, resume, same final parameters."""
    reference_id, reference_dir, _ = uninterrupted
    job_id = submit(slurm, tmp_path, "train.sbatch", train_args=TRAIN_ARGS, LAUNCHER="mpirun")
    run_dir = tmp_path / "runs" / f"mpicnn-{job_id}"
    metrics = run_dir / "metrics.jsonl"
    # Mid-run: after the first epoch's record, with five epochs still to go.
    slurm.wait_for(lambda: metrics.exists() and '"epoch"' in metrics.read_text(),
                   JOB_TIMEOUT, "the first epoch record", job_id)
    slurm.command("scancel", "--signal=USR1", "--batch", job_id)
    record = finished(slurm, job_id)
    log = job_log(tmp_path, f"mpicnn-{job_id}.out")
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", (record, log)

    events = read_jsonl(metrics)
    stopped = [r for r in events if r["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGUSR1", events
    step = stopped[0]["step"]
    assert 44 <= step < 264 and stopped[0]["exit_code"] == PREEMPTED_EXIT
    # (--keep-checkpoints may prune it later in the run: its use shows it was there)
    checkpoint = Path("runs") / f"mpicnn-{job_id}" / f"checkpoint-{step:08d}.pt"
    assert f"stopped by SIGUSR1 after step {step} " in log
    assert f"checkpoint {checkpoint}; exit 75" in log
    assert f"requeueing job {job_id} (restart 1 of at most 3)" in log
    assert f"resumed from {checkpoint} at epoch {stopped[0]['epoch']}, step {step}" in log
    assert events[-1]["event"] == "end" and events[-1]["steps"] == 264

    ours = params(run_dir / "final.pt")
    reference = params(reference_dir / "runs" / f"mpicnn-{reference_id}" / "final.pt")
    difference = max((ours[k] - reference[k]).abs().max().item() for k in reference)
    assert all(torch.equal(ours[k], reference[k]) for k in reference), difference
    print(f"\ndrill job {job_id}: stopped at step {step} (epoch {stopped[0]['epoch']}, "
          f"step {stopped[0]['step_in_epoch']} in it), requeued once, max |difference| "
          f"{difference}")


def test_requeue_limit_ends_the_job_with_status_75(slurm, tmp_path):
    job_id = submit(slurm, tmp_path, "train.sbatch", MAX_REQUEUES="0", LAUNCHER="srun",
                    train_args=["--epochs", "50", "--device", "cpu", "--progress", "off"])
    metrics = tmp_path / "runs" / f"mpicnn-{job_id}" / "metrics.jsonl"
    slurm.wait_for(lambda: metrics.exists() and '"epoch"' in metrics.read_text(),
                   JOB_TIMEOUT, "the first epoch record", job_id)
    slurm.command("scancel", "--signal=USR1", "--batch", job_id)
    record = finished(slurm, job_id)
    log = job_log(tmp_path, f"mpicnn-{job_id}.out")
    assert record["JobState"] == "FAILED" and record["ExitCode"] == f"{PREEMPTED_EXIT}:0", \
        (record, log)
    assert record["Restarts"] == "0" and "not requeueing again" in log
    step = read_jsonl(metrics)[-1]["step"]
    assert (metrics.parent / f"checkpoint-{step:08d}.pt").exists()


def test_a_rank_killed_under_srun_is_relaunched_in_the_allocation(slurm, tmp_path):
    """kill -9 of one rank under srun: the job script's supervisor relaunches the step with
    --resume auto, the job completes, and the restart is in the metrics and the log."""
    job_id = submit(slurm, tmp_path, "train.sbatch", LAUNCHER="srun", RESTART_BACKOFF="0",
                    CRASH_AFTER="60", CRASH_STAMP=str(tmp_path / "crashed"),
                    DRILL_MODEL="digitnet",
                    train_args=["--epochs", "3", "--model", "tests.custom_model:Drill",
                                "--device", "cpu", "--progress", "off"])
    record = finished(slurm, job_id)
    log = job_log(tmp_path, f"mpicnn-{job_id}.out")
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "0", (record, log)
    assert (tmp_path / "crashed").exists(), log
    assert "after a crash: up to 3 restart(s)" in log
    assert "mpicnn: run: launch 1 ended with" in log and "restart 1 of at most 3" in log, log
    events = read_jsonl(tmp_path / "runs" / f"mpicnn-{job_id}" / "metrics.jsonl")
    restarts = [r for r in events if r["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["rank"] == 1, restarts
    assert events[-1]["event"] == "end" and events[-1]["epochs"] == 3
    assert "resumed from runs/" in log


def test_shared_memory_a_crashed_run_left_ends_the_launch_and_a_new_step_trains(slurm,
                                                                                   tmp_path):
    """MPICH's shared memory for step <job>.0 already there (as a crashed earlier run of a
    requeued job leaves it): MPI_Init would wait forever. The start watch ends the launch
    with one line naming the file, and the supervisor's relaunch (step 1) trains."""
    job_id = submit(slurm, tmp_path, "train.sbatch", ["--hold"], LAUNCHER="srun",
                    RESTART_BACKOFF="0", MPICNN_START_TIMEOUT="20",
                    train_args=["--epochs", "1", "--device", "cpu", "--progress", "off"])
    leftover = SHM_DIR / f"mpich_shm_{fnv1a(f'{job_id}.0'):x}_0"
    leftover.touch()
    os.utime(leftover, (time.time() - 600, time.time() - 600))
    try:
        slurm.command("scontrol", "release", job_id)
        record = finished(slurm, job_id)
    finally:
        leftover.unlink(missing_ok=True)
    log = job_log(tmp_path, f"mpicnn-{job_id}.out")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, log)
    stuck = [line for line in log.splitlines()
             if line.startswith("mpicnn: error: MPI did not start within 20 s")]
    assert len(stuck) == 1 and str(leftover) in stuck[0], log
    assert "launch 1 ended with" in log and "restart 1 of at most 3" in log, log
    end = read_jsonl(tmp_path / "runs" / f"mpicnn-{job_id}" / "metrics.jsonl")[-1]
    assert end["event"] == "end" and end["epochs"] == 1, end


def test_sweep_array_runs_every_task_in_its_own_directory(slurm, tmp_path):
    lrs = ["0.001", "0.004"]
    # One rank per task: the array mechanics are what this checks.
    job_id = submit(slurm, tmp_path, "sweep.sbatch", ["--array=0-2", "--ntasks-per-node=1"],
                    SWEEP_LRS=" ".join(lrs),
                    train_args=["--max-steps", "20", "--device", "cpu", "--progress", "off"])
    records = {int(r["ArrayTaskId"]): r for r in slurm.wait(job_id, JOB_TIMEOUT)}
    assert sorted(records) == [0, 1, 2], records
    for task, lr in enumerate(lrs):
        log = job_log(tmp_path, f"mpicnn-sweep-{job_id}_{task}.out")
        assert records[task]["JobState"] == "COMPLETED", (records[task], log)
        events = read_jsonl(tmp_path / "runs" / f"mpicnn-sweep-{job_id}_{task}" / "metrics.jsonl")
        assert events[0]["lr"] == float(lr) and events[0]["mode"] == "allreduce"
        assert events[-1]["event"] == "end" and events[-1]["steps"] == 20
        assert (tmp_path / "runs" / f"mpicnn-sweep-{job_id}_{task}" / "final.pt").exists()
    # Task 2 lies beyond the 2 x 1 sweep points: it says so and fails.
    assert records[2]["JobState"] == "FAILED" and records[2]["ExitCode"] == "2:0"
    assert "submit with --array=0-1" in job_log(tmp_path, f"mpicnn-sweep-{job_id}_2.out")


@pytest.mark.skipif("ps-sync" not in (FIELDS["mode"][1].metadata["choices"] or []),
                    reason="parameter-server modes are not in this build")
def test_train_ps_sbatch_runs_a_parameter_server_job(slurm, tmp_path):
    job_id = submit(slurm, tmp_path, "train_ps.sbatch", ["--ntasks-per-node=3"], SERVERS="1",
                    train_args=["--max-steps", "20", "--device", "cpu", "--progress", "off"])
    record = finished(slurm, job_id)
    log = job_log(tmp_path, f"mpicnn-ps-{job_id}.out")
    assert record["JobState"] == "COMPLETED", (record, log)
    end = read_jsonl(tmp_path / "runs" / f"mpicnn-ps-{job_id}" / "metrics.jsonl")[-1]
    assert end["event"] == "end" and end["mode"] == "ps-sync" and end["steps"] == 20


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_job_scripts_parse_and_document_themselves(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    header = text.split("\n#SBATCH")[0].split("\n#PBS")[0]
    assert text.startswith("#!/bin/bash\n# mpicnn on ") and len(header.splitlines()) > 10
    assert '"$@"' in text and "PYTHON" in text


def test_pbs_script_under_a_simulated_pbs_job(tmp_path):
    """qsub's environment by hand: SIGTERM checkpoints (exit 75); the rerun resumes."""
    nodefile = tmp_path / "nodes"
    nodefile.write_text("localhost\nlocalhost\n")           # 2 ranks (mpiprocs) on one node
    env = job_env({"PBS_JOBID": "4242.pbs-server", "PBS_JOBNAME": "mpicnn",
                   "PBS_O_WORKDIR": str(tmp_path), "PBS_NODEFILE": str(nodefile),
                   "MPICNN_DIR": str(ROOT), "PYTHON": sys.executable, "MPIEXEC": "mpirun"})
    for name in [k for k in env if k.startswith("SLURM_")]:
        del env[name]
    command = ["bash", str(JOBS / "pbs" / "train.pbs"), "--epochs", "3", "--deterministic",
               "--device", "cpu", "--progress", "off"]
    run_dir = tmp_path / "runs" / "mpicnn-4242"
    metrics = run_dir / "metrics.jsonl"

    first = subprocess.Popen(command, cwd="/", env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (metrics.exists() and '"epoch"' in metrics.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)                  # qdel / preemption: the shell
        out, _ = first.communicate(timeout=JOB_TIMEOUT)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == PREEMPTED_EXIT, out
    assert "PBS job 4242.pbs-server: 2 ranks on 1 node(s)" in out
    assert "PBS job 4242 (mpicnn)" in out and "stopped by SIGTERM" in out
    step = read_jsonl(metrics)[-1]["step"]
    assert (run_dir / f"checkpoint-{step:08d}.pt").exists()

    rerun = subprocess.run(command, cwd="/", env=env, capture_output=True, text=True,
                           timeout=JOB_TIMEOUT)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"checkpoint-{step:08d}.pt at epoch" in rerun.stdout
    assert read_jsonl(metrics)[-1]["event"] == "end" and (run_dir / "final.pt").exists()
