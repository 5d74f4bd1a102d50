"""Read this rank's batches from HDF5 and hand them to the device, normalised."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from . import shard
from .schema import Dataset, Split

EVAL_BATCH = 512


def to_nchw(images: np.ndarray, layout: str) -> np.ndarray:
    """Stored layout -> contiguous (N, C, H, W)."""
    if layout == "nhwc":
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if layout == "nhw":
        return images[:, None]
    return images


class Normalizer:
    """(x - mean) / std in float32 on the device, from the file's attributes."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, device):
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        return (x - self.mean) / self.std


class Loader:
    """This rank's view of one split: per-step reads planned by :mod:`shard`."""

    def __init__(self, data: Dataset, split: Split, device, batch: int, world: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: str = "global"):
        self.data, self.split = data, split
        self.batch, self.world, self.rank = batch, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.normalize = Normalizer(data.mean, data.std, device)
        self.device = device

    @property
    def steps(self) -> int:
        return shard.steps_per_epoch(len(self.split), self.batch, self.world, self.shuffle)

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw images (N,C,H,W, stored dtype) and labels for sorted split rows."""
        start = self.split.start
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            images = self.split.images[start + rows[0]: start + rows[-1] + 1]
        else:
            images = self.split.images[start + rows]
        images = to_nchw(images, self.data.layout)
        return torch.from_numpy(images), torch.from_numpy(self.split.labels[rows])

    def plan(self, epoch: int) -> np.ndarray:
        return shard.rank_batches(len(self.split), self.batch, self.world, self.rank,
                                  self.seed, epoch, self.shuffle)

    def epoch(self, epoch: int, start_step: int = 0
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) on the device, one pair per step of ``epoch`` from ``start_step``."""
        for rows in self.plan(epoch)[start_step:]:
            images, labels = self.read(rows)
            yield self.normalize(images), labels.to(self.device, non_blocking=True)

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous part of the split, in order, for evaluation."""
        lo, hi = shard.eval_range(len(self.split), self.world, self.rank)
        for first in range(lo, hi, EVAL_BATCH):
            rows = np.arange(first, min(hi, first + EVAL_BATCH))
            images, labels = self.read(rows)
            yield self.normalize(images), labels.to(self.device, non_blocking=True)
