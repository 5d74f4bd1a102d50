"""Resuming on another number of ranks or global batch: the epoch's order, the schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DIGITS, mpirun, read_jsonl
from drill import digits_arrays, write_h5

from mpicnn.checkpoint import files as checkpoint
from mpicnn.checkpoint.position import record, resume_point
from mpicnn.checkpoint.state import RunState
from mpicnn.config import parse_config
from mpicnn.data import shard
from mpicnn.data.loader import Loader
from mpicnn.data.schema import open_dataset
from mpicnn.resilience.preemption import PREEMPTED_EXIT
from mpicnn.training.optim import (
    TrainingProgress,
    build_scheduler,
    follow_progress,
    total_steps,
)

CPU = torch.device("cpu")


# --- the shard plan: continuing an epoch's order (pure) ---------------------------------

@pytest.mark.parametrize("old,new,done_steps", [((8, 4), (8, 2), 5), ((8, 2), (8, 4), 3),
                                                ((8, 4), (6, 3), 7), ((8, 2), (60, 7), 1)])
def test_continued_epoch_trains_every_remaining_sample_once(old, new, done_steps):
    n, seed = 1000, 4
    before = [shard.rank_batches(n, old[0], old[1], r, seed, epoch=2) for r in range(old[1])]
    glob = shard.join_plans(before)
    first = done_steps * old[0] * old[1]
    after = [shard.continue_batches(glob, first, new[0], new[1], r) for r in range(new[1])]
    steps = {len(rows) for rows in after}
    assert len(steps) == 1                                    # every rank runs each step
    trained = np.concatenate([p[:done_steps].reshape(-1) for p in before] +
                             [np.concatenate(rows) for rows in after])
    assert sorted(trained) == sorted(glob.reshape(-1))        # each sample exactly once
    sizes = shard.step_sizes(glob.size - first, new[0] * new[1])
    assert len(sizes) == steps.pop()
    for step, size in enumerate(sizes):
        got = [len(rows[step]) for rows in after]
        assert sum(got) == size and max(got) - min(got) <= 1
        assert all((np.diff(rows[step]) > 0).all() for rows in after)


def test_the_same_global_batch_continues_the_same_batches():
    n = 500
    four = [shard.rank_batches(n, 2, 4, r, 1, 0) for r in range(4)]
    two = [shard.continue_batches(shard.join_plans(four), 3 * 8, 4, 2, r) for r in range(2)]
    again = [shard.rank_batches(n, 4, 2, r, 1, 0)[3:] for r in range(2)]
    assert all(np.array_equal(np.stack(a), b) for a, b in zip(two, again))


def test_loader_continues_an_epoch_and_weights_the_uneven_last_step():
    data = open_dataset(str(DIGITS))
    try:
        n = len(data.train)
        four = [Loader(data, data.train, CPU, 8, 4, r, seed=1) for r in range(4)]
        three = [Loader(data, data.train, CPU, 7, 3, r, seed=1) for r in range(3)]
        for loader in three:
            loader.continue_epoch(0, shard.Layout(8, 4), 5 * 32)
        assert three[0].steps_in(0) == math.ceil((four[0].steps - 5) * 32 / 21)
        assert three[0].steps_in(1) == three[0].steps == n // 21
        trained = np.concatenate([p.plan(0)[:5].reshape(-1) for p in four] +
                                 [np.concatenate(p.plan(0)) for p in three])
        whole = np.concatenate([p.plan(0).reshape(-1) for p in four])
        assert sorted(trained) == sorted(whole)
        last = three[0].steps_in(0) - 1
        weights = [loader.weight(0, last) for loader in three]
        sizes = [len(loader.plan(0)[last]) for loader in three]
        assert all(w == pytest.approx(s * 3 / sum(sizes)) for w, s in zip(weights, sizes))
        assert three[0].weight(0, 0) == 1.0 and three[0].weight(1, last) == 1.0
        batches = list(three[2].epoch(0))
        assert len(batches) == last + 1 and len(batches[-1][1]) == sizes[2]
    finally:
        data.close()


# --- where a checkpoint stands, and where a run of another layout continues -----------

def saved_at(state: RunState, layout: shard.Layout) -> dict:
    return {"epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step, **record(state, layout)}


def test_resume_point_for_each_kind_of_checkpoint():
    n, four, two = 1000, shard.Layout(8, 4), shard.Layout(8, 2)      # 31 / 62 steps
    mid = saved_at(RunState(2, 5, 67), four)
    same = resume_point(mid, four, n)
    assert same.state == RunState(2, 5, 67) and same.saved == four
    half = resume_point(mid, two, n)            # another global batch: another order
    assert (half.done, half.samples, half.order) == (160, 992, four)
    assert half.state.continued.first == 160 and half.state.continued.steps == (992 - 160) // 16
    swapped = resume_point(mid, shard.Layout(16, 2), n)       # same global batch, same order
    assert swapped.state == RunState(2, 5, 67) and swapped.saved == four
    wide = resume_point(saved_at(RunState(2, 5, 67), two), four, n)   # 80 done: not whole
    assert wide.state.continued.first == 80 and wide.state.continued.steps == \
        math.ceil((992 - 80) / 32)
    assert wide.state.continued.samples == two.samples(n) == 992
    # inside a continued epoch the order stays the one that began the epoch
    inside = wide.state
    inside.advance()
    inside.advance()
    again = resume_point(saved_at(inside, four), two, n)
    assert again.done == 80 + 64 and again.order == two and again.state.continued is None
    assert again.state.step_in_epoch == 144 // 16
    boundary = resume_point(saved_at(RunState(3, 0, 93), four), two, n)
    assert boundary.state == RunState(3, 0, 93) and boundary.order == two
    old = {"epoch": 1, "step_in_epoch": 4, "global_step": 35}        # before layouts
    assert resume_point(old, two, n).saved is None
    assert resume_point(old, two, n).state == RunState(1, 4, 35)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_schedule_follows_progress_and_ends_where_the_uninterrupted_run_ends():
    cfg = parse_config(["--epochs", "3", "--warmup-epochs", "1", "--min-lr-ratio", "0.1"])
    n, four, two = 1000, shard.Layout(8, 4), shard.Layout(8, 2)

    def scheduler(spe):
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        return build_scheduler(cfg.training, opt, spe, total_steps(cfg.training, spe))

    whole = scheduler(31)
    whole.optimizer.step()
    lrs = []
    for _ in range(93):
        whole.step()
        lrs.append(whole.get_last_lr()[0])
    resumed = scheduler(62)
    resumed.last_epoch = 40                       # stopped after step 40 of 93 (epoch 1, step 9)
    progress = TrainingProgress(40, 1, 9 * 32, 992, 16, 62)
    assert not progress.identity and progress.at(40) == pytest.approx(62 * (1 + 9 / 31))
    end = follow_progress(resumed, progress, cfg.training, None)
    assert end == 40 + 2 * (31 - 9) + 62
    assert resumed.get_last_lr()[0] == pytest.approx(lrs[39], rel=1e-12)
    for _ in range(end - 40):
        resumed.step()
    assert resumed.get_last_lr()[0] == lrs[-1] == pytest.approx(0.01)
    assert TrainingProgress(40, 1, 9 * 32, 992, 32, 31).identity
    assert four.samples(n) == 992 and two.steps(n) == 62


# --- through mpirun: stop mid-epoch, resume on another number of ranks -------------------

DRILL = "tests.custom_model:Drill"


def id_data(path, train: int = 200, val: int = 64):
    """Digits as float pixels whose pixel (0, 0, 0) holds the row number (see ``Drill``)."""
    xt, yt, xv, yv = digits_arrays()
    images = xt[:train].astype(np.float32) / 16
    images[:, 0, 0, 0] = np.arange(train)
    return write_h5(path, {"train": {"images": images, "labels": yt[:train]},
                           "val": {"images": xv[:val].astype(np.float32) / 16,
                                   "labels": yv[:val]}},
                    attrs={"mean": [0.0], "std": [1.0]})


def logged_steps(prefix, ranks: int) -> list[list[list[int]]]:
    """[rank][step] -> sample ids, as ``Drill`` logged them."""
    return [[[int(v) for v in line.split()] for line in open(f"{prefix}.{r}")]
            for r in range(ranks)]


def epoch_records(path) -> list[dict]:
    return [r for r in read_jsonl(path) if r["event"] == "epoch"]


# (mode, ranks before, ranks after, stop after step, epochs); PS jobs add one server
CHANGES = [("allreduce", 4, 2, 2, 2), ("allreduce", 2, 4, 3, 2), ("ps-sync", 3, 4, 3, 1),
           ("ps-async", 4, 3, 2, 1)]


@pytest.mark.mpi
@pytest.mark.parametrize("mode,before,after,stop,epochs", CHANGES,
                         ids=[f"{c[0]}-{c[1]}to{c[2]}" for c in CHANGES])
def test_resume_on_other_ranks_trains_the_same_samples_and_ends_at_the_same_lr(
        mode, before, after, stop, epochs, tmp_path):
    """Stopped after ``stop`` steps of epoch 0 on ``before`` ranks, resumed on ``after``:
    epoch 0 trains exactly the samples of an uninterrupted run, the lr at each epoch's
    end is the uninterrupted run's, and one log line says what changed."""
    data = id_data(tmp_path / "ids.h5")
    common = ["--data", data, "--model", DRILL, "--epochs", epochs, "--batch-size", 8,
              "--warmup-epochs", 1, "--min-lr-ratio", 0.1, "--deterministic", "--progress",
              "off", "--log-every", 1000, "--mode", mode]
    servers = 0 if mode == "allreduce" else 1
    workers_before, workers_after = before - servers, after - servers
    whole_log, split_log = tmp_path / "whole", tmp_path / "split"
    mpirun(before, [*common, "--metrics", tmp_path / "whole.jsonl"],
           env={"SAMPLE_LOG": str(whole_log)})
    ckpt = tmp_path / "ckpt"
    stopped = mpirun(before, [*common, "--checkpoint-dir", ckpt], check=False,
                     env={"SAMPLE_LOG": str(split_log), "STOP_AFTER": str(stop)})
    assert stopped.returncode == PREEMPTED_EXIT, stopped.stdout + stopped.stderr
    saved = checkpoint.load(checkpoint.latest(ckpt))
    assert saved["epoch"] == 0 and 0 < saved["step_in_epoch"] < 200 // (8 * workers_before)
    assert saved["samples_in_epoch"] == saved["step_in_epoch"] * 8 * workers_before
    assert saved["layout"] == {"batch_size": 8, "world_size": workers_before,
                               "shuffle": "global"}
    resumed = mpirun(after, [*common, "--checkpoint-dir", ckpt, "--resume", "auto",
                             "--metrics", tmp_path / "resumed.jsonl"],
                     env={"SAMPLE_LOG": str(split_log) + "-resumed"})
    line = [x for x in resumed.stdout.splitlines() if "resume: world size" in x]
    assert len(line) == 1 and (
        f"world size {workers_before} -> {workers_after}, global batch {8 * workers_before} "
        f"-> {8 * workers_after}; epoch 0 continues its order at sample "
        f"{saved['samples_in_epoch']}") in line[0], line

    n = 200
    epoch0 = (n // (8 * workers_before)) * 8 * workers_before
    rest = math.ceil((epoch0 - saved["samples_in_epoch"]) / (8 * workers_after))
    first = n // (8 * workers_before) if epochs > 1 else None   # epoch 0's lines of a rank
    whole = [ids for rank in logged_steps(whole_log, workers_before) for ids in rank[:first]]
    split = [ids for rank in logged_steps(split_log, workers_before) for ids in rank] + \
        [ids for rank in logged_steps(str(split_log) + "-resumed", workers_after)
         for ids in rank[:rest if epochs > 1 else None]]
    whole_ids = sorted(i for ids in whole for i in ids)
    assert len(whole_ids) == epoch0 and sorted(i for ids in split for i in ids) == whole_ids

    ends = [r["lr"] for r in epoch_records(tmp_path / "whole.jsonl")]
    resumed_ends = [r["lr"] for r in epoch_records(tmp_path / "resumed.jsonl")]
    assert len(ends) == len(resumed_ends) == epochs
    assert resumed_ends == pytest.approx(ends, rel=1e-12) and ends[-1] > 0
    end = read_jsonl(tmp_path / "resumed.jsonl")[-1]
    assert end["event"] == "end" and end["world_size"] == after and end["epochs"] == epochs


@pytest.mark.mpi
def test_constant_global_batch_on_other_ranks_ends_with_the_same_parameters(tmp_path):
    """SGD, no BatchNorm, global batch 8 as 2 x 4 then 4 x 2 from mid-epoch 1: the
    parameters of the uninterrupted 2 x 4 run."""
    common = ["--model", DRILL, "--epochs", 2, "--optimizer", "sgd", "--lr", 0.05,
              "--weight-decay", 5e-4, "--deterministic", "--progress", "off", "--seed", 3]
    mpirun(2, [*common, "--batch-size", 4, "--checkpoint-dir", tmp_path / "whole"])
    ckpt = tmp_path / "split"
    stopped = mpirun(2, [*common, "--batch-size", 4, "--checkpoint-dir", ckpt], check=False,
                     env={"STOP_AFTER": str(179 + 40)})       # 179 steps an epoch
    assert stopped.returncode == PREEMPTED_EXIT, stopped.stdout + stopped.stderr
    resumed = mpirun(4, [*common, "--batch-size", 2, "--checkpoint-dir", ckpt,
                         "--resume", "auto"])
    assert "world size 2 -> 4; epoch 1 continues at step 40" in resumed.stdout
    whole = torch.load(tmp_path / "whole" / checkpoint.FINAL, weights_only=True)["model"]
    split = torch.load(ckpt / checkpoint.FINAL, weights_only=True)["model"]
    assert max((whole[k] - split[k]).abs().max().item() for k in whole) <= 1e-4
    first = torch.load(checkpoint.candidates(ckpt)[-1], weights_only=True)["model"]
    assert max((whole[k] - first[k]).abs().max().item() for k in whole) > 1e-3   # it trained


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_scale_lr_rescales_the_peak_to_the_new_global_batch():
    cfg = parse_config(["--epochs", "2", "--scale-lr", "--base-batch", "32", "--lr", "0.1",
                        "--schedule", "constant", "--warmup-epochs", "0"])
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)   # peak at 32
    resumed = build_scheduler(cfg.training, opt, 62, 124)
    resumed.last_epoch = 10
    follow_progress(resumed, TrainingProgress(10, 0, 320, 992, 16, 62), cfg.training, 0.05)
    assert resumed.get_last_lr() == [0.05] and opt.param_groups[0]["initial_lr"] == 0.05
    resumed.step()
    assert opt.param_groups[0]["lr"] == 0.05


def test_local_shuffle_continues_the_old_shards_order():
    data = open_dataset(str(DIGITS))
    try:
        four = [Loader(data, data.train, CPU, 8, 4, r, seed=1, shuffle="local") for r in range(4)]
        two = [Loader(data, data.train, CPU, 8, 2, r, seed=1, shuffle="local") for r in range(2)]
        for loader in two:
            loader.continue_epoch(0, shard.Layout(8, 4, "local"), 5 * 32)
        trained = np.concatenate([p.plan(0)[:5].reshape(-1) for p in four] +
                                 [np.concatenate(p.plan(0)) for p in two])
        assert sorted(trained) == sorted(np.concatenate([p.plan(0).reshape(-1) for p in four]))
        assert not shard.Layout(8, 4, "local").same_order(shard.Layout(16, 2, "local"))
    finally:
        data.close()
