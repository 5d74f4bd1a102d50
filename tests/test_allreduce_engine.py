"""The allreduce engine: bucket layout, threads, compression, staging, hierarchy, accumulation."""
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, ListLoader, mpirun, param_difference, trained_params
from torch import nn

from mpicnn.checkpoint.state import RunState
from mpicnn.cluster.errors import MpicnnError
from mpicnn.config import parse_config
from mpicnn.config.failure import FailureConfig
from mpicnn.observe.steps import StepStats
from mpicnn.resilience.step_guard import StepGuard
from mpicnn.resilience.watchdog import COMPUTE, WAIT
from mpicnn.sync.allreduce.buckets import (
    MB,
    Bucket,
    bucket_plan,
    build_buckets,
    plan_buckets,
    same_plan,
)
from mpicnn.sync.allreduce.codec import Codec, sum_into
from mpicnn.sync.allreduce.comm_thread import CommThread, InlineRunner, make_runner
from mpicnn.sync.allreduce.deferred import DeferredUpdate
from mpicnn.sync.allreduce.strategy import AllreduceStrategy
from mpicnn.sync.allreduce.transport import (
    DirectBuffers,
    StagedBuffers,
    choose_path,
    make_buffers,
    probe_cuda_support,
)
from mpicnn.sync.contract import Strategy
from mpicnn.sync.flat import flatten, unflatten_into, views
from mpicnn.sync.messages import chunk_bounds, chunks
from mpicnn.training.loop import train_epoch
from mpicnn.training.models import build_model

CPU, F32 = torch.device("cpu"), torch.float32


# --- bucket layout -----------------------------------------------------------------------
def test_first_bucket_is_small_and_a_large_tensor_closes_its_bucket():
    key = (CPU, F32)
    rows = [(0, key, 100), (1, key, 600_000), (2, key, 500_000), (3, key, 300),
            (4, key, 30_000_000), (5, key, 10)]
    plan = plan_buckets(rows, cap_bytes=25 * MB, first_cap_bytes=1 * MB)
    assert plan == [[0, 1, 2], [3, 4], [5]]
    assert plan_buckets(rows, cap_bytes=10**9, first_cap_bytes=10**9) == [[0, 1, 2, 3, 4, 5]]


def test_buckets_hold_one_dtype_and_come_in_completion_order():
    f32, f64 = (CPU, torch.float32), (CPU, torch.float64)
    rows = [(7, f64, 10), (3, f32, 10), (5, f64, 10), (1, f32, 10)]
    plan = plan_buckets(rows, cap_bytes=1000, first_cap_bytes=1000)
    assert plan == [[7, 5], [3, 1]]           # the f64 bucket completes first (position 2)
    assert same_plan([[5, 7], [1, 3]], plan) and not same_plan([[3, 1], [7, 5]], plan)


def test_grads_are_views_into_the_bucket_and_backward_fills_them_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 2.0)          # existing values are kept
    order = list(reversed(range(len(params))))
    buckets = build_buckets(params, bucket_plan(params, order, 100, 100))
    assert len(buckets) >= 2 and sorted(i for b in buckets for i in b.members) == [0, 1, 2, 3]
    for bucket in buckets:
        assert bucket.bound()
        lo = bucket.flat.data_ptr()
        for p in bucket.params:
            assert lo <= p.grad.data_ptr() < lo + bucket.nbytes
    assert (params[0].grad == 2.0).all()
    for bucket in buckets:
        bucket.flat.zero_()
    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    expected = torch.autograd.grad(model(x).square().sum(), params)
    for bucket in buckets:
        assert bucket.bound()                                 # accumulated in place
    for p, g in zip(params, expected):
        assert torch.allclose(p.grad, g)
    params[1].grad = None                                     # e.g. zero_grad(set_to_none=True)
    owner = next(b for b in buckets if 1 in b.members)
    assert not owner.bound()
    owner.bind()
    assert owner.bound()


def test_bucket_memory_comes_from_the_allocator_and_grads_survive_it():
    p = nn.Parameter(torch.ones(3))
    given = []
    bucket = Bucket(0, [p], [0], allocate=lambda n, dtype, device: given.append(
        torch.full((n,), 5.0, dtype=dtype)) or given[-1])
    assert bucket.flat is given[0] and p.grad.data_ptr() == given[0].data_ptr()
    bucket.pending -= 1
    bucket.reset()
    assert bucket.pending == 1 and bucket.nbytes == 12
    bucket.detach()                                          # before that memory is released
    assert p.grad.data_ptr() != given[0].data_ptr() and (p.grad == 5.0).all()


def test_flat_views_flatten_and_unflatten_share_one_layout():
    tensors = [torch.randn(2, 3), torch.randn(0), torch.randn(4), torch.randn(2, 1, 2, 2)]
    flat = flatten(tensors)
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in tensors]))
    pieces = views(flat, tensors)
    assert [piece.shape for piece in pieces] == [t.shape for t in tensors]
    assert [piece.storage_offset() for piece in pieces] == [0, 6, 6, 10]     # views, no copies
    assert all(piece.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
               for piece in pieces)
    doubles = flatten(tensors, dtype=torch.float64, device="cpu")
    assert doubles.dtype == torch.float64 and torch.equal(doubles, flat.double())
    assert flatten(tensors, out=doubles) is doubles
    restored = [torch.zeros_like(t) for t in tensors]
    unflatten_into(2 * flat, restored)
    assert all(torch.equal(r, 2 * t) for r, t in zip(restored, tensors))
    assert not flatten([nn.Parameter(torch.ones(3))]).requires_grad      # it goes to numpy


# --- where reductions run ------------------------------------------------------------------
def test_comm_thread_runs_jobs_in_order_off_the_main_thread():
    runner = CommThread()
    seen = []
    try:
        for i in range(5):
            runner.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i * i)
        assert runner.wait() == [0, 1, 4, 9, 16]
        assert [i for i, _ in seen] == list(range(5))
        assert all(name == "mpicnn-comm" for _, name in seen)
        assert runner.idle and runner.wait() == []

        def fail():
            raise RuntimeError("collective failed")
        runner.submit(fail)
        runner.submit(lambda: 7)                              # later jobs still run
        with pytest.raises(RuntimeError, match="collective failed"):
            runner.wait()
        assert runner.idle and runner.busy.wall > 0
        before = (runner.busy.wall, runner.busy.cpu)
        runner.submit(lambda: time.sleep(0.3))             # waiting, not computing
        runner.wait()
        wall, cpu = (now - then for now, then in zip((runner.busy.wall, runner.busy.cpu), before))
        assert wall >= 0.3 and cpu < wall / 2
    finally:
        runner.close()
    assert not runner._thread.is_alive()


def test_inline_runner_defers_jobs_to_wait_on_the_calling_thread():
    runner = InlineRunner()
    seen = []
    runner.submit(lambda: seen.append(threading.current_thread().name) or 1)
    assert seen == [] and not runner.idle
    assert runner.wait() == [1] and seen == [threading.current_thread().name]
    assert runner.idle


def test_runner_without_thread_multiple_is_the_inline_path():
    assert isinstance(make_runner(2, 3), InlineRunner)        # SERIALIZED < MULTIPLE
    threaded = make_runner(3, 3)
    assert isinstance(threaded, CommThread) and threaded.overlaps
    threaded.close()


# --- compression ---------------------------------------------------------------------------
def test_codec_none_divides_after_the_sum_and_keeps_the_buffer():
    codec = Codec("none", 4)
    flat = torch.arange(8, dtype=F32)
    assert codec.encode(0, flat) is flat
    codec.decode(flat, flat)
    assert torch.equal(flat, torch.arange(8, dtype=F32) / 4)


@pytest.mark.parametrize("name,dtype,unit", [("fp16", torch.float16, 2.0 ** -11),
                                             ("bf16", torch.bfloat16, 2.0 ** -8)])
def test_half_wire_divides_first_and_sums_within_the_bound(name, dtype, unit):
    ranks = 4
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(10_000, generator=gen) * 10 ** torch.empty(10_000).uniform_(-3, 3.5)
             for _ in range(ranks)]
    grads[0][0] = 60000.0                                     # sums past fp16's range ...
    grads[1][0] = grads[2][0] = grads[3][0] = 60000.0         # ... unless divided first
    codec = Codec(name, ranks)
    wires = [codec.encode(r, g.clone()).clone() for r, g in enumerate(grads)]
    assert wires[0].dtype == dtype and wires[0].numel() == 10_000
    op = sum_into(dtype)                                      # what MPI calls, on raw bytes
    total = wires[0].clone()
    for wire in wires[1:]:
        op(memoryview(wire.view(torch.uint8).numpy()), memoryview(total.view(torch.uint8).numpy()),
           None)
    out = torch.empty(10_000)
    codec.decode(total, out)
    exact = torch.stack([g.double() for g in grads]).mean(0)
    bound = unit * torch.stack([g.double().abs() for g in grads]).sum(0) + ranks * 2.0 ** -24
    error = (out.double() - exact).abs()
    assert torch.isfinite(out).all() and float(out[0]) == pytest.approx(60000.0, rel=ranks * unit)
    assert (error <= bound).all(), float((error / bound).max())
    assert error.max() > 0                                    # it really was compressed


def test_unknown_dtype_is_refused():
    pytest.importorskip("mpi4py")
    with pytest.raises(TypeError, match="int64"):
        Codec("none", 2).mpi_spec(torch.int64)


# --- CUDA-aware choice and staging (CPU) ----------------------------------------------------
def _no_probe():
    raise AssertionError("the library must not be asked")


def test_cuda_aware_choice_and_reason():
    assert choose_path("on", "cpu", "on", _no_probe)[0] is False        # CPU never stages
    unknown = lambda: (None, "no query")
    assert choose_path("on", "cuda", "off", unknown) == (True, "--cuda-aware on")
    assert choose_path("off", "cuda", "on", _no_probe) == (False, "--cuda-aware off")
    aware, why = choose_path("auto", "cuda", "on", unknown)
    assert aware and "MPICNN_CUDA_AWARE=on" in why
    aware, why = choose_path("auto", "cuda", "off", _no_probe)
    assert not aware and "MPICNN_CUDA_AWARE=off" in why
    aware, why = choose_path("auto", "cuda", None, lambda: (True, "query = 1"))
    assert aware and "query = 1" in why
    aware, why = choose_path("auto", "cuda", None, lambda: (False, "query = 0"))
    assert not aware and "not CUDA-aware" in why
    aware, why = choose_path("auto", "cuda", None, lambda: (None, "no query"))
    assert not aware and "safe" in why


class _OpenMPI:
    def __init__(self, answer):
        self.MPIX_Query_cuda_support = lambda: answer


class _MPICH:
    def __init__(self, answer):
        def query(kind, flag):
            flag._obj.value = answer if kind == 0 else 0
            return 0
        self.MPIX_GPU_query_support = query


def test_probe_asks_open_mpi_or_mpich_style_queries():
    assert probe_cuda_support(_OpenMPI(1))[0] is True
    assert probe_cuda_support(_OpenMPI(0))[0] is False
    assert probe_cuda_support(_MPICH(1)) == (True, "MPIX_GPU_query_support(CUDA) = 1")
    assert probe_cuda_support(_MPICH(0))[0] is False
    assert probe_cuda_support(object())[0] is None


def test_staged_buffers_copy_out_and_back_through_a_reused_host_buffer():
    staged = StagedBuffers(stream=None, pin=False)
    bucket = torch.arange(6, dtype=F32)
    host = staged.to_mpi("b0", bucket)
    assert torch.equal(host, bucket) and host.data_ptr() != bucket.data_ptr()
    host += 10                                                # what MPI would write
    assert bucket[0] == 0                                     # the bucket is untouched ...
    staged.from_mpi(host, bucket)
    assert torch.equal(bucket, torch.arange(6, dtype=F32) + 10)   # ... until copied back
    assert staged.to_mpi("b0", bucket).data_ptr() == host.data_ptr()   # allocated once
    bigger = staged.to_mpi("b0", torch.zeros(9))
    assert bigger.numel() == 9                                # re-allocated on a new size
    direct = DirectBuffers()
    assert direct.to_mpi("b0", bucket) is bucket and not direct.staged
    assert isinstance(make_buffers(False, CPU), DirectBuffers)


class _TwoIdenticalRanks:
    """Sums a buffer as if a second rank held the same values; records what MPI was given."""

    def __init__(self):
        self.seen = []

    def averages(self, tensor):
        return False

    def __call__(self, buf, datatype, op, spec):
        self.seen.append((buf.data_ptr(), buf.dtype, spec(buf, datatype)[1]))
        buf.add_(buf.clone())


@pytest.mark.parametrize("compression", ["none", "fp16", "bf16"])
def test_reducer_stages_encodes_sums_and_decodes(compression):
    pytest.importorskip("mpi4py")
    from mpicnn.sync.allreduce.reducer import Reducer

    collective = _TwoIdenticalRanks()
    reducer = Reducer(collective, Codec(compression, 2), CPU)
    reducer.buffers = StagedBuffers(stream=None, pin=False)   # the CUDA 'off' path, on CPU
    flat = torch.linspace(-3, 3, 101)
    expected = flat.clone()
    assert reducer(0, flat) is None                           # no CUDA event on CPU
    tolerance = {"none": 0, "fp16": 2e-3, "bf16": 2e-2}[compression]
    assert torch.allclose(flat, expected, atol=tolerance, rtol=0)      # the mean of 2 equals
    ptr, dtype, _ = collective.seen[0]
    assert ptr != flat.data_ptr()                             # MPI saw the host copy ...
    assert ptr == reducer.buffers.host_buffer(0, reducer.codec.encode(0, flat)).data_ptr()
    assert dtype == (torch.float32 if compression == "none" else torch.float16
                     if compression == "fp16" else torch.bfloat16)   # ... in the wire dtype


def test_chunks_split_counts_that_do_not_fit_an_int():
    assert chunk_bounds(10, 1, max_bytes=4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(0, 4) == [(0, 0)] and chunk_bounds(5, 4) == [(0, 5)]
    buf = torch.arange(10.0)                                  # as the collectives split it
    parts = chunks(buf, max_bytes=16)
    assert [len(part) for part in parts] == [4, 4, 2]
    assert [part.data_ptr() for part in parts] == [buf[lo:].data_ptr() for lo in (0, 4, 8)]


# --- configuration and the loop ------------------------------------------------------------
def test_bad_engine_settings_are_refused():
    with pytest.raises(MpicnnError, match="divide --batch-size 16"):
        parse_config(["--accum-steps", "3"])
    with pytest.raises(MpicnnError, match="--bucket-mb must not be negative"):
        parse_config(["--bucket-mb", "-1"])
    with pytest.raises(MpicnnError, match="choose from off, fp16, bf16"):
        parse_config(["--compression", "int8"])
    cfg = parse_config(["--accum-steps", "4", "--bucket-mb", "0.5", "--hierarchical"])
    assert (cfg.training.accum_steps, cfg.sync.bucket_mb, cfg.sync.hierarchical) == (4, 0.5, True)


class _OneRank:
    class comm:
        @staticmethod
        def Allreduce(_inplace, buf, op=None):
            return None


class _Counting(Strategy):
    def __init__(self, optimizer):
        super().__init__(_OneRank(), None)
        self.optimizer, self.scheduler = optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 1.0)
        self.calls = {"no_sync": 0, "after_backward": 0}
        self.grads = []

    def no_sync(self):
        self.calls["no_sync"] += 1
        return super().no_sync()

    def after_backward(self, finalize=None):
        self.calls["after_backward"] += 1
        self.grads.append([p.grad.clone() for p in self.optimizer.param_groups[0]["params"]])
        super().after_backward(finalize)


def test_accumulation_syncs_once_and_equals_the_whole_batch():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen))
               for _ in range(3)]
    runs = {}
    for k in (1, 4):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        strategy = _Counting(torch.optim.SGD(model.parameters(), lr=0.1))
        stats = StepStats()
        train_epoch(model, ListLoader(batches), strategy, strategy, RunState(), 3, stats,
                    scheduler=strategy.scheduler, global_batch=8, accum_steps=k)
        runs[k] = (strategy, stats.end_epoch(RunState()))
    one, four = runs[1][0], runs[4][0]
    assert one.calls == {"no_sync": 0, "after_backward": 3}
    assert four.calls == {"no_sync": 9, "after_backward": 3}   # 3 of 4 micro-batches per step
    for a, b in zip(one.grads, four.grads):
        for ga, gb in zip(a, b):
            assert torch.allclose(ga, gb, atol=1e-6)
    assert runs[4][1].train_loss == pytest.approx(runs[1][1].train_loss, rel=1e-6)


# --- real ranks ----------------------------------------------------------------------------
def _worker(n, tmp_path, env=None):
    out = tmp_path / f"engine{n}.json"
    mpirun(n, [out], module="tests.engine_worker", env=env, timeout=300)
    return json.loads(out.read_text())


def _max_param_difference(a, b):
    return max(float(np.abs(np.array(x) - np.array(y)).max()) for x, y in zip(a, b))


@pytest.mark.mpi
@pytest.mark.parametrize("n,per_node", [(3, ""), (4, "2")])
def test_engine_averages_exactly_on_real_ranks(n, per_node, tmp_path):
    """3 ranks on one node use shared-memory windows; 4 ranks as two fake nodes use windows
    within each node and MPI across, and --hierarchical really crosses 'nodes'."""
    r = _worker(n, tmp_path, env={"MPICNN_RANKS_PER_NODE": per_node})
    nodes = n // int(per_node) if per_node else 1
    assert r["size"] == n and r["nodes"] == nodes
    for case in ("engine", "mpi_engine", "one_bucket", "plain", "hierarchical"):
        assert r[case]["max_error"] <= 1e-6, case             # vs the float64 mean of all ranks
        assert r[case]["unused_grad_zero"], case               # unused parameter: no hang, zero
    for case in ("engine", "mpi_engine", "one_bucket", "hierarchical", "fp16", "bf16"):
        assert r[case]["views"] and r[case]["overlaps"], case
    # windows within each node; across (fake) nodes each slice through MPI
    assert "shared-memory windows" in r["engine"]["describe"]
    assert (f"within each of {nodes} nodes (2 ranks each)" in r["engine"]["describe"]) == \
        (nodes > 1)
    assert "flat Allreduce" in r["mpi_engine"]["describe"]
    assert len(r["engine"]["buckets"]) >= 2 and len(r["one_bucket"]["buckets"]) == 1
    # rebuilt in the observed ready order: the unused parameter (index 0) comes last
    assert r["engine"]["buckets"][-1][-1] == 0
    assert f"hierarchical ({nodes} node(s)" in r["hierarchical"]["describe"]
    for case in ("hierarchical", "plain", "mpi_engine"):
        assert _max_param_difference(r[case]["params"], r["engine"]["params"]) <= 1e-6, case
    # across nodes compression keeps the windows and compresses only the node-to-node sums
    for case in ("fp16", "bf16", "fp16_near_max"):
        across = f"{case[:4]} across nodes (exact sums within each node)"
        assert (across in r[case]["describe"]) == (nodes > 1), r[case]["describe"]
    for case in ("fp16", "bf16", "fp16_near_max"):
        assert 0 < r[case]["bound_ratio"] <= 1.0, case
    assert r["fp16_near_max"]["max_grad"] == pytest.approx(60000.0)
    assert r["bf16"]["max_error"] > r["fp16"]["max_error"] > r["engine"]["max_error"]
    assert r["accumulation"]["launched_in_no_sync"] == 0
    assert r["accumulation"]["max_error"] <= 1e-6
    assert r["probe"][0] is False and "query" in r["probe"][1].lower()   # this MPICH: no CUDA


TRAIN = ["--max-steps", 20, "--epochs", 1, "--deterministic", "--optimizer", "sgd", "--lr", 0.05,
         "--seed", 4]


def _train(n, tmp_path, name, flags, env=None):
    return trained_params(tmp_path, name, n, TRAIN + list(flags), env=env)


_difference = param_difference


@pytest.mark.mpi
def test_engine_accumulation_and_fallback_match_the_plain_path(tmp_path):
    _, plain, _ = _train(2, tmp_path, "plain", ["--bucket-mb", 0])
    run, engine, records = _train(2, tmp_path, "engine", ["--bucket-mb", 0.05])
    assert "overlapped with backward" in run.stdout and "shared-memory windows" in run.stdout
    assert _difference(engine, plain) == 0.0                  # 2 ranks: same sums, bitwise
    torch.manual_seed(4)
    model = build_model("digitnet", (1, 8, 8), 10)
    initial = {k: v.double() for k, v in model.state_dict().items()}
    assert _difference(plain, initial) > 1e-3                 # it did train
    epoch = next(r for r in records if r["event"] == "epoch")
    assert {"comm_ms", "comm_busy_ms", "comm_cpu_ms", "backward_ms", "data_ms",
            "optimizer_ms"} <= set(epoch)
    assert epoch["comm_busy_ms"] > 0 and epoch["comm_cpu_ms"] > 0

    _, accumulated, _ = _train(2, tmp_path, "accum", ["--bucket-mb", 0.05, "--accum-steps", 4])
    assert _difference(accumulated, plain) <= 1e-5            # 4 x 4 samples == 16 samples

    fallback, serialized, _ = _train(2, tmp_path, "serialized",
                                     ["--bucket-mb", 0.05, "--shared-memory", "off"],
                                     env={"MPICNN_THREAD_LEVEL": "serialized"})
    assert fallback.stdout.count("not MPI_THREAD_MULTIPLE") == 1
    assert "not overlapped" in fallback.stdout
    assert _difference(serialized, plain) == 0.0


@pytest.mark.mpi
def test_hierarchical_engine_on_two_fake_nodes_matches_flat(tmp_path):
    env = {"MPICNN_RANKS_PER_NODE": "2"}
    _, flat, _ = _train(4, tmp_path, "flat", ["--bucket-mb", 0], env=env)
    run, hierarchical, _ = _train(4, tmp_path, "hier",
                                  ["--bucket-mb", 0.05, "--hierarchical"], env=env)
    assert "hierarchical (2 node(s)" in run.stdout
    assert _difference(hierarchical, flat) <= 1e-6


def test_plain_path_hands_the_reducer_the_event_that_its_gradients_are_written():
    """On CUDA the reducer's side stream must wait for the concatenation (no stale reads)."""
    class Recording:
        ready = object()

        def ready_event(self):
            return self.ready

        def __call__(self, key, flat, ready=None):
            self.got = (key, ready)
            flat.mul_(0.5)           # stands in for the average over two ranks

    strategy = object.__new__(AllreduceStrategy)
    strategy.params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    for p in strategy.params:
        p.grad = torch.full_like(p, 4.0)
    strategy.reducer = Recording()
    strategy._plain_allreduce()
    assert strategy.reducer.got[1] is Recording.ready
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in strategy.params)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [3, 4, 5])
def test_ring_sums_like_mpi_and_ends_bitwise_equal_on_every_rank(ranks):
    """Empty segments (fewer elements than ranks), fp32 and the bf16 wire dtype."""
    run = mpirun(ranks, [], script=ROOT / "tests" / "ring_check.py", timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("close=True same_on_all=True") == 12, run.stdout
    assert "failures=0" in run.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("per_node,flags,names", [
    ("1", [], "flat ring (mpicnn's, large buckets)"),
    ("1", ["--bucket-mb", 0], "flat ring (mpicnn's, large buckets)"),
    ("2", [], "each rank's slice summed across nodes by mpicnn's ring"),
    ("2", ["--hierarchical"], "Reduce, leaders' ring, Bcast"),
])
def test_ring_across_three_fake_nodes_equals_the_mpi_allreduce(tmp_path, per_node, flags, names):
    """3 nodes (of 1 or 2 ranks): --cross-node ring (the default) against mpi; WideNet's
    2.4 MB of gradients make buckets (and 2-rank slices) above the ring's 1 MiB minimum."""
    env = {"MPICNN_RANKS_PER_NODE": per_node}
    ranks = 3 * int(per_node)
    common = ["--model", "tests.custom_model:WideNet", "--max-steps", 6, *flags]
    run, ring, _ = _train(ranks, tmp_path, "ring", [*common], env=env)
    assert names in run.stdout, run.stdout[-2000:]
    mpi_run, mpi, _ = _train(ranks, tmp_path, "mpi", [*common, "--cross-node", "mpi"], env=env)
    assert "ring" not in mpi_run.stdout.split("gradient sync:")[1].splitlines()[0]
    assert _difference(ring, mpi) <= 1e-6


# --- --overlap-forward ---------------------------------------------------------------------
def _two_layer_run(deferred: bool):
    """Two steps of a 2-layer model; with ``deferred`` the second layer's update waits for
    its forward, while the schedule changes the lr in between (as the loop does)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    waits = []
    update = DeferredUpdate(model, optimizer, lambda: waits.append(1)) if deferred else None
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    seen = []
    for lr in (0.1, 0.05):
        optimizer.param_groups[0]["lr"] = lr
        if update is not None:
            update.land()                  # as zero_grad does, before the grads go
        optimizer.zero_grad()
        model(x).square().mean().backward()
        if update is None:
            optimizer.step()
        else:
            update.hold(list(model[2].parameters()))
            before = model[2].weight.clone()
            update.step(optimizer.step)
            seen.append(torch.equal(before, model[2].weight))   # not yet updated
        optimizer.param_groups[0]["lr"] = 99.0                   # the schedule moved on
    model(x)                                                     # lands the last update
    return [p.detach().clone() for p in model.parameters()], seen, waits


def test_deferred_update_lands_at_forward_with_its_own_step_settings():
    plain, _, _ = _two_layer_run(False)
    deferred, held, waits = _two_layer_run(True)
    assert held == [True, True] and len(waits) == 2
    assert all(torch.equal(a, b) for a, b in zip(plain, deferred))      # bitwise


def test_deferred_update_refuses_a_non_finite_pending_gradient():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    update = DeferredUpdate(model, optimizer, lambda: None)
    model(torch.ones(1, 2)).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    update.hold(list(model[1].parameters()))
    update.step(optimizer.step)
    with pytest.raises(MpicnnError, match="non-finite gradient in the update that "
                                          "--overlap-forward deferred"):
        model(torch.ones(1, 2))


@pytest.mark.parametrize("flags", [["--clip-grad-norm", "1"], ["--amp", "fp16"],
                                   ["--nan-policy", "skip"], ["--mode", "ps-sync"],
                                   ["--bucket-mb", "0"]])
def test_overlap_forward_refuses_what_needs_the_whole_step(flags):
    with pytest.raises(MpicnnError, match="--overlap-forward"):
        parse_config(["--overlap-forward", *flags])


@pytest.mark.mpi
@pytest.mark.parametrize("n,per_node", [(2, ""), (4, "2")])
def test_overlap_forward_trains_bitwise_like_the_synchronous_step(n, per_node, tmp_path):
    """Two fake nodes: windows within each, slices across; AdamW with a warmup + cosine
    schedule (the lr changes every step) and an evaluation and checkpoint mid-run."""
    env = {"MPICNN_RANKS_PER_NODE": per_node}
    flags = ["--bucket-mb", 0.05, "--optimizer", "adamw", "--lr", 0.01, "--warmup-epochs", 1,
             "--max-steps", 50, "--epochs", 2, "--batch-size", 64 // n]
    _, synchronous, _ = _train(n, tmp_path, "sync", flags, env=env)
    run, overlapped, records = _train(n, tmp_path, "overlap", [*flags, "--overlap-forward"],
                                      env=env)
    assert "each layer's update lands as its forward begins" in run.stdout
    assert _difference(overlapped, synchronous) == 0.0
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 2 and all(r["comm_in_forward_ms"] >= 0 for r in epochs)


def test_the_wait_for_a_deferred_update_is_marked_as_the_last_exchange():
    """The stall watch sees a rank waiting in forward for the last step's exchange as
    waiting at that exchange (so --stall-abort applies), and computing again after it."""
    class Recorder:
        status = (0, 1, 0.0)

        def mark(self, state, step):
            self.status = (state, step, 0.0)
            marks.append((state, step))

    marks = []
    guard = StepGuard(FailureConfig(), SimpleNamespace(size=1, rank=0, log=None))
    guard.watchdog = Recorder()
    guard.computing(5)                                   # step 5 done: computing step 6
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    during = []
    update = DeferredUpdate(model, optimizer, lambda: during.append(guard.watchdog.status[:2]),
                            guard.waiting_at_last_exchange)
    model(torch.ones(1, 2)).sum().backward()
    update.hold(list(model[1].parameters()))
    update.step(optimizer.step)
    model(torch.ones(1, 2))
    assert during == [(WAIT, 5)] and guard.watchdog.status[:2] == (COMPUTE, 6)
