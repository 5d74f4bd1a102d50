"""GPU paths tested on CPU where their decisions are pure: --cuda-aware refusal, PS servers
on the CPU, the PS worker's flat staging, the phase timer; GPU-marked twins run with CUDA."""
from __future__ import annotations

import pytest
import torch

from mpicnn.cluster.errors import MpicnnError
from mpicnn.sync.allreduce.transport import choose_path


# --- item 4: a forced CUDA-aware path with a library that cannot take device pointers --------
def test_cuda_aware_on_refused_when_the_library_says_no():
    no = lambda: (False, "MPIX_Query_cuda_support() = 0")
    with pytest.raises(MpicnnError) as err:
        choose_path("on", "cuda", None, no)
    assert err.value.collective and "not CUDA-aware" in str(err.value)
    assert "--cuda-aware auto or off" in str(err.value)
    with pytest.raises(MpicnnError, match="MPICNN_CUDA_AWARE=on"):
        choose_path("auto", "cuda", "on", no)
    assert choose_path("off", "cuda", None, no)[0] is False
    assert choose_path("auto", "cuda", None, no)[0] is False         # auto stages instead
    assert choose_path("on", "cpu", None, no)[0] is False            # host memory: no question
    aware, why = choose_path("on", "cuda", None, lambda: (True, "query = 1"))
    assert aware and "query = 1" in why


# --- item 5: parameter servers on the CPU; the worker's flat staging ---------------------------
class _World:
    local_rank, local_size, device = 1, 2, None


def test_servers_bind_to_the_cpu_whatever_device_was_asked(monkeypatch):
    from mpicnn.cluster.devices import bind_device
    from mpicnn.sync.ps.layout import serves

    assert [serves("ps-sync", 1, r, 3) for r in range(3)] == [False, False, True]
    assert [serves("ps-async", 2, r, 4) for r in range(4)] == [False, False, True, True]
    assert not any(serves("allreduce", 1, r, 3) for r in range(3))
    assert not serves("ps-sync", 3, 2, 3)             # no worker left: roles() reports it
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # a GPU "is" there
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    threads = torch.get_num_threads()
    try:
        for requested in ("cuda", "auto", "cpu"):
            assert bind_device(_World(), requested, 1, server=True).type == "cpu"
        assert chosen == []                           # no CUDA context on a server
        assert bind_device(_World(), "cuda", 1) == torch.device("cuda", 1)
        assert chosen == [1]
    finally:
        torch.set_num_threads(threads)


def test_server_with_device_cuda_and_no_gpu_fails_like_the_workers(monkeypatch):
    from mpicnn.cluster.devices import bind_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MpicnnError, match="no CUDA GPU") as err:
        bind_device(_World(), "cuda", 1, server=True)
    assert err.value.collective


def _params():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    params = [conv.weight, conv.bias, torch.nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad = None                              # unused: pushes zeros
    return params


def test_worker_staging_makes_one_flat_copy_each_way(monkeypatch):
    from mpicnn.sync.ps.staging import FlatStaging

    params = _params()
    stage = FlatStaging(params, staged=True, pin=False)      # the GPU path, on CPU tensors
    copies = []
    real_copy = torch.Tensor.copy_

    def counting_copy(dst, src, non_blocking=False):
        if (dst.device.type == "cpu") != (src.device.type == "cpu") or \
                dst.data_ptr() in (stage.grads.data_ptr(), stage.params.data_ptr()) or \
                src.data_ptr() == stage.params.data_ptr():
            copies.append((dst.numel(), src.numel()))
        return real_copy(dst, src, non_blocking=non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    stage.gradients_out(params)
    assert copies == [(stage.grads.numel(),) * 2]              # one flat device-to-host copy
    expected = torch.cat([params[0].grad.permute(0, 2, 3, 1).reshape(-1), params[1].grad,
                          torch.zeros(7)])
    assert torch.equal(stage.grads, expected)                 # memory order, zeros if unused
    copies.clear()
    stage.params.copy_(torch.arange(stage.params.numel(), dtype=torch.float32))
    copies.clear()
    stage.parameters_in(params)
    assert copies == [(stage.params.numel(),) * 2]             # one flat host-to-device copy
    assert stage.copies == 2
    monkeypatch.undo()
    assert params[1].tolist() == list(map(float, range(108, 112)))
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(params[0].permute(0, 2, 3, 1).reshape(-1), torch.arange(108.0))


def test_worker_staging_on_the_cpu_is_the_host_buffer_itself():
    from mpicnn.sync.ps.staging import FlatStaging

    params = _params()
    stage = FlatStaging(params)
    assert not stage.staged and not stage.params.is_pinned()
    stage.gradients_out(params)
    stage.parameters_in(params)
    assert stage.copies == 0


# --- item 11: phases in GPU time (events), wall clock on the CPU -------------------------------
def test_phase_timer_on_the_cpu_keeps_the_wall_clock():
    import time

    from mpicnn.observe import timeline
    from mpicnn.observe.steps import PhaseTimer

    timer = PhaseTimer(torch.device("cpu"))
    assert not timer.events
    with timer.phase("comm"):
        time.sleep(0.02)
        with timeline.span("ps_push"):
            time.sleep(0.01)
    timer.steps = 1
    took = timer.take()
    assert took["comm"] >= 0.02 and took["ps_push"] >= 0.01        # waits exclusive
    assert set(timer.snapshot_ms()) >= {"forward_ms", "comm_ms", "ps_push_ms"}


class _FakeEvent:
    """A CUDA event's interface on a fake clock: the test decides when it completes."""

    clock, done_until = 0.0, 0.0

    def record(self):
        self.at = _FakeEvent.clock

    def query(self):
        return self.at <= _FakeEvent.done_until

    def synchronize(self):
        _FakeEvent.done_until = max(_FakeEvent.done_until, self.at)

    def elapsed_time(self, end):
        return (end.at - self.at) * 1000.0         # milliseconds


def test_phase_timer_with_events_charges_gpu_time_without_blocking_the_step():
    from mpicnn.observe import timeline
    from mpicnn.observe.steps import PhaseTimer

    _FakeEvent.clock = _FakeEvent.done_until = 0.0
    timer = PhaseTimer(event=_FakeEvent)
    assert timer.events
    with timer.phase("forward"):          # launched at once, runs 3 s on the "GPU"
        _FakeEvent.clock += 3.0
    with timer.phase("comm"):
        _FakeEvent.clock += 2.0
        with timeline.span("ps_pull"):     # a host wait (wall clock), inside comm
            pass
    from mpicnn.observe.steps import PHASES

    took = timer.take()
    assert [took[k] for k in PHASES] == [0.0] * len(PHASES)     # nothing completed yet
    _FakeEvent.done_until = 3.0                               # forward done, comm not
    took = timer.take()
    assert took["forward"] == pytest.approx(3.0) and took["comm"] == 0.0
    took = timer.take(block=True)
    assert took["comm"] == pytest.approx(2.0, abs=1e-3) and "ps_pull" in took
    timer.steps = 1
    assert timer.snapshot_ms()["forward_ms"] == pytest.approx(3000.0)


@pytest.mark.gpu
def test_phase_timer_on_cuda_measures_kernel_time_not_launch_time():
    import time

    from mpicnn.observe.steps import PhaseTimer

    timer = PhaseTimer(torch.device("cuda"))
    assert timer.events
    with timer.phase("data"):                      # CUDA's lazy start (tens of ms) and the
        torch.cuda._sleep(1_000)                   # first events' creation: not timed below
    torch.cuda.synchronize()
    launched = time.perf_counter()
    with timer.phase("forward"):
        torch.cuda._sleep(100_000_000)             # ~0.05 s of GPU time, launched in µs
    launch = time.perf_counter() - launched
    timer.steps = 1
    forward = timer.snapshot_ms()["forward_ms"] / 1000
    assert forward > 10 * launch and forward > 0.005


def test_sync_bn_refuses_ps_async_and_leaves_servers_plain():
    from types import SimpleNamespace

    from mpicnn.training.adapt import adapt_model
    from mpicnn.training.models import build_model
    from mpicnn.training.syncbn import has_sync_bn

    training = SimpleNamespace(sync_bn=True, channels_last=False)
    model = build_model("fashionnet", (1, 8, 8), 10)
    with pytest.raises(MpicnnError, match="ps-sync") as err:
        adapt_model(model, training, "ps-async", True, None)
    assert err.value.collective
    server = adapt_model(model, training, "ps-sync", False, None)
    assert not has_sync_bn(server)
    worker = adapt_model(build_model("fashionnet", (1, 8, 8), 10), training, "allreduce",
                         True, None)
    assert has_sync_bn(worker) and worker.collective_forward


# --- the same paths on a real GPU (run by python -m mpicnn.bench gpu) ---------------------------
def no_tf32(monkeypatch) -> None:
    """fp32 convolutions and matrix products in fp32 for this test (not TF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
def test_gpu_staging_pinned_and_exact():
    from mpicnn.sync.ps.staging import FlatStaging

    params = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]   # strides kept
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    params[0].grad, params[1].grad = torch.randn_like(params[0]), torch.randn_like(params[1])
    stage = FlatStaging(params)
    assert stage.staged and stage.params.is_pinned() and stage.grads.is_pinned()
    stage.gradients_out(params)
    expected = torch.cat([params[0].grad.permute(0, 2, 3, 1).reshape(-1), params[1].grad,
                          torch.zeros(7, device="cuda")]).cpu()
    assert torch.equal(stage.grads, expected)
    stage.host_writable()
    stage.params.copy_(torch.arange(stage.params.numel(), dtype=torch.float32))
    stage.parameters_in(params)
    torch.cuda.synchronize()
    assert params[1].tolist() == list(map(float, range(108, 112)))
    assert stage.copies == 2


@pytest.mark.gpu
def test_gpu_sync_bn_single_process_equals_batchnorm_and_fused_optimizer_takes_views(
        monkeypatch):
    import copy

    from mpicnn.sync.allreduce.buckets import build_buckets
    from mpicnn.training.adapt import to_channels_last
    from mpicnn.training.models import build_model
    from mpicnn.training.syncbn import convert

    torch.manual_seed(0)
    model = build_model("fashionnet", (3, 16, 16), 10).cuda()
    synced = convert(copy.deepcopy(model), None)
    # Hopper convolves in TF32 by default (~1e-4 apart): the comparison is of fp32 arithmetic
    no_tf32(monkeypatch)
    x = torch.randn(8, 3, 16, 16, device="cuda")
    model.eval(), synced.eval()                      # dropout out of the comparison
    for net in (model, synced):
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
    assert torch.allclose(model(x), synced(x), atol=1e-4)
    net = to_channels_last(build_model("resnet18", (3, 32, 32), 10).cuda())
    params = list(net.parameters())
    bucket = build_buckets(params, [list(range(len(params)))])[0]
    torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32, device="cuda")),
                                      torch.zeros(4, dtype=torch.long, device="cuda")).backward()
    assert all(p.grad is v for p, v in zip(params, bucket.views))
    torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True).step()       # accepted
    torch.optim.AdamW(params, lr=0.1, fused=True).step()


@pytest.mark.gpu
@pytest.mark.mpi
def test_gpu_cuda_aware_on_with_a_plain_mpi_fails_cleanly_and_servers_stay_on_cpu(tmp_path):
    """--cuda-aware on does what the library's answer says: refused (not CUDA-aware), or
    trains (CUDA-aware); a library that cannot say is trusted, which proves nothing here."""
    from conftest import DIGITS, mpirun

    from mpicnn.sync.allreduce.transport import probe_cuda_support

    common = ["--data", DIGITS, "--device", "cuda", "--max-steps", 3, "--epochs", 1,
              "--progress", "off"]
    run = mpirun(3, [*common, "--mode", "ps-sync", "--servers", 1], timeout=240)
    assert "devices cpu, cuda:0" in run.stdout + run.stderr
    supported, how = probe_cuda_support()     # the answer the job's ranks get (same library)
    if supported is None:
        pytest.skip(f"the MPI library cannot say whether it is CUDA-aware ({how})")
    run = mpirun(2, [*common, "--cuda-aware", "on"], check=False, timeout=240)
    if supported:
        assert run.returncode == 0, run.stderr[-2000:]
        assert "CUDA buffers to MPI directly" in run.stdout, run.stdout[-2000:]
    else:
        assert run.returncode != 0 and not run.hung
        assert run.stderr.count("mpicnn: error: --cuda-aware on, but the MPI library is "
                                "not CUDA-aware") == 1, run.stderr[-2000:]


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["flag", "environment"])
def test_forced_cuda_aware_with_a_plain_mpi_ends_every_rank_with_one_line(how):
    """Through mpirun, the probe's answer injected: one error line, every rank exits."""
    from pathlib import Path

    from conftest import job_env, mpirun

    script = Path(__file__).resolve().parent / "cuda_aware_check.py"
    args = ["--cuda-aware", "on"] if how == "flag" else []
    env = job_env({"MPICNN_CUDA_AWARE": "on"} if how == "environment" else {})
    run = mpirun(2, args, script=script, env=env, check=False, timeout=120)
    assert run.returncode != 0 and not run.hung
    errors = [line for line in run.stderr.splitlines() if line.startswith("mpicnn: error:")]
    assert len(errors) == 1, run.stderr[-2000:]
    source = "--cuda-aware on" if how == "flag" else "MPICNN_CUDA_AWARE=on"
    assert source in errors[0] and "is not CUDA-aware" in errors[0]
    assert "chose" not in run.stdout
