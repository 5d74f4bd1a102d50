"""A worker's parameters and gradients between its device and the host buffers MPI reads.

On a GPU, one flat device buffer per direction and one pinned flat host buffer: each step
copies the gradients once device-to-host and the parameters once host-to-device, both
non-blocking and ordered by CUDA events, instead of one synchronous pageable copy per
parameter tensor each way. On the CPU the host buffers are the only copy.
"""
from __future__ import annotations

import torch

from ..flat import flatten, unflatten_into, views


class FlatStaging:
    """Host flat vectors ``params`` and ``grads`` (what MPI sends and receives) for ``tensors``.

    ``staged`` (default: the tensors are on a CUDA device) keeps a device-side flat copy
    of each and moves it with one copy per direction; ``pin`` (default: staged on CUDA)
    pins the host side so that copy is asynchronous.
    """

    def __init__(self, tensors: list, staged: bool | None = None, pin: bool | None = None):
        device = tensors[0].device
        self.staged = device.type == "cuda" if staged is None else staged
        self.cuda = self.staged and device.type == "cuda"
        pin = self.cuda if pin is None else pin
        host = flatten(tensors, device="cpu")
        self.params = torch.empty(host.numel(), dtype=host.dtype, pin_memory=pin)
        self.params.copy_(host)
        self.grads = torch.zeros(host.numel(), dtype=host.dtype, pin_memory=pin)
        self.copies = 0                 # host <-> device copies made (one per direction a step)
        if self.staged:
            self.device_params = flatten(tensors)
            self.device_grads = torch.zeros_like(self.device_params)
        # ordering: the gradient copy lands before MPI reads; the parameter copy has read
        # the host buffer before MPI writes it again
        self._grads_landed = torch.cuda.Event() if self.cuda else None
        self._params_read = torch.cuda.Event() if self.cuda else None

    def gradients_out(self, tensors: list) -> None:
        """Gather ``tensors``' ``.grad`` (zeros where None) into ``grads``, ready for MPI."""
        flat = self.device_grads if self.staged else self.grads
        with torch.no_grad():
            for p, piece in zip(tensors, views(flat, tensors)):
                if p.grad is None:          # an unused parameter pushes zeros
                    piece.zero_()
                else:
                    piece.copy_(p.grad)
            if self.staged:
                self.grads.copy_(self.device_grads, non_blocking=self.cuda)
                self.copies += 1
        if self.cuda:
            self._grads_landed.record()
            self._grads_landed.synchronize()     # MPI must not read before the copy landed

    def host_writable(self) -> None:
        """Wait until the last parameter copy has read ``params`` (before MPI refills it)."""
        if self.cuda:
            self._params_read.synchronize()

    def parameters_in(self, tensors: list) -> None:
        """Scatter ``params`` (as MPI received them) into ``tensors``."""
        if not self.staged:
            unflatten_into(self.params, tensors)
            return
        self.device_params.copy_(self.params, non_blocking=self.cuda)
        self.copies += 1
        if self.cuda:
            self._params_read.record()
        unflatten_into(self.device_params, tensors)     # device-side copies, stream-ordered
