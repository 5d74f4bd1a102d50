"""``--mode pipeline``: cut points, schedules and grid as pure functions; then real runs
(mpirun) that equal a single process, bound activation memory, and resume across modes."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DIGITS, final, max_diff, mpirun, records, train

from mpicnn.cluster.errors import MpicnnError
from mpicnn.config import parse_config
from mpicnn.sync.pipeline import partition
from mpicnn.sync.pipeline.grid import Grid, check_grid, check_settings
from mpicnn.sync.pipeline.schedule import SCHEDULES, ideal_bubble, in_flight
from mpicnn.training.models import MODELS, build_model, sequential_form

# --- schedules -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_run_every_micro_batch_once_in_order(name):
    for stages, micro in itertools.product(range(1, 5), range(1, 9)):
        for stage in range(stages):
            ops = SCHEDULES[name](micro, stages, stage)
            forwards = [i for op, i in ops if op == "F"]
            backwards = [i for op, i in ops if op == "B"]
            assert forwards == backwards == list(range(micro))     # in order each way
            assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(micro))
            alive = in_flight(ops)
            if name == "1f1b":                 # bounded by the stages, not the micro-batches
                assert alive <= min(micro, stages - stage)
            else:
                assert alive == micro


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_complete_without_deadlock(name):
    """Every stage running its list in order, blocking only on data it needs, finishes."""
    for stages, micro in itertools.product(range(1, 5), range(1, 9)):
        lists = [SCHEDULES[name](micro, stages, s) for s in range(stages)]
        done, position = set(), [0] * stages
        while any(p < len(ops) for p, ops in zip(position, lists)):
            moved = False
            for s, ops in enumerate(lists):
                if position[s] == len(ops):
                    continue
                op, i = ops[position[s]]
                needs = ({("F", s - 1, i)} if op == "F" and s > 0 else set()) | \
                    ({("B", s + 1, i)} if op == "B" and s < stages - 1 else set())
                if needs <= done:
                    done.add((op, s, i))
                    position[s] += 1
                    moved = True
            assert moved, f"{name} deadlocks at K={stages} M={micro}: {position}"


def test_ideal_bubble():
    assert ideal_bubble(1, 4) == 3 / 4 and ideal_bubble(8, 1) == 0.0
    assert ideal_bubble(8, 4) == pytest.approx(3 / 11)


# --- cut points ------------------------------------------------------------------------


def brute_force(costs, stages):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        worst = max(partition.stage_sums(costs, list(cuts)))
        best = worst if best is None else min(best, worst)
    return best


def test_balanced_cuts_are_optimal():
    gen = torch.Generator().manual_seed(1)
    for n, stages in [(6, 2), (7, 3), (9, 4), (5, 5)]:
        for _ in range(10):
            costs = torch.rand(n, generator=gen).tolist()
            cuts = partition.balanced_cuts(costs, stages)
            assert len(cuts) == stages - 1 and cuts == sorted(set(cuts))
            assert max(partition.stage_sums(costs, cuts)) == pytest.approx(
                brute_force(costs, stages))


def test_split_and_cut_errors_are_one_line():
    assert partition.parse_split("") == [] and partition.parse_split("4,9") == [4, 9]
    for bad in ("a,b", "4,4", "0,3", "5,2"):
        with pytest.raises(MpicnnError, match="--split"):
            partition.parse_split(bad)
    with pytest.raises(MpicnnError, match="more than the model's 3 layers"):
        partition.balanced_cuts([1.0, 1.0, 1.0], 4)
    with pytest.raises(MpicnnError, match="does not cut 5 layers into 3 stages"):
        partition.check_cuts([2], 3, 5)
    with pytest.raises(MpicnnError, match="does not cut 5 layers"):
        partition.check_cuts([2, 5], 3, 5)
    assert partition.check_cuts([1, 3], 3, 5) == [1, 3]


def test_grid_is_replica_major():
    grid = [Grid(8, 4, r) for r in range(8)]
    assert [(g.stage, g.replica) for g in grid] == \
        [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)]
    assert all(g.rank_of(g.stage, g.replica) == g.rank for g in grid)
    assert grid[0].first and grid[3].last and grid[0].replicas == 2
    check_grid(4, 8)
    with pytest.raises(MpicnnError, match="does not divide the 6 ranks"):
        check_grid(4, 6)


@pytest.mark.parametrize("flags, named", [
    (["--accum-steps", "2"], "--accum-steps"), (["--sync-bn"], "--sync-bn"),
    (["--channels-last"], "--channels-last"), (["--amp", "bf16"], "--amp bf16"),
    (["--amp", "fp16"], "--amp fp16"), (["--clip-grad-norm", "1.0"], "--clip-grad-norm")])
def test_settings_pipeline_cannot_take_are_one_line(flags, named):
    base = ["--mode", "pipeline", "--stages", "2"]
    check_settings(parse_config(base))
    check_settings(parse_config(base + ["--amp", "off", "--clip-grad-norm", "0"]))
    with pytest.raises(MpicnnError, match=f"^{named} is not supported with --mode pipeline") \
            as raised:
        check_settings(parse_config(base + flags))
    assert "\n" not in str(raised.value) and raised.value.collective


# --- the sequential form and the balance -------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_has_a_sequential_form(name):
    shape = (1, 8, 8) if name in ("digitnet", "lenet") else (3, 32, 32)
    model = build_model(name, shape, 10).eval()
    x = torch.randn(3, *shape)
    y = x
    for layer in sequential_form(model, name):
        y = layer(y)
    torch.testing.assert_close(y, model(x))
    names = {n for n, _ in model.named_parameters()}
    assert len(names) == len(list(model.parameters()))    # the form shares the parameters


def test_a_model_without_sequential_form_is_one_line():
    from custom_model import Branchy, TinyNet

    assert len(sequential_form(TinyNet((1, 8, 8), 10), "TinyNet")) == 2
    with pytest.raises(MpicnnError, match="no sequential form"):
        sequential_form(Branchy((1, 8, 8), 10), "Branchy")


def test_measuring_leaves_the_layers_as_they_were():
    model = build_model("fashionnet", (1, 8, 8), 10)
    layers = sequential_form(model, "fashionnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    times = partition.measure_times(layers, (1, 8, 8), 4, torch.device("cpu"), repeats=1)
    assert len(times) == len(layers) and all(t > 0 for t in times)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def layer_flops(layers, input_shape, batch: int) -> list[int]:
    """Floating-point operations of one forward+backward of every layer: what
    ``partition.measure_times`` times, counted instead of timed (the same on any machine)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = []
    for layer, shape in zip(layers, partition.activation_shapes(layers, input_shape)):
        x = torch.randn(batch, *shape).requires_grad_()
        with FlopCounterMode(display=False) as counter:
            out = layer(x.clone())          # a non-leaf input, as measure_times gives
            out.backward(torch.ones_like(out))
        flops.append(counter.get_total_flops())
    return flops


def test_resnet18_sequential_form_balances_on_its_layer_costs():
    """The slowest stage takes at most ~1.3 x the mean stage cost (K = 2 and 4): the form's
    layers are fine enough, and the cuts find the balance (costs as counted operations)."""
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10)
    layers = sequential_form(model, "resnet18")
    costs = layer_flops(layers, (3, 32, 32), 1)
    assert len(costs) == len(layers) and sum(costs) > 0
    for stages in (2, 4):
        sums = partition.stage_sums(costs, partition.balanced_cuts(costs, stages))
        assert max(sums) <= 1.3 * sum(sums) / stages, (stages, sums)
    by_params = partition.balanced_cuts(partition.param_bytes(layers), 4)
    assert len(by_params) == 3


# --- real runs --------------------------------------------------------------------------

COMMON = ["--data", DIGITS, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05",
          "--schedule", "constant", "--warmup-epochs", "0", "--deterministic", "true"]
STEPS = ["--max-steps", "20"]
GLOBAL_BATCH = 32


def pipeline(stages: int, replicas: int, schedule: str, micro: int) -> list:
    return ["--mode", "pipeline", "--stages", stages, "--pipeline-schedule", schedule,
            "--micro-batches", micro, "--batch-size", GLOBAL_BATCH // replicas]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process at the global batch, digitnet (no BatchNorm), 20 SGD steps."""
    tmp = tmp_path_factory.mktemp("pipeline-reference")
    return train(tmp, "ref", 1, *COMMON, *STEPS, "--batch-size", GLOBAL_BATCH)


GRIDS = [(2, 1, "gpipe", 8), (2, 1, "1f1b", 8), (2, 2, "gpipe", 4), (2, 2, "1f1b", 4),
         (4, 1, "1f1b", 8)]


@pytest.mark.mpi
@pytest.mark.parametrize("stages,replicas,schedule,micro", GRIDS,
                         ids=[f"{k}x{r}-{s}-M{m}" for k, r, s, m in GRIDS])
def test_pipeline_equals_single_process(reference, tmp_path, stages, replicas, schedule, micro):
    """Parameters within 1e-5 after 20 steps, evaluation equal, memory bounded (1F1B)."""
    ref_dir, ref_end = reference
    out, end = train(tmp_path, "pp", stages * replicas, *COMMON, *STEPS,
                     *pipeline(stages, replicas, schedule, micro))
    assert max_diff(final(ref_dir), final(out)) < 1e-5
    assert max_diff(final(out), final(ref_dir)) < 1e-5
    assert set(final(out)["model"]) == set(final(ref_dir)["model"])   # an ordinary state dict
    assert end["val_loss"] == pytest.approx(ref_end["val_loss"], abs=1e-5)
    assert end["val_acc"] == ref_end["val_acc"]
    epoch = records(out, "epoch")[-1]
    assert epoch["train_loss"] == pytest.approx(records(ref_dir, "epoch")[-1]["train_loss"],
                                                abs=1e-5)
    assert end["stages"] == stages and end["replicas"] == replicas
    assert len(epoch["stage_bubble"]) == stages and all(0 <= b < 1 for b in
                                                         epoch["stage_bubble"])
    peak, micro_mb = epoch["stage_activation_peak_mb"], epoch["stage_activation_micro_mb"]
    assert all(m > 0 for m in micro_mb)
    if schedule == "1f1b":         # at most K micro-batches' activations alive per rank
        # MB rounded to 6 places in the record: allow the rounding of K + 1 values
        assert all(p <= stages * m + (stages + 1) * 1e-6 for p, m in zip(peak, micro_mb)), \
            (peak, micro_mb)
    else:                          # GPipe keeps all M on the first stage: the meter sees it
        assert peak[0] >= micro * micro_mb[0] * 0.999, (peak, micro_mb)


@pytest.mark.mpi
def test_checkpoints_cross_modes(reference, tmp_path):
    """A pipeline checkpoint resumes in allreduce mode and an allreduce one in pipeline
    mode; both continuations equal the uninterrupted single process."""
    ref_dir, _ = reference
    half = ["--max-steps", "10"]
    pp_half, _ = train(tmp_path, "pp-half", 2, *COMMON, *half, *pipeline(2, 1, "1f1b", 4))
    assert final(pp_half)["mode"] == "pipeline"
    ar_rest, _ = train(tmp_path, "ar-rest", 1, *COMMON, *STEPS, "--batch-size", GLOBAL_BATCH,
                       "--resume", pp_half / "final.pt")
    assert max_diff(final(ref_dir), final(ar_rest)) < 1e-5
    ar_half, _ = train(tmp_path, "ar-half", 1, *COMMON, *half, "--batch-size", GLOBAL_BATCH)
    pp_rest, _ = train(tmp_path, "pp-rest", 4, *COMMON, *STEPS, *pipeline(2, 2, "gpipe", 2),
                       "--resume", ar_half / "final.pt")
    assert max_diff(final(ref_dir), final(pp_rest)) < 1e-5


@pytest.mark.mpi
def test_pipeline_prints_its_cut_and_takes_any_cut(tmp_path):
    """--split overrides the balance; the startup line names the grid and the cuts. A stage
    may begin with an in-place layer (digitnet's ReLU at 1) or hold no parameters at all
    (TinyNet's Flatten)."""
    done = mpirun(2, [*COMMON, "--max-steps", "6", "--progress", "off",
                      *pipeline(2, 1, "gpipe", 2), "--split", "1"])
    assert "2 stages x 1 replicas" in done.stdout + done.stderr
    assert "cut at [1] by --split" in done.stdout + done.stderr
    done = mpirun(2, [*COMMON, "--max-steps", "6", "--progress", "off", "--model",
                      "tests.custom_model:TinyNet", *pipeline(2, 1, "1f1b", 2), "--split", "1"])
    assert "stage 0: layers 0-0" in done.stdout + done.stderr


def test_pipeline_and_allreduce_checkpoints_resume_each_other_ps_ones_do_not():
    from types import SimpleNamespace

    from mpicnn.checkpoint.state import check_compatible

    def cfg(mode):
        return SimpleNamespace(training=SimpleNamespace(model="digitnet"),
                               sync=SimpleNamespace(mode=mode))

    for saved, ours in [("pipeline", "allreduce"), ("allreduce", "pipeline")]:
        check_compatible({"model_name": "digitnet", "mode": saved}, cfg(ours), "c.pt")
    with pytest.raises(MpicnnError, match="mode 'ps-sync'"):
        check_compatible({"model_name": "digitnet", "mode": "ps-sync"}, cfg("pipeline"), "c.pt")
