"""Per-channel mean and std of images, accumulated block by block (exact for uint8)."""
from __future__ import annotations

import numpy as np

STATS_ELEMENTS = 1 << 22        # float statistics are summed in pieces this large


class ChannelStats:
    """Per-channel mean and (population) std of NCHW blocks, exact for uint8."""

    def __init__(self, channels: int):
        self.counts = np.zeros((channels, 256), np.int64)      # uint8: value histograms
        self.sums = np.zeros(channels, np.float64)             # float: sums
        self.squares = np.zeros(channels, np.float64)
        self.n = 0

    def add(self, images: np.ndarray) -> None:
        """Count the pixels of one (N, C, H, W) block."""
        if images.dtype == np.uint8:
            for c in range(images.shape[1]):
                self.counts[c] += np.bincount(images[:, c].ravel(), minlength=256)
        else:
            step = max(1, STATS_ELEMENTS // max(1, images[0].size))
            for a in range(0, len(images), step):
                x = images[a: a + step].astype(np.float64)
                self.sums += x.sum(axis=(0, 2, 3))
                self.squares += np.square(x).sum(axis=(0, 2, 3))
        self.n += images.shape[0] * images.shape[2] * images.shape[3]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) as float32, std at least 1e-6 so normalising never divides by 0."""
        if self.counts.any():
            values = np.arange(256, dtype=np.float64)
            self.sums = self.counts @ values
            self.squares = self.counts @ np.square(values)
        n = max(1, self.n)
        mean = self.sums / n
        var = np.maximum(self.squares / n - np.square(mean), 0.0)
        return mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-6).astype(np.float32)
