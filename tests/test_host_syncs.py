"""No host synchronisation in the step path between log intervals.

A one-rank run in this process, with ``--log-every`` beyond the run: the steps between
the first and the last read nothing back from the device (counted on CPU by wrapping the
Tensor methods that do; on a GPU, CUDA's sync debug mode makes any of them an error).
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import DIGITS

from mpicnn.observe.steps import StepStats

READS = ("item", "__bool__", "cpu", "tolist", "__float__", "__int__", "numpy")
FIRST, LAST = 2, 7            # count from the end of step FIRST to the start of step LAST's end


@contextmanager
def counting_reads(calls: list):
    """Count calls of the Tensor methods that copy to the host while ``calls[0]`` is set."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, method):
        def counted(self, *args, **kwargs):
            if calls[0]:
                calls.append(name)
            return method(self, *args, **kwargs)
        return counted

    for name, method in saved.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@contextmanager
def window_between_steps(monkeypatch, on_enter, on_exit):
    """Call ``on_enter`` after step FIRST is accounted and ``on_exit`` as step LAST ends."""
    original = StepStats.step_done

    def step_done(self, state, *args, **kwargs):
        if state.global_step == LAST:
            on_exit()
        original(self, state, *args, **kwargs)
        if state.global_step == FIRST:
            on_enter()

    monkeypatch.setattr(StepStats, "step_done", step_done)
    yield


def run_one_rank(tmp_path, *extra):
    from mpicnn.train import main

    code = main(["--data", str(DIGITS), "--max-steps", str(LAST + 1), "--log-every", "1000",
                 "--batch-size", "16", "--progress", "off", "--metrics",
                 str(tmp_path / "m.jsonl"), *extra])
    assert code == 0


ARGS = ["--amp", "fp16", "--clip-grad-norm", "1.0", "--nan-policy", "skip",
        "--augment", "crop,flip"]


def test_steps_between_log_intervals_read_nothing_back(tmp_path, monkeypatch):
    calls, window = [False], []

    def on():
        calls[0] = True
        window.append("on")

    def off():
        calls[0] = False
        window.append("off")

    with counting_reads(calls), window_between_steps(monkeypatch, on, off):
        run_one_rank(tmp_path, *ARGS)
    assert window == ["on", "off"]
    assert calls[1:] == [], f"host reads in the step path: {sorted(set(calls[1:]))}"
    # the wrapper counts: a read inside the window would have shown
    with counting_reads(probe := [True]):
        torch.ones(()).item()
    assert probe[1:] == ["item"]


@pytest.mark.gpu
def test_steps_between_log_intervals_do_not_synchronize_the_gpu(tmp_path, monkeypatch):
    """On CUDA, any synchronising call between the steps raises."""
    window = []

    def on():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        window.append("on")

    def off():
        window.append(torch.cuda.get_sync_debug_mode())     # still "error" (2) at the end
        torch.cuda.set_sync_debug_mode(0)

    with window_between_steps(monkeypatch, on, off):
        try:
            run_one_rank(tmp_path, *ARGS, "--device", "cuda")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert window == ["on", 2]
    # the debug mode raises: a synchronising call inside the window would have failed the run
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.ones((), device="cuda").item()
    finally:
        torch.cuda.set_sync_debug_mode(0)
