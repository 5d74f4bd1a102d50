"""Failure drills on real MPI jobs: killed ranks, stalls, NaN losses, killed checkpoint writes."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_jsonl
from drill import (
    Job,
    assert_one_clean_error,
    digits_arrays,
    flip_tensor_byte,
    kill_during_a_write,
    record,
    run_job,
    small_digits,
    write_h5,
)

from mpicnn.checkpoint import files as checkpoint
from mpicnn.config import FIELDS
from mpicnn.data.loader import Loader
from mpicnn.data.schema import NAN_SAMPLE, open_dataset

pytestmark = pytest.mark.mpi
HANG = 180                     # seconds after which a drill counts as a hang (loaded CI)


def needs_mode(mode: str) -> None:
    if mode not in (FIELDS["mode"][1].metadata["choices"] or ()):
        pytest.skip(f"--mode {mode} is not available yet")


# --- a rank killed with SIGKILL ends the job -----------------------------------------

# (mode, ranks, extra flags, rank to kill). PS servers are the last ranks: the ps-sync
# row kills the server, the ps-async row a worker.
KILLS = [
    ("allreduce", 2, [], 1),
    ("allreduce", 3, [], 0),
    ("ps-sync", 3, ["--servers", "1"], 2),
    ("ps-async", 3, ["--servers", "1"], 1),
]


@pytest.mark.parametrize("mode,n,extra,victim", KILLS,
                         ids=[f"{m}-n{n}-kill{v}" for m, n, _, v in KILLS])
def test_sigkill_of_one_rank_ends_the_job(mode, n, extra, victim, tmp_path):
    needs_mode(mode)
    job = Job(n, ["--data", small_digits(tmp_path / "d.h5"), "--mode", mode, *extra,
                  "--epochs", "1000", "--progress", "off"])
    job.wait_for("steps/epoch", timeout=HANG)
    time.sleep(1.0)                                  # let training get going
    os.kill(job.rank_pid(victim), signal.SIGKILL)
    outcome = job.finish(timeout=HANG, since=time.monotonic())
    record(f"kill/{mode} n={n} rank {victim}", outcome)
    assert outcome.returncode != 0
    assert not outcome.survivors, f"processes left: {outcome.survivors}"


# --- stall detection -------------------------------------------------------------------

PIPELINE_2X1 = ["--mode", "pipeline", "--stages", "2", "--micro-batches", "2"]


def stall_warning(tmp_path, flags, sleep: str, what: str) -> str:
    """Run 2 ranks for 5 steps with ``MPICNN_TEST_SLEEP=sleep`` (a stall 6 x --stall-warn
    long); the last warning about the stalled step.

    On a loaded machine other steps may wait past the 1 s threshold too and be warned
    about: only the stalled step's warnings are the drill's, and its last one is written
    when the missing rank's heartbeats have long shown where it is.
    """
    step = int(sleep.split(":")[1])
    outcome = run_job(2, ["--data", small_digits(tmp_path / "d.h5"), "--max-steps", "5",
                          *flags, "--stall-warn", "1", "--progress", "off"],
                      env={"MPICNN_TEST_SLEEP": sleep})
    record(f"stall/warn {what}", outcome)
    assert outcome.returncode == 0, outcome.output[-3000:]
    warnings = [line for line in outcome.stdout.splitlines()
                if "stall:" in line and f"exchange of step {step}" in line]
    assert warnings, outcome.stdout
    return warnings[-1]


def test_stall_warning_names_the_missing_rank(tmp_path):
    warning = stall_warning(tmp_path, [], "1:3:6", "(rank 1 sleeps 6 s before step 3)")
    assert "rank 0 has waited" in warning
    assert "gradient exchange of step 3; missing: rank 1 (computing step 3" in warning


@pytest.mark.parametrize("sleep,where", [
    ("1:3:6", "the gradient exchange of step 3"),
    # stage 0 waits inside the step for the gradients stage 1 owes it
    ("1:3:6:forward", "the pipeline exchange of step 3"),
])
def test_stall_warning_names_the_stuck_pipeline_stage(tmp_path, sleep, where):
    needs_mode("pipeline")
    warning = stall_warning(tmp_path, PIPELINE_2X1, sleep,
                            f"pipeline (stage 1 sleeps 6 s: {sleep})")
    assert "rank 0 (stage 0 of 2, replica 0) has waited" in warning
    assert f"at {where}" in warning, warning
    assert "missing: rank 1 (stage 1 of 2, replica 0; computing step 3" in warning


def test_stall_abort_ends_the_job(tmp_path):
    outcome = run_job(3, ["--data", small_digits(tmp_path / "d.h5"), "--max-steps", "6",
                          "--stall-warn", "1", "--stall-abort", "4", "--progress", "off"],
                      env={"MPICNN_TEST_SLEEP": "0:2:600"}, timeout=HANG)
    record("stall/abort (rank 0 sleeps before step 2, --stall-abort 4)", outcome)
    line = assert_one_clean_error(outcome, "stall: ranks 1-2 have waited")
    assert "gradient exchange of step 2; missing: rank 0 (computing step 2" in line
    assert "--stall-abort 4" in line


# --- NaN policy ---------------------------------------------------------------------------

BATCH = 16


@pytest.fixture(scope="module")
def nan_data(tmp_path_factory):
    """Float digits with one NaN pixel in a row the sampled NaN check does not read.

    Returns (file, 1-based step whose global batch holds that row at --batch-size 16 x 2).
    """
    xt, yt, xv, yv = digits_arrays()
    train = (xt[:600] / 255.0).astype(np.float32)
    sampled = set(np.linspace(0, len(train) - 1, min(NAN_SAMPLE, len(train))).astype(int))
    row = next(r for r in range(len(train)) if r not in sampled)
    train[row, 0, 3, 3] = np.nan
    path = write_h5(tmp_path_factory.mktemp("nan") / "nan.h5",
                    {"train": {"images": train, "labels": yt[:600]},
                     "val": {"images": (xv[:64] / 255.0).astype(np.float32),
                             "labels": yv[:64]}})
    data = open_dataset(str(path))                   # validation passes: the NaN is unseen
    loader = Loader(data, data.train, torch.device("cpu"), BATCH * 2)   # the run's read order
    step = next(s for s, rows in enumerate(loader.plan(0)) if row in rows) + 1
    loader.close()
    data.close()
    return path, step


def test_nan_abort_names_step_and_lr(nan_data, tmp_path):
    path, step = nan_data
    outcome = run_job(2, ["--data", path, "--max-steps", step + 2, "--batch-size", BATCH,
                          "--progress", "off"], timeout=HANG)
    record(f"nan/abort (NaN pixel read at step {step})", outcome)
    line = assert_one_clean_error(outcome, f"non-finite loss or gradient at step {step} (lr ")
    assert "--nan-policy skip" in line


def final_params(directory: Path) -> dict:
    return checkpoint.load(directory / "final.pt")["model"]


def test_nan_skip_is_the_same_on_every_rank(nan_data, tmp_path):
    """Two ranks skip exactly the step a single rank skips: same final parameters."""
    path, step = nan_data
    common = ["--data", path, "--max-steps", step + 3, "--nan-policy", "skip",
              "--optimizer", "sgd", "--lr", "0.05", "--progress", "off"]
    two = run_job(2, common + ["--batch-size", BATCH, "--checkpoint-dir", tmp_path / "two",
                               "--metrics", tmp_path / "two.jsonl"], timeout=HANG)
    record(f"nan/skip n=2 (NaN pixel read at step {step})", two)
    assert two.returncode == 0, two.output[-3000:]
    assert f"non-finite loss or gradient at step {step} (lr" in two.stdout
    assert "update skipped (1 so far)" in two.stdout
    one = run_job(1, common + ["--batch-size", 2 * BATCH, "--checkpoint-dir", tmp_path / "one"],
                  timeout=HANG)
    assert one.returncode == 0, one.output[-3000:]
    a, b = final_params(tmp_path / "two"), final_params(tmp_path / "one")
    for name in a:
        assert torch.isfinite(a[name]).all(), name
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    epochs = [r for r in _records(tmp_path / "two.jsonl") if r["event"] == "epoch"]
    assert all(np.isfinite(r["train_loss"]) for r in epochs)


def test_nan_skip_in_a_pipeline_is_the_same_on_every_stage(nan_data, tmp_path):
    """A NaN seen by the last stage only skips the update on both stages: the same final
    parameters as one process that skips that step."""
    needs_mode("pipeline")
    path, step = nan_data
    common = ["--data", path, "--max-steps", step + 3, "--nan-policy", "skip",
              "--optimizer", "sgd", "--lr", "0.05", "--progress", "off",
              "--batch-size", 2 * BATCH]
    pipe = run_job(2, common + ["--mode", "pipeline", "--stages", "2", "--micro-batches", "4",
                                "--checkpoint-dir", tmp_path / "pipe"], timeout=HANG)
    record(f"nan/skip pipeline 2x1 (NaN pixel read at step {step})", pipe)
    assert pipe.returncode == 0, pipe.output[-3000:]
    assert "update skipped (1 so far)" in pipe.stdout
    one = run_job(1, common + ["--checkpoint-dir", tmp_path / "one"], timeout=HANG)
    assert one.returncode == 0, one.output[-3000:]
    a, b = final_params(tmp_path / "pipe"), final_params(tmp_path / "one")
    for name in a:
        assert torch.isfinite(a[name]).all(), name
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def _records(path):
    return read_jsonl(path)


# --- checkpoints survive a kill in the middle of a write ----------------------------------

def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    """SIGKILL rank 0 while it writes a checkpoint; the older ones stay whole and resumable."""
    killed = kill_during_a_write(tmp_path, timeout=HANG)
    args, ckpt, leftover, complete, done = (killed.args, killed.ckpt, killed.leftover,
                                            killed.complete, killed.done)
    record("checkpoint/kill rank 0 during a write", killed.outcome)

    resumed = run_job(2, args + ["--epochs", done + 3, "--resume", "auto"], timeout=HANG)
    record("checkpoint/resume after the kill", resumed)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {complete[0]}" in resumed.stdout
    assert not leftover.exists(), "the interrupted write was not cleaned up"
    steps = sorted(p.name for p in ckpt.glob("checkpoint-*.pt"))
    assert steps == [checkpoint.checkpoint_name(2 * e) for e in (done + 1, done + 2)], steps

    flip_tensor_byte(ckpt / checkpoint.FINAL, ckpt / checkpoint.FINAL)
    fallback = run_job(2, args + ["--epochs", done + 3, "--resume", "auto"], timeout=HANG)
    record("checkpoint/resume auto with a damaged final.pt", fallback)
    assert fallback.returncode == 0, fallback.output[-3000:]
    assert re.search(r"final\.pt'?: its checksum does not match.*trying the next older one",
                     fallback.stdout), fallback.stdout
    assert f"resumed from {ckpt / checkpoint.checkpoint_name(2 * (done + 2))}" in fallback.stdout
    checkpoint.load(ckpt / checkpoint.FINAL)          # rewritten whole
