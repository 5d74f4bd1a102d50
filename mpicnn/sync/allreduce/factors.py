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
AUTO_BYTES_GAIN = 2


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
    ``node`` holds the world ranks of this rank's node; ``capacity`` the rows a rank
    sends in the one ``Allgather`` of a step (its batch; more take a second round).
    Where the weight's bucket lives in the node's shared windows, the node's own
    gradients are summed there as they are (exactly) and only the other nodes' factors
    are multiplied out, each rank rebuilding its share of the rows for the whole node;
    otherwise every rank rebuilds all of it.
    """

    def __init__(self, comm, capture: FactorCapture, node, capacity: int,
                 wire: torch.dtype = torch.float32):
        self.comm, self.capture, self.wire = comm.Dup(), capture, wire
        self.size, self.capacity = self.comm.Get_size(), capacity
        self.node = frozenset(node)
        self.width = capture.in_features + capture.out_features

    def __call__(self, grad: torch.Tensor, collective=None) -> None:
        """Replace ``grad`` (the weight's, out x in, flat) by its average over ranks."""
        columns = self.capture.in_features
        shared = collective is not None and hasattr(collective, "share") \
            and collective.averages(grad)
        if shared and len(self.node) == self.size:        # one node: nothing to gather
            self.capture.take(self.wire)
            return collective.share(grad, lambda lo, hi, total: total.div_(self.size),
                                    unit=columns)
        if shared:
            collective.publish(grad)           # the gather below is the node's meeting
        ranks = [r for r in range(self.size) if not shared or r not in self.node]
        factors = torch.cat([f.to(grad.dtype) for f in self._gather(ranks)])
        inputs, grads = factors[:, :columns], factors[:, columns:]
        if not shared:
            torch.mm(grads.t(), inputs, out=grad.view(self.capture.out_features, columns))
            grad.div_(self.size)
            return

        def finish(lo: int, hi: int, total: torch.Tensor) -> None:
            share = total.view(-1, columns)
            share.addmm_(grads[:, lo // columns: hi // columns].t(), inputs)
            share.div_(self.size)

        collective.share(grad, finish, unit=columns, met=True)

    def _gather(self, ranks: list[int]) -> list[torch.Tensor]:
        """The factors of ``ranks`` (as they travelled), gathered from every rank.

        One ``Allgather`` of fixed blocks, each a row count then up to ``capacity`` rows;
        rows beyond that (a larger batch than planned) follow in an ``Allgatherv``.
        """
        from mpi4py import MPI

        mine = self.capture.take(self.wire).contiguous()
        row_bytes = self.width * mine.element_size()
        block = 8 + self.capacity * row_bytes
        send = torch.zeros(block, dtype=torch.uint8)
        send[:8].view(torch.int64)[0] = mine.shape[0]
        first = mine[: self.capacity]
        send[8: 8 + first.numel() * mine.element_size()] = first.reshape(-1).view(torch.uint8)
        blocks = torch.empty(self.size, block, dtype=torch.uint8)
        self.comm.Allgather([send.numpy(), MPI.BYTE], [blocks.numpy(), MPI.BYTE])
        rows = blocks[:, :8].contiguous().view(torch.int64).flatten().tolist()
        parts = [blocks[r, 8: 8 + min(rows[r], self.capacity) * row_bytes]
                 .view(self.wire).view(-1, self.width) for r in range(self.size)]
        if max(rows) > self.capacity:
            over = [max(0, n - self.capacity) for n in rows]
            rest = torch.empty(sum(over), self.width, dtype=self.wire)
            self.comm.Allgatherv([_bytes(mine[self.capacity:].contiguous()), MPI.BYTE],
                                 [_bytes(rest), ([n * row_bytes for n in over], None),
                                  MPI.BYTE])
            starts = [0, *torch.tensor(over).cumsum(0).tolist()]
            parts = [torch.cat([parts[r], rest[starts[r]:starts[r + 1]]])
                     for r in range(self.size)]
        return [parts[r] for r in ranks] or [torch.empty(0, self.width, dtype=self.wire)]

    def describe(self) -> str:
        return f"{self.capture.in_features}x{self.capture.out_features}"

    def close(self) -> None:
        self.capture.close()
        self.comm.Free()


def _bytes(tensor: torch.Tensor):
    """A writable byte view of a contiguous CPU tensor, for MPI."""
    return tensor.view(torch.uint8).numpy() if tensor.numel() else bytearray(0)
