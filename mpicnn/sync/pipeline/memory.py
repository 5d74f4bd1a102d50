"""Activation memory of a stage: bytes autograd keeps for backward, now and at the peak.

Measured with saved-tensor hooks, so it counts what the schedule really keeps alive
(parameters saved by their layers are left out: they do not grow with micro-batches).
"""
from __future__ import annotations

import torch


class _Saved:
    __slots__ = ("meter", "nbytes", "tensor")

    def __init__(self, tensor, nbytes: int, meter):
        self.tensor, self.nbytes, self.meter = tensor, nbytes, meter

    def __del__(self):
        self.meter.now -= self.nbytes


class ActivationMeter:
    """Bytes of activations saved for backward: ``now``, ``peak``, and one micro-batch's."""

    def __init__(self, params=()):
        self.skip = {p.data_ptr() for p in params}
        self.now = self.peak = 0
        self.micro = 0                 # the most one micro-batch's forward saved

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor):
        if tensor.data_ptr() in self.skip:
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        return _Saved(tensor, nbytes, self)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def forward(self):
        """Context of one micro-batch's forward: counts what it saves into ``micro``."""
        return _Forward(self)


class _Forward:
    def __init__(self, meter):
        self.meter, self.hooks = meter, meter.hooks()

    def __enter__(self):
        self.before = self.meter.now
        self.hooks.__enter__()

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        self.meter.micro = max(self.meter.micro, self.meter.now - self.before)
