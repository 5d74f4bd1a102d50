"""Straggler simulation (``--slow-rank R --slow-factor F``) for tests and benchmarks."""
from __future__ import annotations

import time

import torch


class Straggler:
    """Makes each training forward+backward of a model take ``factor`` times as long.

    Forward starts the clock; when the last parameter has its gradient, the rank
    sleeps ``factor - 1`` times the elapsed compute time.
    """

    def __init__(self, model: torch.nn.Module, factor: float):
        self.factor, self.start, self.pending = factor, None, 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = next(iter(self.params)).device
        model.register_forward_pre_hook(self._forward)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._gradient)

    def _now(self) -> float:
        if self.device.type == "cuda":      # time the kernels, not their launches
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _forward(self, module, args) -> None:
        if torch.is_grad_enabled() and module.training:
            self.start, self.pending = self._now(), len(self.params)

    def _gradient(self, param) -> None:
        self.pending -= 1
        if self.pending == 0 and self.start is not None:
            time.sleep((self.factor - 1) * (self._now() - self.start))
            self.start = None


def slow_down(model: torch.nn.Module, factor: float) -> Straggler | None:
    """Make ``model`` compute ``factor`` times slower on this rank (no-op for factor <= 1)."""
    return Straggler(model, factor) if factor > 1 else None
