"""--checkpoint-async: a host copy at the step boundary, one background write at a time."""
from __future__ import annotations

import itertools
import time

import pytest
import torch
from conftest import mpirun
from drill import kill_during_a_write, run_job, small_digits

from mpicnn.checkpoint import files as checkpoint
from mpicnn.checkpoint import writer as writer_module
from mpicnn.checkpoint.writer import Writer, host_copy
from mpicnn.cluster.errors import MpicnnError
from mpicnn.resilience.preemption import PREEMPTED_EXIT

HANG = 180


def test_host_copy_shares_nothing_with_the_live_state():
    live = {"model": {"w": torch.ones(3)}, "steps": [torch.zeros(1), 4], "name": "x"}
    copy = host_copy(live)
    live["model"]["w"].add_(1)
    live["steps"][0].add_(1)
    assert copy["model"]["w"].tolist() == [1, 1, 1] and copy["steps"][0].item() == 0
    assert copy["steps"][1] == 4 and copy["name"] == "x"


def test_background_writes_keep_the_state_of_the_step_and_run_one_at_a_time(tmp_path,
                                                                            monkeypatch):
    spans, real = [], checkpoint.atomic_save

    def slow_save(state, path):
        start = time.monotonic()
        time.sleep(0.2)
        real(state, path)
        spans.append((start, time.monotonic()))

    monkeypatch.setattr(writer_module.files, "atomic_save", slow_save)
    weights = torch.zeros(4)
    writer, pruned = Writer(background=True), []
    for step in range(3):
        weights.fill_(step)
        writer.save({"w": weights}, tmp_path / checkpoint.checkpoint_name(step),
                    after=lambda step=step: pruned.append(step))
        assert writer.busy                        # the caller went on while it writes
        weights.fill_(-1)                         # training changes the live state
    writer.wait()
    assert not writer.busy and pruned == [0, 1, 2]
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    for step in range(3):
        saved = checkpoint.load(tmp_path / checkpoint.checkpoint_name(step))
        assert saved["w"].tolist() == [step] * 4
    assert len(writer.stall_s) == len(writer.write_s) == 3


def test_a_failed_background_write_is_one_error_at_the_next_wait(tmp_path):
    writer = Writer(background=True)
    writer.save({"w": torch.zeros(1)}, tmp_path / "missing" / "c.pt")
    with pytest.raises(MpicnnError, match="cannot write checkpoint .*c.pt': No such file or "
                                          "directory; no checkpoint written yet"):
        writer.wait()
    writer.wait()                                 # reported once


@pytest.mark.mpi
def test_async_checkpoints_resume_to_the_parameters_of_sync_ones(tmp_path):
    """A stop signal and the end of the run wait for the write: the async run's stop
    checkpoint resumes (async) to the same final parameters as a synchronous run."""
    data = small_digits(tmp_path / "d.h5", train=256, val=64)
    common = ["--data", data, "--model", "tests.custom_model:Drill", "--epochs", 2,
              "--deterministic", "--progress", "off"]
    mpirun(2, [*common, "--checkpoint-dir", tmp_path / "sync"])
    ckpt = tmp_path / "async"
    stopped = mpirun(2, [*common, "--checkpoint-dir", ckpt, "--checkpoint-async"],
                     check=False, env={"STOP_AFTER": "11"})
    assert stopped.returncode == PREEMPTED_EXIT, stopped.stdout + stopped.stderr
    assert [p.name for p in checkpoint.candidates(ckpt)] == [checkpoint.checkpoint_name(s)
                                                             for s in (11, 8)]   # 8 a epoch
    resumed = mpirun(2, [*common, "--checkpoint-dir", ckpt, "--checkpoint-async",
                         "--resume", "auto"])
    assert "written in the background" in resumed.stdout
    sync = checkpoint.load(tmp_path / "sync" / checkpoint.FINAL)["model"]
    ours = checkpoint.load(ckpt / checkpoint.FINAL)["model"]
    assert all(torch.equal(sync[k], ours[k]) for k in sync)


@pytest.mark.mpi
def test_kill_during_a_background_write_leaves_complete_checkpoints(tmp_path):
    """SIGKILL rank 0 while its writer thread writes: every checkpoint left is whole, and
    --resume auto continues from the newest of them."""
    killed = kill_during_a_write(tmp_path, ["--checkpoint-async"], HANG)
    args, ckpt, complete, done = killed.args, killed.ckpt, killed.complete, killed.done
    resumed = run_job(2, args + ["--epochs", done + 1, "--resume", "auto"], timeout=HANG)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {complete[0]}" in resumed.stdout
    assert checkpoint.load(ckpt / checkpoint.FINAL)["global_step"] == 2 * (done + 1)
