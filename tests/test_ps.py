"""Parameter-server modes: pure helpers, parity with allreduce and serial SGD, SSP, no hangs."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from conftest import QUIET, ROOT, final, max_diff, mpirun, read_jsonl, records, train
from drill import Job, file_contains

from mpicnn.cluster.errors import MpicnnError
from mpicnn.config import parse_config
from mpicnn.observe.records import check_record
from mpicnn.sync.messages import chunk_bounds, chunks
from mpicnn.sync.ps.flatstate import flat_state, set_flat_state
from mpicnn.sync.ps.layout import partition, partition_tensors, roles
from mpicnn.sync.ps.policy import Dispatcher, may_proceed, staleness_bound, stop_step
from mpicnn.sync.ps.protocol import NO_ITEM
from mpicnn.sync.ps.role import decode_stats, encode_stats, summarize

SGD = ["--optimizer", "sgd", "--momentum", "0", "--weight-decay", "0", "--lr", "0.05"]


# --- pure functions ----------------------------------------------------------------------

@pytest.mark.parametrize("numel,servers,itemsize", [(1000, 1, 4), (1000, 3, 4), (1003, 4, 4),
                                                    (7, 3, 4), (2, 5, 4), (0, 2, 4),
                                                    (12345, 7, 8), (100_000, 16, 2)])
def test_partition_is_contiguous_complete_and_balanced_by_bytes(numel, servers, itemsize):
    ranges = partition(numel, servers, itemsize, align_bytes=64)
    assert len(ranges) == servers
    assert ranges[0][0] == 0 and ranges[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [(hi - lo) * itemsize for lo, hi in ranges]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 64
    assert all(lo * itemsize % 64 == 0 for lo, _ in ranges if lo < numel)


def test_partition_lets_one_big_tensor_span_servers():
    # digitnet-sized: one 65,536-element weight is bigger than a third of everything
    sizes = [288, 32, 18432, 64, 131072, 128, 1280, 10]
    bounds = partition(sum(sizes), 3)
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    big_lo, big_hi = starts[4], starts[5]
    assert sum(1 for lo, hi in bounds if lo < big_hi and hi > big_lo) >= 2


def test_layerwise_partition_keeps_whole_tensors_near_equal_shares():
    sizes = [288, 32, 18432, 64, 131072, 128, 1280, 10]          # digitnet
    assert partition_tensors(sizes, 1) == [(0, 151306)]
    assert partition_tensors(sizes, 2) == [(0, 18816), (18816, 151306)]
    three = partition_tensors([10] * 9, 3)
    assert three == [(0, 30), (30, 60), (60, 90)]
    with pytest.raises(MpicnnError, match="leave a server without one; use fewer servers"):
        partition_tensors([1000], 2)


def test_chunk_bounds_split_large_payloads():
    assert chunk_bounds(0, 4, 20) == [(0, 0)]
    assert chunk_bounds(5, 4, 20) == [(0, 5)]
    assert chunk_bounds(12, 4, 20) == [(0, 5), (5, 10), (10, 12)]
    gib = 1 << 30
    bounds = chunk_bounds(3 * gib // 4 + 1, 4)          # 3 GiB + 4 bytes of float32
    assert len(bounds) == 4 and all((hi - lo) * 4 <= gib for lo, hi in bounds)
    assert bounds[-1][1] == 3 * gib // 4 + 1
    payload = np.arange(12, dtype=np.float32)                # as the protocol sends it
    parts = chunks(payload, 20)
    assert [len(part) for part in parts] == [5, 5, 2]
    assert all(np.shares_memory(part, payload) for part in parts)


def test_ssp_rule():
    assert may_proceed(10, [10, 2, 3], [True] * 3, None)           # unbounded
    assert not may_proceed(3, [3, 2, 3], [True] * 3, 0)             # sync: wait for rank 1
    assert may_proceed(3, [3, 3, 3], [True] * 3, 0)
    assert may_proceed(4, [4, 2, 3], [True] * 3, 2)
    assert not may_proceed(5, [5, 2, 3], [True] * 3, 2)
    assert may_proceed(5, [5, 2, 3], [True, False, True], 2)        # a done worker cannot block


def test_dispatcher_gives_each_worker_its_first_batch_then_serves_in_order():
    d = Dispatcher(3)
    d.open(0, 0, 9, base=0)
    assert [d.take(2), d.take(2), d.take(0), d.take(2)] == [2, 3, 0, 4]
    d.open(0, 0, 9, base=0)                                       # same epoch: no reset
    assert [d.take(1)] + [d.take(1) for _ in range(5)] == [1, 5, 6, 7, 8, NO_ITEM]
    d.open(1, 3, 9, base=9)                  # the next epoch, resumed at its second step
    assert [d.take(1), d.take(1), d.take(0)] == [4, 6, 3]
    short = Dispatcher(3)
    short.open(0, 0, 0, base=0)                                  # nothing left to do
    assert short.take(0) == NO_ITEM


def test_a_stop_lands_on_a_checked_step_after_every_batch_handed_out():
    assert [stop_step(5, 1), stop_step(5, 4), stop_step(8, 4), stop_step(3, 0)] == [5, 8, 8, 3]
    d = Dispatcher(2)
    d.open(0, 0, 10, base=20)                          # global items 20.. (global step 10)
    assert [d.take(0), d.take(1), d.take(0)] == [0, 1, 2]
    assert d.stop(every=1) == 12                   # global step 11 (items 2, 3) completes
    assert [d.take(1), d.take(0)] == [3, NO_ITEM]
    assert d.stop(every=1) == 12                                 # decided once
    d = Dispatcher(2)
    d.open(0, 0, 4, base=0)
    assert [d.take(w) for w in (0, 1, 0, 1)] == [0, 1, 2, 3]      # the epoch is all out
    assert d.stop(every=1) == 3            # a worker may have ended it: stop in the next
    d.open(1, 0, 4, base=4)
    assert [d.take(1), d.take(0), d.take(0)] == [1, 0, NO_ITEM]


def test_roles_and_bad_layouts():
    layout = roles(5, 2, "ps-sync")
    assert layout.workers == 3 and [layout.is_server(r) for r in range(5)] == \
        [False, False, False, True, True] and layout.server_rank(1) == 4
    with pytest.raises(MpicnnError, match="at least 2 ranks"):
        roles(1, 1, "ps-sync")
    with pytest.raises(MpicnnError, match="--servers 3 leaves no worker"):
        roles(3, 3, "ps-async")


def test_staleness_option():
    assert staleness_bound("none") is None and staleness_bound("0") == 0
    assert parse_config(["--mode", "ps-async", "--staleness", "4"]).sync.staleness == "4"
    for bad in ("-1", "1.5", "soon"):
        with pytest.raises(MpicnnError, match="--staleness must be"):
            parse_config(["--mode", "ps-async", "--staleness", bad])
    with pytest.raises(MpicnnError, match="--servers must be at least 1"):
        parse_config(["--servers", "0"])


def test_server_counters_travel_as_int64_and_summarize():
    layout = roles(5, 2, "ps-async")
    a = ({"updates": 6, "deferred": 2, "max_lead": 1, "pushes": [3, 2, 1]}, {0: 2, 3: 4})
    b = ({"updates": 6, "deferred": 1, "max_lead": 2, "pushes": [3, 2, 1]}, {1: 6})
    rows = [(True, *decode_stats(encode_stats(*x, 3), 3)) for x in (a, b)]
    assert rows[0][1:] == a and rows[1][1:] == b
    fields = summarize(rows, layout, final=False)
    assert fields["staleness_hist"] == {"0": 2, "1": 6, "3": 4}
    assert fields["updates_per_server"] == [6, 6] and fields["ps_pushes"] == [3, 2, 1]
    assert (fields["ps_deferred"], fields["ps_max_lead"], fields["ps_staleness_max"]) == (3, 2, 3)
    assert fields["ps_staleness_mean"] == (6 + 12) / 12 and "ps_unreceived" not in fields
    assert not check_record({"event": "end", "schema": 2, "time": 0.0, "val_acc": 1.0,
                             "val_loss": 0.1, "train_loss": 0.1, "images_per_s": 1.0,
                             "steps": 1, "epochs": 1, "world_size": 5, "mode": "ps-async",
                             "wall_s": 1.0, **fields})


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars", "lamb"])
def test_optimizer_state_survives_flattening_and_sharding(optimizer):
    cfg = parse_config(["--optimizer", optimizer])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    params = list(model.parameters())
    from mpicnn.training.optim import build_optimizer

    opt = build_optimizer(cfg.training, params, 32)
    for _ in range(3):
        model(torch.randn(8, 5)).square().sum().backward()
        opt.step()
    step, vectors = flat_state(opt, params, cfg.training)
    # shard over two "servers", then gather back into a fresh per-parameter optimizer
    numel = sum(p.numel() for p in params)
    shards = []
    for lo, hi in partition(numel, 2, align_bytes=16):
        flat = torch.nn.Parameter(torch.zeros(hi - lo))
        server_opt = build_optimizer(cfg.training, [flat], 32)
        set_flat_state(server_opt, [flat], cfg.training, step,
                       {k: v[lo:hi] for k, v in vectors.items()})
        shards.append(flat_state(server_opt, [flat], cfg.training))
    gathered = {k: torch.cat([s[1][k] for s in shards]) for k in vectors}
    fresh = build_optimizer(cfg.training, params, 32)
    set_flat_state(fresh, params, cfg.training, shards[0][0], gathered)
    for p in params:
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(fresh.state[p][key]))


# --- real MPI runs -----------------------------------------------------------------------

@pytest.mark.mpi
def test_ps_sync_equals_allreduce_for_any_server_count_and_resumes_exactly(tmp_path):
    # batch 32 at 2 workers: 22 steps/epoch, so a checkpoint lands at step 22 of 30
    common = ["--batch-size", "32", "--max-steps", "30"]
    ref, ref_end = train(tmp_path, "allreduce", 2, *common)
    one, one_end = train(tmp_path, "s1", 3, "--mode", "ps-sync", *common,
                         "--timeline", tmp_path / "trace.json", "--timeline-steps", "3:5")
    three, three_end = train(tmp_path, "s3", 5, "--mode", "ps-sync", "--servers", "3", *common,
                             "--resume", tmp_path / "s1" / "checkpoint-00000022.pt")
    assert max_diff(final(ref), final(one)) <= 1e-5              # server-side AdamW == local
    assert max_diff(final(one), final(three)) <= 1e-5            # S=1 == S=3, across a resume
    assert final(one)["scheduler"]["last_epoch"] == 30
    assert abs(one_end["val_acc"] - ref_end["val_acc"]) < 1e-9
    assert one_end["steps"] == three_end["steps"] == 30
    assert one_end["updates_per_server"] == [30]
    assert three_end["updates_per_server"] == [8, 8, 8]
    assert one_end["staleness_hist"] == {"0": 60} and one_end["ps_max_lead"] == 0
    assert one_end["ps_unreceived"] == three_end["ps_unreceived"] == 0
    assert one_end["images_per_s"] > 0
    assert records(one, "epoch")[0]["updates_per_server"] == [22]     # counters per epoch
    trace = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    names = {(e["pid"], e["name"]) for e in trace if e.get("ph") == "X"}
    assert {(0, "ps_push"), (1, "ps_pull"), (2, "ps_apply")} <= names


@pytest.mark.mpi
def test_ps_sync_with_lars_equals_allreduce_with_lars(tmp_path):
    # Two servers hold whole tensors (conv layers, fc layers) and apply the layer-wise
    # trust ratio to them; a large lr makes any difference in the ratios visible.
    common = ["--optimizer", "lars", "--lr", "2", "--trust-coefficient", "0.02",
              "--weight-decay", "1e-4", "--label-smoothing", "0.1", "--batch-size", "32",
              "--max-steps", "24"]
    ref, ref_end = train(tmp_path, "allreduce", 2, *common)
    ps, ps_end = train(tmp_path, "ps", 4, "--mode", "ps-sync", "--servers", "2", *common)
    start = torch.load(ref / "checkpoint-00000022.pt", weights_only=True)
    moved = max((final(ref)["model"][k] - v).abs().max().item()
                for k, v in start["model"].items())
    assert moved > 1e-3                                   # the last steps changed weights
    assert max_diff(final(ref), final(ps)) <= 1e-5
    assert ps_end["updates_per_server"] == [24, 24]
    assert abs(ps_end["val_acc"] - ref_end["val_acc"]) < 1e-9


@pytest.mark.mpi
def test_ps_async_with_one_worker_equals_serial_training(tmp_path):
    serial, _ = train(tmp_path, "serial", 1, "--max-steps", "20")
    ps, end = train(tmp_path, "ps", 2, "--mode", "ps-async", "--max-steps", "20")
    assert max_diff(final(serial), final(ps)) <= 1e-5
    assert end["updates_per_server"] == [20] and end["staleness_hist"] == {"0": 20}


@pytest.mark.mpi
def test_ssp_with_zero_staleness_equals_ps_sync(tmp_path):
    # Plain SGD: W in-order updates of g_i / W equal one update with their mean, so the
    # runs agree exactly when every gradient of a clock saw all of the previous clock.
    common = [*SGD, "--max-steps", "20"]
    sync, _ = train(tmp_path, "sync", 4, "--mode", "ps-sync", *common)
    ssp, end = train(tmp_path, "ssp", 4, "--mode", "ps-async", "--staleness", "0", *common,
                     "--slow-rank", "1", "--slow-factor", "3")
    assert max_diff(final(sync), final(ssp)) <= 1e-5
    assert end["ps_max_lead"] == 0
    assert end["ps_deferred"] == 2 * 20        # the first two pushes of every clock wait
    assert end["ps_pushes"] == [20, 20, 20] and end["ps_unreceived"] == 0


@pytest.mark.mpi
def test_async_workers_finishing_at_different_times_never_hang_and_resume(tmp_path):
    # Downpour with a 3x straggler and two servers: batches are handed out on demand,
    # the run stops mid-epoch (29 steps/epoch at 3 workers), every push is applied.
    first, end = train(tmp_path, "downpour", 5, "--mode", "ps-async", "--servers", "2",
                       "--max-steps", "40", "--slow-rank", "1", "--slow-factor", "3")
    assert end["steps"] == 40 and end["updates_per_server"] == [120, 120]
    assert sum(end["ps_pushes"]) == 120 and end["ps_unreceived"] == 0
    assert sum(end["staleness_hist"].values()) == 240
    # async workers log one interval per epoch (no mid-epoch collectives), all images counted
    intervals = records(first, "interval")
    assert [r["step"] for r in intervals] == [29, 40]
    assert all(r["images_per_s"] > 0 for r in intervals)
    saved = final(first)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 11, 40)
    # Continue mid-epoch under SSP (fixed shards, staleness 1) with one server.
    _, end = train(tmp_path, "ssp", 4, "--mode", "ps-async", "--staleness", "1",
                   "--max-steps", "50", "--slow-rank", "2", "--slow-factor", "3",
                   "--resume", first / "final.pt")
    assert end["steps"] == 50 and end["updates_per_server"] == [30] and end["ps_pushes"] == [10] * 3
    assert end["ps_max_lead"] <= 1 and end["ps_unreceived"] == 0


@pytest.mark.mpi
def test_stop_signal_to_one_async_worker_stops_all_at_one_step_and_resumes(tmp_path):
    # batch 4 at 3 workers: 119 steps/epoch, so the signal lands inside an epoch
    args = ["--mode", "ps-async", "--epochs", "4", "--batch-size", "4", "--progress", "off",
            "--checkpoint-dir", tmp_path, "--metrics", tmp_path / "m.jsonl"]
    with Job(4, args) as job:
        job.wait_until(lambda: file_contains(tmp_path / "m.jsonl", '"epoch"'), 240,
                       "an epoch record")
        os.kill(job.rank_pid(1), signal.SIGTERM)                # one worker, not rank 0
        outcome = job.finish(timeout=120)
    assert outcome.returncode == 75, outcome.output             # stopped, checkpoint written
    stopped = read_jsonl(tmp_path / "m.jsonl")[-1]
    assert stopped["event"] == "stopped" and 119 < stopped["step"] < 4 * 119
    saved = torch.load(tmp_path / f"checkpoint-{stopped['step']:08d}.pt", weights_only=True)
    assert saved["epoch"] * 119 + saved["step_in_epoch"] == saved["global_step"] == \
        stopped["step"]
    mpirun(4, [*args, "--resume", "auto"])
    end = read_jsonl(tmp_path / "m.jsonl")[-1]
    assert end["event"] == "end" and end["steps"] == 4 * 119 and end["ps_unreceived"] == 0
    assert sum(end["ps_pushes"]) == 3 * (4 * 119 - stopped["step"])   # each batch once


@pytest.mark.mpi
@pytest.mark.parametrize("n,args,message", [
    (1, ["--mode", "ps-sync"], "--mode ps-sync needs at least 2 ranks"),
    (2, ["--mode", "ps-async", "--servers", "2"], "--servers 2 leaves no worker among 2 ranks"),
    (2, ["--mode", "ps-async", "--staleness", "-1"], "--staleness must be a whole number"),
])
def test_bad_parameter_server_options_fail_before_training(n, args, message):
    run = mpirun(n, [*args, *QUIET], timeout=120, check=False)
    errors = [line for line in run.stderr.splitlines() if line.startswith("mpicnn: error:")]
    assert run.returncode != 0 and len(errors) == 1 and message in errors[0]
    assert "Traceback" not in run.stderr and "epoch 1/" not in run.stdout


@pytest.mark.mpi
def test_chunked_payloads_arrive_intact_over_mpi():
    script = ROOT / "tests" / "ps_transport_check.py"
    run = mpirun(2, [], script=script, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    # 1 + 1 + 1 + 3 + 200 messages for 0, 1, 5, 12 and 1000 float32 at 20 bytes each
    assert "intact=True messages=206 leftover=1 again=0" in run.stdout


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ps-sync", "ps-async"])
def test_parameter_server_modes_learn_digits(tmp_path, mode):
    _, end = train(tmp_path, mode, 5, "--mode", mode, "--epochs", "12")
    assert end["ps_workers"] == 4 and end["ps_servers"] == 1
    assert end["val_acc"] >= 0.97
