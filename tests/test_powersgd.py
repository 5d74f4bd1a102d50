"""PowerSGD (``--compression powersgd[:RANK]``): DDP's hook's arithmetic, error feedback, training.

Against DDP's own ``powerSGD_hook`` on the same gradients (one process here, two
ranks in ``powersgd_check``), the defining property of error feedback, the bucket
bookkeeping, then real ``mpicnn.train`` runs and bad specs.
"""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import DIGITS, QUIET, ROOT, job_env, mpirun, param_difference, read_jsonl, \
    run_command, trained_params
from drill import assert_one_clean_error, run_job
from powersgd_check import FakeBucket

from mpicnn.cluster.errors import MpicnnError
from mpicnn.config import parse_config
from mpicnn.sync.allreduce.powersgd import PowerSGD, layout_of, low_rank, wire_fraction

SHAPES = [(16, 8, 3, 3), (16,), (32, 16), (3, 4), (10, 32), (), (10,), (16, 8, 3, 3)]
NUMEL = sum(torch.Size(s).numel() for s in SHAPES)


class Alone:
    """A reducer of one rank: the sums are the values themselves."""

    @staticmethod
    def sum(key, tensor):
        pass

    @staticmethod
    def run(work, ready=None):
        work()


def averaged(powersgd: PowerSGD, key, flat: torch.Tensor, shapes) -> torch.Tensor:
    """One step of ``powersgd`` on ``flat`` at one rank (whole before its start)."""
    if powersgd.compressing:
        powersgd.job(key, flat, shapes, Alone)()
    return flat


@pytest.fixture
def gloo_alone(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"file://{tmp_path}/rendezvous")
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("rank,warm_start,error_feedback", [
    (1, True, True), (2, True, True), (4, True, True),      # rank 4: QR, not Gram-Schmidt
    (2, False, True), (2, True, False)])
def test_the_same_as_ddps_hook_on_the_same_gradients(gloo_alone, rank, warm_start,
                                                     error_feedback):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook

    ddp_shapes = [s for s in SHAPES if s]             # DDP's hook cannot take a scalar
    numel = sum(torch.Size(s).numel() for s in ddp_shapes)
    start = 2
    state = hook.PowerSGDState(None, matrix_approximation_rank=rank, start_powerSGD_iter=start,
                               warm_start=warm_start, use_error_feedback=error_feedback)
    mine = PowerSGD(rank, start, 1, warm_start=warm_start, error_feedback=error_feedback)
    gen = torch.Generator().manual_seed(rank)
    for step in range(6):
        for index in (0, 1):                          # two buckets: seeds drawn in bucket order
            grad = torch.randn(numel, generator=gen) + 1.0
            ddp = grad.clone()
            bucket = FakeBucket(ddp, ddp_shapes, index)
            bucket.is_last = lambda index=index: index == 1
            hook.powerSGD_hook(state, bucket).wait()
            ours = averaged(mine, (index,), grad.clone(), ddp_shapes)
            torch.testing.assert_close(ours, ddp, rtol=1e-6, atol=1e-6)
            if step >= start:                         # compressed: not the gradient any more
                assert (ours - grad).abs().max() > 0.1
        mine.step_done()


@pytest.mark.mpi
def test_two_ranks_equal_ddps_hook_on_every_collective(tmp_path):
    ours, theirs = tmp_path / "mpicnn.pt", tmp_path / "ddp.pt"
    script = ROOT / "tests" / "powersgd_check.py"
    mpirun(2, ["mpicnn", ours], script=script, timeout=300)
    run_command([sys.executable, script, "ddp", theirs], timeout=300, env=job_env(),
                check=True)
    results, peer = torch.load(ours), torch.load(theirs)
    ddp = peer["ddp"]
    assert (ddp[-1] - ddp[0]).abs().max() > 0.1       # the steps differ
    for name in ("flat", "hierarchical", "windows"):
        torch.testing.assert_close(results[name], ddp, rtol=1e-6, atol=1e-6)
        assert bool(results[f"{name} equal on ranks"])
    # the benchmark's DDP peer: the stock hook, a gloo group a bucket, sums and draws alike
    stock = peer["stock hook"]
    assert stock.abs().max() > 0
    assert torch.equal(stock, peer["a group a bucket"])


def _steps(powersgd: PowerSGD, grads):
    """Run ``grads`` (one bucket a step); yield (input with the residual, output, residual)."""
    residual = torch.zeros(NUMEL)
    for grad in grads:
        given = grad + residual
        out = averaged(powersgd, (0,), grad.clone(), SHAPES)
        residual = powersgd._states[(0,)].error.clone() if powersgd.error_feedback else \
            torch.zeros(NUMEL)
        powersgd.step_done()
        yield given, out, residual


def test_error_feedback_keeps_what_compression_left_out_and_returns_it():
    gen = torch.Generator().manual_seed(0)
    slow = torch.randn(NUMEL, generator=gen)
    grads = [slow + 0.3 * torch.randn(NUMEL, generator=gen) for _ in range(100)]
    total_in, total_out = torch.zeros(NUMEL), torch.zeros(NUMEL)
    gaps, residuals = [], []
    for grad, (given, out, residual) in zip(grads, _steps(PowerSGD(1, 0, 1), grads)):
        # the residual is what went in (gradient + last residual) minus what came out
        torch.testing.assert_close(residual, given - out, rtol=0, atol=1e-5)
        total_in += grad
        total_out += out
        # nothing is lost: the updates so far plus the residual are the gradients so far
        torch.testing.assert_close(total_out + residual, total_in, rtol=1e-5, atol=1e-3)
        gaps.append(float((total_out - total_in).norm() / total_in.norm()))
        residuals.append(float(residual.norm()))
    # rank 1 leaves much out, but the residual stops growing, so the updates' sum
    # approaches the gradients' sum (about 1/steps)
    assert residuals[0] > 0.5 * float(slow.norm())
    assert max(residuals[50:]) < 1.5 * max(residuals[:50])
    assert gaps[-1] < 0.2 * gaps[4] and gaps[-1] < 0.15
    # without error feedback the bias stays
    unfed = sum(out for _, out, _ in _steps(PowerSGD(1, 0, 1, error_feedback=False), grads))
    assert float((unfed - total_in).norm() / total_in.norm()) > 0.5


def test_tensors_travel_whole_or_as_factors_by_ddps_rule():
    layout = layout_of(SHAPES, 2)
    # vectors, the scalar and the 3 x 4 matrix ((3 + 4) x 2 x 2 > 12) go whole, in order
    assert layout.whole == [(1152, 16), (1680, 12), (2012, 1), (2013, 10)]
    # matrices grouped by shape in order of first appearance (DDP's P and Q order)
    assert layout.matrices == [(0, 16, 72, 2), (2023, 16, 72, 2), (1168, 32, 16, 2),
                               (1692, 10, 32, 2)]
    assert layout.p_numel == 2 * (16 + 16 + 32 + 10)
    assert layout.q_numel == 2 * (72 + 72 + 16 + 32)
    assert wire_fraction(SHAPES, 2) == pytest.approx(
        (39 + layout.p_numel + layout.q_numel) / NUMEL)
    assert layout_of([(8, 8)], 1).matrices == [(0, 8, 8, 1)]        # 16 x 2 < 64
    assert layout_of([(4, 4)], 1).whole == [(0, 16)]                # 8 x 2 = 16: not less
    assert layout_of([(64, 64)], 100).whole == [(0, 4096)]          # the rank is too high


def test_a_rebuilt_bucket_carries_each_residual_and_an_unchanged_one_keeps_its_state():
    shapes = {0: (8, 6), 1: (8,), 2: (12, 10)}
    numel = [48, 8, 120]
    powersgd = PowerSGD(1, 0, 1)
    gen = torch.Generator().manual_seed(3)
    flats = {(0, 1): torch.randn(56, generator=gen), (2,): torch.randn(120, generator=gen)}
    for key, flat in flats.items():
        averaged(powersgd, key, flat, [shapes[i] for i in key])
    errors = {key: powersgd._states[key].error.clone() for key in flats}
    q_of_2 = powersgd._states[(2,)].q
    powersgd.regroup([[2], [1, 0]], numel)
    # parameter 2's bucket is unchanged: same residual, same Q (warm start goes on)
    assert powersgd._states[(2,)].q is q_of_2 and (2,) in powersgd._seeded
    # 1 and 0 swapped places: their residuals moved with them; a new Q will be drawn
    moved = powersgd._states[(1, 0)].error
    assert torch.equal(moved, torch.cat([errors[(0, 1)][48:], errors[(0, 1)][:48]]))
    assert (0, 1) not in powersgd._states and (1, 0) not in powersgd._seeded
    assert torch.equal(powersgd._states[(2,)].error, errors[(2,)])


def test_specs_and_their_errors():
    assert low_rank("powersgd") == 1 and low_rank("powersgd:4") == 4
    assert low_rank("none") is None and low_rank("bf16") is None
    for bad in ("powersgd:0", "powersgd:x", "powersgd:", "powersgd:-1"):
        with pytest.raises(MpicnnError, match="whole number >= 1"):
            low_rank(bad)
    cfg = parse_config(["--compression", "powersgd:2", "--powersgd-start", "5"])
    assert (cfg.sync.compression, cfg.sync.powersgd_start) == ("powersgd:2", 5)
    assert parse_config([]).sync.powersgd_start == 1000          # DDP's default
    for argv, message in ((["--compression", "powersgd2"], "invalid choice 'powersgd2'"),
                          (["--powersgd-start", "-1"], "must not be negative"),
                          (["--compression", "powersgd", "--mode", "ps-sync"],
                           "needs --mode allreduce"),
                          (["--compression", "powersgd", "--amp", "fp16"], "--amp fp16"),
                          (["--compression", "powersgd:2", "--nan-policy", "skip"],
                           "--nan-policy skip")):
        with pytest.raises(MpicnnError, match=message):
            parse_config(argv)


@pytest.mark.mpi
@pytest.mark.parametrize("spec", ["powersgd:0", "powersgd:x"])
def test_a_bad_rank_ends_the_job_with_one_line(spec):
    outcome = run_job(2, ["--data", DIGITS, "--compression", spec, "--max-steps", 2,
                          "--epochs", 1, *QUIET])
    line = assert_one_clean_error(outcome, f"--compression {spec}")
    assert "whole number >= 1" in line


@pytest.mark.gpu
def test_on_cuda_through_the_reducers_stream_and_staged_buffers_as_on_the_cpu(monkeypatch):
    from mpi4py import MPI

    from mpicnn.sync.allreduce.codec import Codec
    from mpicnn.sync.allreduce.collectives import FlatAllreduce
    from mpicnn.sync.allreduce.reducer import Reducer

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    collective = FlatAllreduce(MPI.COMM_SELF)
    reducer = Reducer(collective, Codec("none", 1), torch.device("cuda"))
    assert reducer.buffers.staged                      # the PyPI MPI is not CUDA-aware
    on_cpu, on_gpu = PowerSGD(2, 0, 1), PowerSGD(2, 0, 1)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        grad = torch.randn(NUMEL, generator=gen)
        expected = averaged(on_cpu, (0,), grad.clone(), SHAPES)
        flat = grad.cuda()
        Reducer.consume(on_gpu.job((0,), flat, SHAPES, reducer, reducer.ready_event())())
        torch.testing.assert_close(flat.cpu(), expected, rtol=1e-4, atol=1e-4)
        assert (flat.cpu() - grad).abs().max() > 0.1
    collective.free()


# --- real training ----------------------------------------------------------------------

TRAIN = ["--data", DIGITS, "--bucket-mb", 0.05, "--optimizer", "sgd", "--lr", 0.05,
         "--seed", 2, "--deterministic", *QUIET]
SHORT = [*TRAIN, "--epochs", 1, "--max-steps", 20]
FROM_0 = ["--compression", "powersgd:2", "--powersgd-start", 0]


@pytest.mark.mpi
def test_training_learns_and_every_rank_holds_the_same_model(tmp_path):
    out = tmp_path / "run"
    run = mpirun(2, ["train", out, *TRAIN, "--epochs", 3, "--batch-size", 32,
                     "--metrics", tmp_path / "m.jsonl", *FROM_0],
                 script=ROOT / "tests" / "powersgd_check.py", timeout=300)
    assert "PowerSGD rank 2 from step 0, as DDP's powerSGD_hook" in run.stdout
    assert "buckets rebuilt" in run.stdout              # the residuals crossed the rebuild
    epochs = [r for r in read_jsonl(tmp_path / "m.jsonl") if r["event"] == "epoch"]
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert epochs[-1]["val_acc"] > 0.8                  # 10 classes: chance is 0.1
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


@pytest.mark.mpi
def test_powersgd_composes_with_hierarchy_overlap_and_factors(tmp_path):
    _, windows, _ = trained_params(tmp_path, "windows", 2, [*SHORT, *FROM_0])
    # the same sums through Reduce + Bcast, the last bucket on its own channel and the
    # others landing in the next forward: bitwise the same training
    run, other, _ = trained_params(tmp_path, "hier", 2, [*SHORT, *FROM_0, "--hierarchical",
                                                          "--overlap-forward"])
    assert "lands as its forward begins" in run.stdout
    assert param_difference(windows, other) == 0.0
    # before --powersgd-start: the ordinary average, bitwise
    _, whole, _ = trained_params(tmp_path, "none", 2, SHORT)
    _, later, _ = trained_params(tmp_path, "later", 2, [*SHORT, "--compression",
                                                         "powersgd:2"])
    assert param_difference(whole, later) == 0.0 and param_difference(whole, windows) > 1e-4
    # a factored layer keeps its exact factors, the rest is compressed
    run, factored, _ = trained_params(tmp_path, "factors", 2, [*SHORT, *FROM_0,
                                                               "--sufficient-factors", "on"])
    assert "sent as the batch's factors" in run.stdout and "stay exact" in run.stdout
    assert 0 < param_difference(factored, windows) and \
        all(bool(torch.isfinite(v).all()) for v in factored.values())
    # the plain path: all gradients one bucket, compressed too
    run, plain, _ = trained_params(tmp_path, "plain", 2, [*SHORT, *FROM_0, "--bucket-mb", 0])
    assert "plain: one blocking Allreduce" in run.stdout and "PowerSGD rank 2" in run.stdout
    assert param_difference(plain, whole) > 1e-4 and \
        all(bool(torch.isfinite(v).all()) for v in plain.values())


# --- bench cluster: PowerSGD against DDP's hook --------------------------------------

def test_bench_pairs_powersgd_with_ddps_hook_at_the_same_rank_and_start():
    from mpicnn.bench import cluster as bench

    opts = bench.parse_args([])
    assert opts.model == "resnet18" and bench.variants_of(",".join(bench.LIKE_FOR_LIKE))
    assert {"mpicnn powersgd", "DDP gloo powersgd"} <= set(opts.variants.split(","))
    ours = bench.flags_of("mpicnn powersgd", 4, 3)
    theirs = bench.flags_of("DDP gloo powersgd", 4, 3)
    assert ours == ["--compression", "powersgd:4", "--powersgd-start", "3"]
    assert theirs == ["--ddp-hook", "powersgd", *ours]      # the peer reads the same flags
    assert [bench.peer_of(v) for v in ("mpicnn powersgd", "mpicnn hier powersgd",
                                       "mpicnn bf16", "mpicnn")] == \
        ["DDP gloo powersgd", "DDP gloo powersgd", "DDP gloo fp16", "DDP gloo"]
    # the wire: PowerSGD's share of the model's values, both sides alike; factors aside
    shapes = [(64, 3, 3, 3), (64,), (4096, 512), (512,), (10, 512), (10,)]
    linears = [(512, 4096), (512, 10)]
    share = bench.wire_of("DDP gloo powersgd", 2, 2, 8, linears, shapes, 2)
    assert share == pytest.approx(wire_fraction(shapes, 2)) and share < 0.05
    assert bench.wire_of("mpicnn powersgd", 2, 2, 8, linears, shapes, 2) == \
        pytest.approx(wire_fraction([s for s in shapes if s != (4096, 512)], 2))
    runs = {"mpicnn powersgd": [{"images_per_s": 90}], "DDP gloo powersgd": [{"images_per_s": 60}],
            "DDP gloo": [{"images_per_s": 30}]}
    rows = {r["variant"]: r for r in bench.summarize(runs, 2, 2, "1gbit", 8, 4 * 2_200_000,
                                                      linears, shapes, 2)}
    assert rows["mpicnn powersgd"]["x_ddp"] == pytest.approx(1.5)         # like for like
    assert rows["mpicnn powersgd"]["x_ddp_fp32"] == pytest.approx(3.0)
    assert rows["DDP gloo powersgd"]["link_bound"] > 10 * rows["DDP gloo"]["link_bound"]
    for bad in (["--powersgd-start", "1"], ["--powersgd-rank", "0"]):
        with pytest.raises(MpicnnError, match="--powersgd-start 2 to 5"):
            bench.main(bad)
