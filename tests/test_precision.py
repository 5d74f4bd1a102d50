"""--amp and --clip-grad-norm: the loss scale, the gradient's finalize, the NaN policy's view."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import DIGITS, ListLoader, mpirun, records, train
from torch import nn

from mpicnn.checkpoint.state import RunState
from mpicnn.cluster.errors import MpicnnError
from mpicnn.config import parse_config
from mpicnn.config.failure import FailureConfig
from mpicnn.observe.steps import StepStats
from mpicnn.resilience.step_guard import StepGuard
from mpicnn.sync.contract import Strategy
from mpicnn.training.loop import train_epoch
from mpicnn.training.optim import build_optimizer
from mpicnn.training.precision import LossScale, Precision, clip_grad_norm

LOG = logging.getLogger("test_precision")


def test_clip_grad_norm_is_torchs():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(params, 0.5)
    total = clip_grad_norm(grads, 0.5)
    assert total == pytest.approx(float(expected))
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad)
    assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))) == \
        pytest.approx(0.5, rel=1e-4)
    small = [torch.full((3,), 0.01)]
    clip_grad_norm(small, 0.5)                       # under the limit: unchanged
    assert torch.equal(small[0], torch.full((3,), 0.01))


def test_loss_scale_backs_off_grows_and_round_trips():
    scale = LossScale("cpu", init_scale=8.0, growth_interval=2)
    grads = [torch.tensor([8.0, 16.0])]
    found = torch.zeros(())
    scale.unscale_(grads, found)
    assert torch.equal(grads[0], torch.tensor([1.0, 2.0])) and float(found) == 0
    bad = [torch.tensor([1.0, float("inf")])]
    scale.unscale_(bad, found)
    assert float(found) == 1
    scale.update(found)                               # overflow: halve
    assert float(scale.scale) == 4.0
    for _ in range(2):                                # two finite steps: double
        scale.update(torch.zeros(()))
    assert float(scale.scale) == 8.0
    state = scale.state_dict()
    assert state["overflows"] == 1 and state["_growth_tracker"] == 0
    other = LossScale("cpu")
    other.load_state_dict(state)
    assert other.state_dict() == state
    fresh = torch.amp.GradScaler("cpu")               # the keys of torch's own scaler
    assert set(fresh.state_dict()) <= set(state)


def test_config_rejects_bad_amp_and_clip():
    cfg = parse_config(["--amp", "bf16", "--clip-grad-norm", "1.5"])
    assert (cfg.training.amp, cfg.training.clip_grad_norm) == ("bf16", 1.5)
    with pytest.raises(MpicnnError, match="--amp: invalid choice"):
        parse_config(["--amp", "fp8"])
    with pytest.raises(MpicnnError, match="--clip-grad-norm must not be negative"):
        parse_config(["--clip-grad-norm", "-1"])


# --- the loop with a one-rank strategy -------------------------------------------------

class _OneRank:
    size, rank, log = 1, 0, LOG

    class comm:
        @staticmethod
        def Allreduce(_inplace, buf, op=None):
            return None


class _Recording(Strategy):
    """A one-rank strategy that keeps the parameters as each step begins and its gradients."""

    def __init__(self, model, optimizer):
        super().__init__(_OneRank(), None)
        self.model, self.optimizer = model, optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        self.before, self.grads = [], []

    def zero_grad(self):
        self.before.append([p.detach().clone() for p in self.model.parameters()])
        super().zero_grad()

    def after_backward(self, finalize=None):
        super().after_backward(finalize)
        self.grads.append([p.grad.clone() for p in self.model.parameters()])


class _Boom(nn.Module):
    """Linear layer whose weight gradient is Inf at chosen steps (an fp16 overflow)."""

    def __init__(self, boom_steps=()):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        self.step, self.boom_steps = 0, set(boom_steps)
        self.body[1].weight.register_hook(self._grad)

    def forward(self, x):
        self.step += 1
        return self.body(x)

    def _grad(self, grad):
        return grad * float("inf") if self.step in self.boom_steps else grad


def _batches(n=6, nan_step=None):
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(1, n + 1):
        x = torch.randn(8, 1, 4, 4, generator=gen)
        if i == nan_step:
            x[0, 0, 0, 0] = float("nan")
        out.append((x, torch.randint(0, 4, (8,), generator=gen)))
    return out


def _train(model, optimizer, batches, precision, policy="abort", every=1000):
    torch.manual_seed(0)
    strategy = _Recording(model, torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
                          if optimizer == "adamw" else
                          build_optimizer(parse_config(["--optimizer", optimizer]).training,
                                          model.parameters(), 8))
    guard = StepGuard(FailureConfig(nan_policy=policy), _OneRank())
    stats = StepStats(every=every)
    train_epoch(model, ListLoader(batches), strategy, strategy, RunState(), len(batches), stats,
                scheduler=strategy.scheduler, global_batch=8, guard=guard,
                precision=precision)
    return strategy, guard, stats


@pytest.mark.parametrize("optimizer", ["adamw", "lars"])   # skipped on the device / by the loop
def test_an_overflow_is_skipped_without_counting_toward_the_nan_policy(optimizer):
    torch.manual_seed(0)
    model = _Boom(boom_steps={3, 4})
    precision = Precision("fp16", "cpu")
    strategy, guard, _ = _train(model, optimizer, _batches(6), precision, policy="abort")
    before = strategy.before
    for step in (3, 4):                  # the overflowing updates never landed
        for a, b in zip(before[step - 1], before[step]):
            assert torch.equal(a, b), step
    for step in (1, 2, 5):               # the others did
        assert any(not torch.equal(a, b) for a, b in zip(before[step - 1], before[step]))
    assert guard.overflows == 2 and guard.policy.skipped == 0 and not guard.pending
    state = precision.state_dict()
    assert state["scale"] == 2.0 ** 14 and state["overflows"] == 2     # backed off twice


def test_a_nan_loss_under_fp16_is_the_nan_policys():
    torch.manual_seed(0)
    model = _Boom()
    with pytest.raises(MpicnnError, match="non-finite loss or gradient at step 4") as caught:
        _train(model, "adamw", _batches(6, nan_step=4), Precision("fp16", "cpu"))
    assert not caught.value.collective        # this rank's loss: it reports, the job aborts
    torch.manual_seed(0)
    model = _Boom()
    strategy, guard, stats = _train(model, "adamw", _batches(6, nan_step=4),
                                    Precision("fp16", "cpu"), policy="skip", every=2)
    assert guard.policy.skipped == 1 and guard.overflows == 0
    for a, b in zip(strategy.before[3], strategy.before[4]):
        assert torch.equal(a, b)
    assert torch.isfinite(torch.as_tensor(stats.end_epoch(RunState()).train_loss))


def test_clipping_applies_to_the_averaged_gradient():
    torch.manual_seed(0)
    model = _Boom()
    batches = _batches(3)
    strategy, _, _ = _train(model, "sgd", batches, Precision("off", "cpu", clip=0.05))
    torch.manual_seed(0)
    plain = _Boom()
    for step, (x, y) in enumerate(batches):
        for p, value in zip(plain.parameters(), strategy.before[step]):
            p.data.copy_(value)
        plain.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        assert norm > 0.05                                  # clipping acted
        for ours, theirs in zip(strategy.grads[step], plain.parameters()):
            torch.testing.assert_close(ours, theirs.grad)


def test_bf16_autocast_runs_forward_in_bf16_and_keeps_fp32_gradients():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    precision = Precision("bf16", "cpu")
    with precision.autocast():
        out = model(torch.randn(2, 1, 4, 4))
    assert out.dtype == torch.bfloat16
    strategy, _, _ = _train(model, "adamw", _batches(2), precision)
    assert all(g.dtype == torch.float32 for grads in strategy.grads for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_the_step_guard_settles_deferred_verdicts_in_order():
    guard = StepGuard(FailureConfig(nan_policy="skip"), SimpleNamespace(size=1, rank=0, log=LOG))
    guard.policy.max_consecutive = 3
    for step, code in enumerate([0, 1, 2, 1, 0, 1, 1], start=1):
        guard.defer(torch.tensor(float(code)), step, 0.1, True)
    guard.settle()                       # an overflow between NaN steps neither counts nor resets
    assert (guard.policy.skipped, guard.policy.consecutive, guard.overflows) == (4, 2, 1)
    guard.defer(torch.tensor(1.0), 8, 0.1, True)
    with pytest.raises(MpicnnError, match="at step 8 .*last 3 updates were all skipped"):
        guard.settle()


# --- real MPI runs ------------------------------------------------------------------------

def _final(directory):
    return torch.load(directory / "final.pt", weights_only=True)


def _max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.mpi
def test_bf16_with_clipping_at_two_ranks_equals_one_rank_with_the_global_batch(tmp_path):
    """Autocast and clipping of the averaged gradient: two ranks are one with their batch.

    Clipping each rank's own gradient before averaging would give another update; the
    validation figures are computed on every rank's own parameters and summed, so they
    match only when rank 1 holds the same parameters as rank 0.
    """
    common = ["--data", DIGITS, "--max-steps", 6, "--deterministic", "--optimizer", "sgd",
              "--lr", 0.1, "--warmup-epochs", 0, "--amp", "bf16", "--clip-grad-norm", 0.05]
    two, end2 = train(tmp_path, "n2", 2, *common, "--batch-size", 8)
    one, end1 = train(tmp_path, "n1", 1, *common, "--batch-size", 16)
    a, b = _final(two)["model"], _final(one)["model"]
    assert _max_difference(a, b) <= 1e-4
    unclipped, _ = train(tmp_path, "n1-unclipped", 1, *common[:-2], "--batch-size", 16)
    assert _max_difference(_final(unclipped)["model"], b) > 1e-2     # clipping acted
    assert end2["val_loss"] == pytest.approx(end1["val_loss"], rel=1e-3)
    assert end2["val_acc"] == pytest.approx(end1["val_acc"], abs=2 / 360)
    assert "amp_scaler" not in _final(two)                            # bf16: no loss scale


@pytest.mark.mpi
def test_fp16_loss_scale_is_checkpointed_and_resumed(tmp_path):
    common = ["--data", DIGITS, "--amp", "fp16", "--batch-size", 8]
    out, _ = train(tmp_path, "run", 2, *common, "--max-steps", 4)
    first = _final(out)["amp_scaler"]
    assert first["scale"] <= 2.0 ** 16 and first["_growth_tracker"] + first["overflows"] >= 1
    out, end = train(tmp_path, "run", 2, *common, "--max-steps", 7, "--resume", "auto")
    second = _final(out)["amp_scaler"]
    assert end["steps"] == 7
    epoch = records(out, "epoch")[-1]
    assert (epoch["amp_scale"], epoch["amp_overflows"]) == (second["scale"],
                                                            second["overflows"])
    if second["overflows"] == first["overflows"]:       # no overflow since: the count went on
        assert second["_growth_tracker"] == first["_growth_tracker"] + 3
        assert second["scale"] == first["scale"]
    else:
        assert second["overflows"] > first["overflows"]


def _fp16_ps_equals(tmp_path, mode: str, steps: int, ps_ranks: int, reference_ranks: int):
    """A ps run in fp16 ends with the parameters and loss scale of an allreduce run."""
    common = ["--data", DIGITS, "--amp", "fp16", "--batch-size", 8, "--max-steps", steps,
              "--optimizer", "sgd", "--lr", 0.1, "--warmup-epochs", 0, "--deterministic"]
    ps, _ = train(tmp_path, "ps", ps_ranks, *common, "--mode", mode, "--servers", 1)
    reference, _ = train(tmp_path, "reference", reference_ranks, *common)
    a, b = _final(ps), _final(reference)
    assert _max_difference(a["model"], b["model"]) <= 1e-4
    assert a["amp_scaler"] == b["amp_scaler"]


@pytest.mark.mpi
def test_fp16_in_ps_sync_equals_allreduce(tmp_path):
    """Workers unscale what they send; the servers' verdict moves every worker's scale alike."""
    _fp16_ps_equals(tmp_path, "ps-sync", steps=5, ps_ranks=3, reference_ranks=2)


@pytest.mark.mpi
def test_fp16_in_ps_async_moves_each_workers_scale_by_its_own_pushes(tmp_path):
    """ps-async: a push is its own update, so a worker's scale follows its own pushes.

    Two workers and a server; worker 1's 2nd and 3rd backward overflow (injected: the
    probe model keeps every other gradient far from fp16's limit), worker 0's never do.
    A staleness bound fixes each worker's shard, so each runs all 5 steps.
    """
    log = tmp_path / "scale"
    common = ["--data", DIGITS, "--model", "tests.custom_model:ScaleProbe", "--amp", "fp16",
              "--batch-size", 8, "--max-steps", 5, "--optimizer", "sgd", "--lr", 0.1,
              "--warmup-epochs", 0, "--deterministic", "--mode", "ps-async", "--servers", 1,
              "--staleness", 4]
    out, _ = train(tmp_path, "ps", 3, *common, start=lambda n, args: mpirun(
        n, args, env={"OVERFLOW": "1:2,1:3", "SCALE_LOG": str(log)}))
    # each line: the worker's own verdict on its gradient, the verdict its scale moved by
    # (the server's on that push), the scale after the update
    updates = [[tuple(map(float, line.split())) for line in
                (tmp_path / f"scale.{w}").read_text().splitlines()] for w in (0, 1)]
    assert updates[0] == [(0, 0, 2.0 ** 16)] * 5
    assert updates[1] == [(0, 0, 2.0 ** 16), (1, 1, 2.0 ** 15), (1, 1, 2.0 ** 14),
                          (0, 0, 2.0 ** 14), (0, 0, 2.0 ** 14)]
    saved = _final(out)["amp_scaler"]                      # rank 0's: worker 0's scale
    assert (saved["scale"], saved["overflows"]) == (2.0 ** 16, 0)


@pytest.mark.mpi
def test_fp16_in_ps_async_with_one_worker_is_serial_training(tmp_path):
    """With one worker, ps-async is serial training, loss scale included."""
    _fp16_ps_equals(tmp_path, "ps-async", steps=4, ps_ranks=2, reference_ranks=1)
