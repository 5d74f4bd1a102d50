"""Restart supervision (python -m mpicnn.run): causes, command lines, and real crash drills."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from conftest import DIGITS, ROOT, job_env, mpirun, mpirun_command, read_jsonl
from drill import small_digits

from mpicnn.checkpoint import files as checkpoint
from mpicnn.observe.records import check_record
from mpicnn.resilience.crash import Cause, find_cause, read_ranks
from mpicnn.resilience.supervisor import (
    Policy,
    option_value,
    srun_excluding,
    tasks_per_node,
    with_resume,
)

HYDRA = """
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 4604 RUNNING AT n02
=   EXIT CODE: 9
===================================================================================
YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)
"""


# --- what ended a launch ------------------------------------------------------------------

def test_causes_from_each_launcher():
    hydra = find_cause(9, HYDRA.splitlines(), read_ranks("0 4603 n01\n1 4604 n02\nbad line\n"))
    assert (hydra.rank, hydra.node, hydra.pid, hydra.signal) == (1, "n02", 4604, 9)
    assert hydra.describe() == "exit 9: rank 1 (pid 4604) on n02 killed by SIGKILL"
    noticed = ("mpirun noticed that process rank 3 with PID 77 on node c5 exited on signal 9 "
               "(Killed).")
    openmpi = find_cause(137, [noticed])
    assert (openmpi.rank, openmpi.node, openmpi.signal) == (3, "c5", 9)
    srun = find_cause(137, ["srun: error: n07: task 5: Killed"])
    assert (srun.rank, srun.node, srun.signal) == (5, "n07", signal.SIGKILL)
    victims_first = find_cause(1, ["srun: error: n01: task 0: Exited with exit code 143",
                                   "srun: error: n01: tasks 1-3: Terminated",
                                   "srun: error: n02: task 6: Exited with exit code 1"])
    assert (victims_first.rank, victims_first.node) == (6, "n02")
    only_victims = find_cause(143, ["srun: error: n01: task 0: Exited with exit code 143"])
    assert (only_victims.rank, only_victims.node) == (None, None)       # no node to blame
    ours = find_cause(1, ["noise", "mpicnn: error: rank 2: ValueError: boom (rerun with ...)"])
    assert ours.rank == 2 and ours.message.startswith("mpicnn: error: rank 2: ValueError")
    assert Cause(-9).describe() == "killed by SIGKILL"
    assert Cause(1).fields() == {"exit_code": 1, "rank": -1, "node": "", "signal": 0,
                                 "cause": "exit 1"}


# --- the command line -------------------------------------------------------------------

def test_restarts_resume_auto_and_srun_can_leave_a_node_out():
    cmd = ["srun", "--mpi=pmi2", "python", "-m", "mpicnn.train", "--resume", "x.pt",
           "--metrics=m.jsonl", "--checkpoint-dir", "ck"]
    assert with_resume(cmd) == [*cmd[:5], "--metrics=m.jsonl", "--checkpoint-dir", "ck",
                                "--resume", "auto"]
    assert with_resume(with_resume(cmd)) == with_resume(cmd)
    assert option_value(cmd, "--metrics") == "m.jsonl" and option_value(cmd, "--x") is None
    assert srun_excluding(cmd, {"n2"}, ["n1", "n2", "n3"], 4) == [
        "srun", "--exclude=n2", "--nodes=2", "--ntasks=8", *cmd[1:]]
    assert srun_excluding(cmd, {"n1"}, ["n1"], 4) is None               # no node left
    assert srun_excluding(["mpirun", "-n", "8"], {"n1"}, ["n1", "n2"], 4) is None
    assert tasks_per_node({"SLURM_TASKS_PER_NODE": "4(x2)"}) == 4
    assert tasks_per_node({"SLURM_NTASKS_PER_NODE": "3"}) == 3
    assert tasks_per_node({"SLURM_TASKS_PER_NODE": "4,3"}) is None
    assert [Policy(backoff=5, backoff_max=12).wait(k) for k in (1, 2, 3)] == [5, 10, 12]


# --- drills under mpirun ----------------------------------------------------------------

def supervise(args, timeout: float = 600, env: dict | None = None):
    """``python -m mpicnn.run ARGS`` (whose command is ``mpirun ... python -m mpicnn.train``)."""
    return subprocess.run([sys.executable, "-m", "mpicnn.run", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=job_env(env), check=False)


def train_command(n: int, args) -> list[str]:
    return mpirun_command(n, [str(a) for a in args])


@pytest.mark.mpi
def test_a_rank_killed_mid_run_is_restarted_and_finishes_like_a_resume_by_hand(tmp_path):
    """kill -9 of rank 1 in epoch 3 under the supervisor: the run restarts from the epoch-2
    checkpoint and ends within 0.5 accuracy points of an uninterrupted run, with the
    parameters of a run resumed by hand from the same checkpoint (deterministic CPU)."""
    common = ["--data", DIGITS, "--model", "tests.custom_model:Drill", "--epochs", 4,
              "--deterministic", "--progress", "off", "--keep-checkpoints", 0]
    env = {"DRILL_MODEL": "digitnet"}
    plain = tmp_path / "plain.jsonl"
    mpirun(2, [*common, "--metrics", plain], env=env)
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "run.jsonl"
    crash = {**env, "CRASH_AFTER": "100", "CRASH_STAMP": str(tmp_path / "crashed")}
    run = supervise(["--max-restarts", 2, "--backoff", 0, "--",
                     *train_command(2, [*common, "--checkpoint-dir", ckpt,
                                        "--metrics", metrics])], env=crash)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "crashed").exists()
    assert "mpicnn: run: launch 1 ended with exit 9: rank 1" in run.stdout
    assert "killed by SIGKILL; restart 1 of at most 2" in run.stdout
    assert "mpicnn: run: finished after 1 restart(s)" in run.stdout
    records = read_jsonl(metrics)
    restarts = [r for r in records if r["event"] == "restart"]
    assert len(restarts) == 1 and check_record(restarts[0]) == []
    assert restarts[0]["rank"] == 1 and restarts[0]["signal"] == 9
    resumed_from = checkpoint.checkpoint_name(88)          # 44 steps an epoch: after epoch 2
    assert f"resumed from {ckpt / resumed_from}" in run.stdout
    ours, theirs = records[-1], read_jsonl(plain)[-1]
    assert ours["event"] == theirs["event"] == "end"
    assert abs(ours["val_acc"] - theirs["val_acc"]) <= 0.005

    by_hand = tmp_path / "by_hand"
    mpirun(2, [*common, "--checkpoint-dir", by_hand, "--resume", ckpt / resumed_from],
           env=env)
    supervised = torch.load(ckpt / checkpoint.FINAL, weights_only=True)["model"]
    manual = torch.load(by_hand / checkpoint.FINAL, weights_only=True)["model"]
    assert all(torch.equal(supervised[k], manual[k]) for k in manual)


@pytest.mark.mpi
def test_a_crash_loop_gives_up_after_the_budget_and_bad_input_is_not_retried(tmp_path):
    data = small_digits(tmp_path / "d.h5", train=64, val=32)
    common = ["--data", data, "--model", "tests.custom_model:Drill", "--epochs", 2,
              "--progress", "off", "--checkpoint-dir", tmp_path / "ckpt",
              "--metrics", tmp_path / "m.jsonl"]
    loop = supervise(["--max-restarts", 2, "--backoff", 0, "--",
                      *train_command(2, common)], env={"CRASH_AFTER": "2"}, timeout=400)
    assert loop.returncode == 9, loop.stdout[-3000:] + loop.stderr[-3000:]
    assert loop.stdout.count("mpicnn: run: launch ") == 3 + 2     # 3 launches, 2 "ended"
    last = loop.stderr.strip().splitlines()[-1]
    assert last.startswith("mpicnn: error: gave up after 2 restart(s) (--max-restarts 2): "
                           "the last launch ended with exit 9: rank 1"), last
    assert [r["restart"] for r in read_jsonl(tmp_path / "m.jsonl")
            if r["event"] == "restart"] == [1, 2]

    bad = supervise(["--backoff", 0, "--", *train_command(2, [*common, "--epochz", 2])],
                    timeout=200)
    assert bad.returncode == 2 and bad.stdout.count("mpicnn: run: launch ") == 1
    assert bad.stderr.count("mpicnn: error:") == 1 and "did you mean --epochs" in bad.stderr
    assert "not restarting: exit 2 is bad input" in bad.stdout
