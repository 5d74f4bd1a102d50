"""Stop signals, the all-rank stop agreement, per-job defaults; and the path under mpirun."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from conftest import mpirun, read_jsonl
from drill import Job, file_contains, rank_pids

from mpicnn.checkpoint.state import RunState
from mpicnn.cluster.batchjob import BatchJob, batch_job, job_defaults
from mpicnn.cluster.errors import MpicnnError
from mpicnn.config import parse_config
from mpicnn.observe.records import check_record
from mpicnn.resilience.preemption import PREEMPTED_EXIT, Preemption, StopSignals


# --- which job are we in -----------------------------------------------------------
@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "812", "SLURM_JOB_NAME": "mpicnn"}, BatchJob("slurm", "812", "mpicnn")),
    ({"SLURM_JOB_ID": "812", "SLURM_RESTART_COUNT": "2"}, BatchJob("slurm", "812", "", 2)),
    ({"SLURM_JOB_ID": "815", "SLURM_ARRAY_JOB_ID": "812", "SLURM_ARRAY_TASK_ID": "3",
      "SLURM_JOB_NAME": "sweep"}, BatchJob("slurm", "812_3", "sweep")),
    ({"PBS_JOBID": "4242.pbs01.site", "PBS_JOBNAME": "mpicnn"},
     BatchJob("pbs", "4242", "mpicnn")),
    ({"PBS_JOBID": "4242[7].pbs01", "PBS_ARRAY_INDEX": "7"}, BatchJob("pbs", "4242_7")),
])
def test_batch_job_from_the_launcher_environment(env, expected):
    assert batch_job(env) == expected


def test_job_defaults_give_each_job_its_directory_and_resume_only_after_a_requeue():
    assert job_defaults(None) == {}
    first = job_defaults(BatchJob("slurm", "812_3", "my sweep/1"))
    assert first == {"checkpoint_dir": "runs/my_sweep_1-812_3",
                     "metrics": "runs/my_sweep_1-812_3/metrics.jsonl"}
    again = job_defaults(BatchJob("slurm", "812", "", restarts=1))
    assert again["resume"] == "auto" and again["checkpoint_dir"] == "runs/slurm-812"
    # They are defaults: a flag wins, and an empty directory means no checkpoints.
    cfg = parse_config(["--checkpoint-dir", "/scratch/x"], defaults=again)
    assert (cfg.output.checkpoint_dir, cfg.output.resume, cfg.output.metrics) == \
        ("/scratch/x", "auto", "runs/slurm-812/metrics.jsonl")
    assert parse_config(["--checkpoint-dir", ""], defaults=first).output.checkpoint_dir == ""
    with pytest.raises(MpicnnError, match="--stop-check-every must not be negative"):
        parse_config(["--stop-check-every", "-1"])


# --- signals and the agreement -----------------------------------------------------
def test_stop_signals_record_the_first_signal_and_restore_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)                      # handlers run between bytecodes
        assert signals.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_second_ctrl_c_interrupts_at_once():
    signals = StopSignals()
    signals.handle(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        signals.handle(signal.SIGINT)


def test_preemption_asks_every_n_steps_and_stops_when_any_rank_wants_to():
    asked = []

    def agree(wanted, step):                  # stands in for the allreduce over ranks
        asked.append((wanted, step))
        return wanted or len(asked) == 4      # "another rank" saw a signal at the 4th check

    preempt = Preemption(check_every=3, agree=agree)
    state = RunState()
    stops = []
    for step in range(1, 14):
        state.global_step = step
        stops.append(preempt.should_stop(state))
    assert asked == [(False, 3), (False, 6), (False, 9), (False, 12)]    # checked steps only
    assert stops.index(True) == 11 and preempt.stopped
    assert preempt.reason == "a signal to another rank"
    off = Preemption(check_every=0, agree=agree)
    off.signals.received = signal.SIGTERM
    assert not off.should_stop(state)


# --- the whole path under mpirun, no scheduler -------------------------------------
PIPELINE = ["--mode", "pipeline", "--stages", "2", "--micro-batches", "2"]


@pytest.mark.mpi
@pytest.mark.parametrize("mode", [[], PIPELINE], ids=["allreduce", "pipeline"])
def test_signal_to_one_rank_stops_all_at_one_step_and_resume_matches(tmp_path, mode):
    """SIGTERM to a single rank: every rank stops after the same step (or the run would
    hang), rank 0 checkpoints, exit 75; --resume auto then ends bitwise equal.

    The prefetch reader processes get SIGUSR1 too, as when SLURM signals every process
    of a job step: they must leave the stopping to the trainer."""
    args = ["--epochs", "2", "--deterministic", "--device", "cpu", "--progress", "off", *mode]
    run_dir, metrics = tmp_path / "stopped", tmp_path / "stopped" / "metrics.jsonl"
    with Job(2, [*args, "--checkpoint-dir", run_dir, "--metrics", metrics,
                 "--prefetch-mode", "process"]) as job:
        job.wait_until(lambda: file_contains(metrics, '"epoch"'), 240, "an epoch record")
        processes = job.processes()
        ranks = rank_pids(processes)
        readers = [pid for pid, p in processes.items() if "-m mpicnn.data.prefetch" in p.command]
        assert len(ranks) == 2 and readers, processes
        for reader in readers:
            os.kill(reader, signal.SIGUSR1)
        os.kill(ranks[1], signal.SIGTERM)                # one rank only, not the launcher
        outcome = job.finish(timeout=120)
    out = outcome.output
    assert outcome.returncode == PREEMPTED_EXIT, out
    stopped = read_jsonl(metrics)[-1]
    assert stopped["event"] == "stopped" and stopped["exit_code"] == PREEMPTED_EXIT
    assert check_record(stopped) == []
    assert stopped["signal"] in ("SIGTERM", "a signal to another rank")
    step = stopped["step"]
    assert (run_dir / f"checkpoint-{step:08d}.pt").exists()
    assert out.count("mpicnn: stopped by") == 1                      # rank 0 reports once

    resumed = mpirun(2, [*args, "--checkpoint-dir", run_dir, "--metrics", metrics,
                         "--resume", "auto"])
    assert f"checkpoint-{step:08d}.pt at epoch {stopped['epoch']}, step {step}" in resumed.stdout
    mpirun(2, [*args, "--checkpoint-dir", tmp_path / "plain"])
    ours = torch.load(run_dir / "final.pt", weights_only=True)["model"]
    plain = torch.load(tmp_path / "plain" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(ours[k], plain[k]) for k in plain)
