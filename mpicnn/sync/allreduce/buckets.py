"""Gradient buckets: flat tensors filled in backward order, whose slices are the ``.grad``s."""
from __future__ import annotations

import torch

from ..flat import views

MB = 1 << 20
FIRST_BUCKET_BYTES = 1 * MB      # small, so that the first reduction starts early in backward


def plan_buckets(params, cap_bytes: int, first_cap_bytes: int = FIRST_BUCKET_BYTES
                 ) -> list[list[int]]:
    """Group ``(index, key, nbytes)`` rows, given in expected ready order, into buckets.

    A bucket holds one key (device and dtype) and closes as soon as it holds at
    least its cap, so one large tensor gets a bucket of its own. The first bucket
    to close has the smaller cap. Buckets come back in the order they complete
    (by the ready position of their last member): that is the launch order.
    """
    closed, open_, last_seen = [], {}, {}
    for position, (index, key, nbytes) in enumerate(params):
        members, size = open_.get(key, ([], 0))
        members.append(index)
        size += nbytes
        last_seen[index] = position
        cap = first_cap_bytes if not closed else cap_bytes
        if size >= cap:
            closed.append(members)
            open_.pop(key, None)
        else:
            open_[key] = (members, size)
    closed += [members for members, _ in open_.values()]
    return sorted(closed, key=lambda members: max(last_seen[i] for i in members))


class Bucket:
    """One flat gradient buffer; each member parameter's ``.grad`` is a view into it."""

    def __init__(self, index: int, params: list, members: list[int], allocate=None):
        self.index, self.members = index, members
        self.params = [params[i] for i in members]
        first = self.params[0]
        self.numel = sum(p.numel() for p in self.params)
        allocate = allocate or (lambda numel, dtype, device: torch.zeros(numel, dtype=dtype,
                                                                         device=device))
        self.flat = allocate(self.numel, first.dtype, first.device)
        self.views = views(self.flat, self.params)
        self.pending = len(self.params)
        self.bind(keep_values=True)

    @property
    def nbytes(self) -> int:
        return self.numel * self.flat.element_size()

    def bind(self, keep_values: bool = False) -> None:
        """Point every member's ``.grad`` at its view (optionally keeping current values)."""
        with torch.no_grad():
            for p, view in zip(self.params, self.views):
                if p.grad is view:
                    continue
                if keep_values and p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view

    def detach(self) -> None:
        """Give every member a private copy of its gradient, before the bucket memory goes."""
        with torch.no_grad():
            for p, view in zip(self.params, self.views):
                if p.grad is view:
                    p.grad = view.clone()

    def bound(self) -> bool:
        """Whether every member's ``.grad`` is still its view (optimizers may replace it)."""
        return all(p.grad is view for p, view in zip(self.params, self.views))

    def reset(self) -> None:
        self.pending = len(self.params)


def bucket_plan(params: list, order: list[int], cap_bytes: int,
                first_cap_bytes: int = FIRST_BUCKET_BYTES, alone=frozenset()
                ) -> list[list[int]]:
    """:func:`plan_buckets` for tensors ``params`` expected ready in ``order``.

    Each index in ``alone`` gets a bucket of its own (launched where its tensor is ready),
    and the others are planned as if it were not there.
    """
    rows = [(i, (params[i].device, params[i].dtype), params[i].numel() * params[i].element_size())
            for i in order if i not in alone]
    plan = plan_buckets(rows, cap_bytes, min(first_cap_bytes, cap_bytes))
    position = {i: n for n, i in enumerate(order)}
    plan += [[i] for i in order if i in alone]
    return sorted(plan, key=lambda members: max(position[i] for i in members))


def same_plan(a: list[list[int]], b: list[list[int]]) -> bool:
    """Whether two plans group the same parameters into buckets launched in the same order."""
    return [sorted(m) for m in a] == [sorted(m) for m in b]


def build_buckets(params: list, plan: list[list[int]], allocate=None) -> list[Bucket]:
    """The buckets of ``plan``, each member's ``.grad`` rebound as a view (values kept).

    ``allocate(numel, dtype, device)`` gives each bucket's zeroed memory (default: torch);
    a list gives one allocator per bucket.
    """
    allocators = allocate if isinstance(allocate, list) else [allocate] * len(plan)
    return [Bucket(index, params, members, allocators[index])
            for index, members in enumerate(plan)]
