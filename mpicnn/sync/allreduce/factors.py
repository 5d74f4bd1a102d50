"""Sufficient factors: a fully connected layer's gradient sent as the batch's factors.

The weight gradient of ``y = x W^T + b`` over a batch is ``dY^T X``: the layer's inputs
``X`` (rows x in) and the loss's gradient at its outputs ``dY`` (rows x out). Summed over
ranks it is ``[dY_1; ...; dY_P]^T [X_1; ...; X_P]``. When the ranks' rows together are
far fewer than the weight's rows and columns (small batches, wide layers: seednet's
4096 x 512 layer at 8 images a rank), gathering every rank's ``[X | dY]`` moves a fraction
of the gradient's bytes, and each rank rebuilds the same sum with one matrix product
(Xie et al., "Distributed Machine Learning via Sufficient Factor Broadcasting", 2015).
The result is the averaged gradient to float rounding; the bias, and every other
parameter, goes through the buckets as before.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

# auto: factors only where they move at least this many times fewer bytes than the gradient
# (they also cost every rank the rebuilding product, ranks x batch x in x out multiply-adds)
AUTO_BYTES_GAIN = 4


def factors_pay(in_features: int, out_features: int, ranks: int, rows: int,
                gain: float) -> bool:
    """Whether an in x out weight is more than ``gain`` x the size of ``ranks`` x ``rows``
    factors (each ``in + out`` values)."""
    return gain * ranks * rows * (in_features + out_features) < in_features * out_features


def worth_factoring(module: nn.Module, ranks: int, rows: int, gain: float) -> bool:
    """Whether ``module`` is a trained ``nn.Linear`` whose factors pay (:func:`factors_pay`)."""
    if not isinstance(module, nn.Linear) or not module.weight.requires_grad:
        return False
    out_features, in_features = module.weight.shape
    return factors_pay(in_features, out_features, ranks, rows, gain)


class FactorCapture:
    """Keeps one ``nn.Linear``'s inputs and output gradients of the backward passes since
    the last :meth:`take` (several with micro-batches)."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.out_features, self.in_features = module.weight.shape
        self._slots = []                   # [inputs, output gradient or None] per forward
        self._handle = module.register_forward_hook(self._forward)

    def _forward(self, _module, inputs, output) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return                         # evaluation: nothing will flow back
        slot = [inputs[0].detach().reshape(-1, self.in_features), None]
        self._slots.append(slot)
        # a tensor hook fires with the gradient of the value it saw, even if a later
        # in-place op (ReLU(inplace=True)) rewrites the output
        output.register_hook(partial(self._backward, slot))

    def _backward(self, slot: list, grad: torch.Tensor) -> None:
        slot[1] = grad.detach().reshape(-1, self.out_features)

    def take(self, dtype: torch.dtype) -> torch.Tensor:
        """This rank's factors as one (rows x (in + out)) matrix ``[X | dY]``; clears them.

        A forward whose gradient never came back (no backward through it) adds nothing.
        """
        slots, self._slots = self._slots, []
        rows = [torch.cat([x.to(dtype), g.to(dtype)], dim=1) for x, g in slots if g is not None]
        if not rows:
            return torch.empty(0, self.in_features + self.out_features, dtype=dtype)
        return torch.cat(rows)

    def close(self) -> None:
        self._handle.remove()


class FactorExchange:
    """Gathers the ranks' factors of one layer and rebuilds the averaged weight gradient.

    Runs on the communication thread like a bucket's reduction, on a communicator of its
    own. ``wire`` is the dtype the factors travel in (a 2-byte float when compressing);
    ``node`` holds the world ranks of this rank's node. Where the weight's bucket lives
    in the node's shared windows, the node's own gradients are summed there as they are
    (exactly) and only the other nodes' factors are multiplied out, each rank rebuilding
    its share of the rows for the whole node; otherwise every rank rebuilds all of it.
    """

    def __init__(self, comm, capture: FactorCapture, node, wire: torch.dtype = torch.float32):
        self.comm, self.capture, self.wire = comm.Dup(), capture, wire
        self.size = self.comm.Get_size()
        self.node = frozenset(node)

    def __call__(self, grad: torch.Tensor, collective=None) -> None:
        """Replace ``grad`` (the weight's, out x in, flat) by its average over ranks."""
        columns = self.capture.in_features
        shared = collective is not None and hasattr(collective, "share") \
            and collective.averages(grad)
        if shared and len(self.node) == self.size:        # one node: nothing to gather
            self.capture.take(self.wire)
            return collective.share(grad, lambda lo, hi, total: total.div_(self.size),
                                    unit=columns)
        every, rows = self._gather()
        every = every.to(grad.dtype)
        if not shared:
            inputs, grads = every[:, :columns], every[:, columns:]
            torch.mm(grads.t(), inputs, out=grad.view(self.capture.out_features, columns))
            grad.div_(self.size)
            return
        starts = [0, *torch.tensor(rows).cumsum(0).tolist()]
        remote = torch.cat([every[starts[r]:starts[r + 1]] for r in range(self.size)
                            if r not in self.node])
        inputs, grads = remote[:, :columns], remote[:, columns:]

        def finish(lo: int, hi: int, total: torch.Tensor) -> None:
            share = total.view(-1, columns)
            share.addmm_(grads[:, lo // columns: hi // columns].t(), inputs)
            share.div_(self.size)

        collective.share(grad, finish, unit=columns)

    def _gather(self) -> tuple[torch.Tensor, list[int]]:
        """Every rank's factors in rank order (as they travelled), and their rows."""
        import numpy as np
        from mpi4py import MPI

        mine = self.capture.take(self.wire).contiguous()
        width = mine.shape[1]
        rows = np.zeros(self.size, dtype=np.int64)
        self.comm.Allgather(np.array([mine.shape[0]], dtype=np.int64), rows)
        every = torch.empty(int(rows.sum()), width, dtype=self.wire)
        counts = [int(r) * width * every.element_size() for r in rows]
        self.comm.Allgatherv([_bytes(mine), MPI.BYTE],
                             [_bytes(every), (counts, None), MPI.BYTE])
        return every, rows.tolist()

    def describe(self) -> str:
        return f"{self.capture.in_features}x{self.capture.out_features}"

    def close(self) -> None:
        self.capture.close()
        self.comm.Free()


def _bytes(tensor: torch.Tensor):
    """A writable byte view of a contiguous CPU tensor, for MPI."""
    return tensor.view(torch.uint8).numpy() if tensor.numel() else bytearray(0)
