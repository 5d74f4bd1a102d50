"""Scratch buffers kept per bucket: made once, reused every step, remade when a bucket changes."""
from __future__ import annotations

import torch


def reusable(cache: dict, key, numel: int, dtype: torch.dtype, device: torch.device,
             pin_memory: bool = False) -> torch.Tensor:
    """Reuse ``cache[key]`` if it has ``numel`` of ``dtype`` on ``device``, else replace it."""
    buffer = cache.get(key)
    if (buffer is None or buffer.numel() != numel or buffer.dtype != dtype
            or buffer.device != device):
        buffer = cache[key] = torch.empty(numel, dtype=dtype, device=device,
                                          pin_memory=pin_memory)
    return buffer
