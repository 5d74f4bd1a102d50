"""Many tensors as one flat buffer: views into it, and copies in and out of it.

The one place that decides where each tensor lies in a flat buffer (in order, back to
back), so gradient buckets, the plain allreduce, parameter-server vectors and replica
broadcasts all agree on it.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

import torch


def views(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cut the 1-D ``flat`` into consecutive views, each shaped like its tensor."""
    # One split rather than a slice per tensor: hot paths build these views every step.
    # A dense tensor in another memory format (channels_last) gets a view with its own
    # strides: gradients bound to such views keep the parameter's layout, which the fused
    # optimizers require, and the flat order is the tensors' memory order.
    pieces = flat.split([t.numel() for t in tensors])
    return [_like(piece, t) for piece, t in zip(pieces, tensors)]


def _like(piece: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``piece`` seen with ``tensor``'s shape and, where it is dense, its strides."""
    view = piece.view_as(tensor)
    # also for size-1 dimensions (a 1-channel channels_last weight "is contiguous")
    if view.stride() != tensor.stride() and _dense(tensor):
        return piece.as_strided(tensor.shape, tensor.stride())
    return view


def _dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill its memory without gaps or overlap (any dim order)."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def flatten(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None, *,
            dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Copy ``tensors`` into consecutive pieces of ``out``, or of a new flat vector."""
    if out is None:        # by default the dtype torch.cat would give, on the first's device
        if dtype is None:
            dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
        if device is None:
            device = tensors[0].device
        out = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    with torch.no_grad():          # parameters require grad; the flat copy must not
        for piece, tensor in zip(views(out, tensors), tensors):
            piece.copy_(tensor)
    return out


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` into ``tensors``, each on its own device and dtype."""
    with torch.no_grad():
        for tensor, piece in zip(tensors, views(flat, tensors)):
            tensor.copy_(piece)
