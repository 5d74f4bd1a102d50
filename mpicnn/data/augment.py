"""``--augment crop,flip,erase``: random crop with padding, horizontal flip and cutout, on
the device.

``erase`` (cutout, DeVries and Taylor 2017; random erasing's square form) zeroes, in half
of the samples, a square of half the image's side centred anywhere in it (clipped at the
border); zero is the mean pixel after normalising.

The random choices of a sample are a pure function of (seed, epoch, sample row), so a
run is reproducible, a resumed run continues identically, and the augmented global
batch does not depend on the number of ranks.
"""
from __future__ import annotations

import numpy as np
import torch

from ..cluster.errors import MpicnnError

AUGMENTATIONS = ("crop", "flip", "erase")
STREAM = 0xA5A5_0001          # keeps these draws apart from any other use of the seed
ERASE_STREAM = 0xA5A5_0002    # the cutout's own draws, independent of the crop's and flip's


def parse_augment(spec: str) -> tuple[str, ...]:
    """``"crop,flip"`` -> ("crop", "flip"); unknown names are an error naming the valid ones."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    for name in names:
        if name not in AUGMENTATIONS:
            raise MpicnnError(f"--augment: unknown augmentation {name!r}; choose from "
                              f"{', '.join(AUGMENTATIONS)} (comma-separated)", collective=True)
    return names


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: well-spread 64-bit hashes of 64-bit integers."""
    x = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_draws(rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """64 random bits per sample row, fixed by (seed, epoch, row)."""
    key = mix64(np.array([(seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)], np.uint64))
    with np.errstate(over="ignore"):
        return mix64(mix64(np.asarray(rows, np.uint64) ^ key) ^ np.uint64(STREAM))


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """``array`` as a tensor on ``device``; to a GPU through pinned memory, asynchronously
    (a pageable copy would stall the host every step)."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


# Columns of ``Augmenter.draws``: every random choice of a sample, one int64 row a sample.
DY, DX, FLIP, ERASE, TOP, LEFT = range(6)


class Augmenter:
    """Apply the chosen augmentations to a normalised (N, C, H, W) float batch.

    ``draws`` makes a sample's choices on the host (one int64 row each, from its row and
    the epoch); ``apply`` uses them on the device. The draws of a batch cross to the
    device in one copy, or those of a whole epoch in one copy (``--data-on-device``).
    """

    def __init__(self, names, input_shape, seed: int):
        self.names, self.seed = tuple(names), seed
        _, self.h, self.w = input_shape
        self.pad = max(1, min(self.h, self.w) // 8)        # 4 pixels on 32x32, 1 on 8x8

    def __bool__(self) -> bool:
        return bool(self.names)

    def __call__(self, x: torch.Tensor, rows: np.ndarray, epoch: int) -> torch.Tensor:
        return self.apply(x, to_device(self.draws(rows, epoch), x.device))

    def draws(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        """(len(rows), 6) int64: crop offsets, flip, erase on/off and the square's corner."""
        bits = sample_draws(rows, self.seed, epoch)
        span = np.uint64(2 * self.pad + 1)
        out = np.zeros((len(bits), 6), np.int64)
        out[:, DY] = bits % span
        out[:, DX] = (bits >> np.uint64(16)) % span
        out[:, FLIP] = (bits >> np.uint64(32)) & np.uint64(1)
        erase = mix64(bits ^ np.uint64(ERASE_STREAM))
        side = max(1, min(self.h, self.w) // 2)
        out[:, ERASE] = erase & np.uint64(1)
        out[:, TOP] = ((erase >> np.uint64(8)) % np.uint64(self.h)).astype(np.int64) - side // 2
        out[:, LEFT] = ((erase >> np.uint64(32)) % np.uint64(self.w)).astype(np.int64) \
            - side // 2
        return out

    def apply(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The augmentations of ``x`` by its samples' ``draws`` (on ``x``'s device)."""
        if "crop" in self.names:
            x = self.crop(x, draws[:, DY], draws[:, DX])
        if "flip" in self.names:
            flip = draws[:, FLIP].bool().view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        if "erase" in self.names:
            x = self.erase(x, draws[:, ERASE].bool(), draws[:, TOP], draws[:, LEFT])
        return x

    def erase(self, x: torch.Tensor, on: torch.Tensor, top: torch.Tensor,
              left: torch.Tensor) -> torch.Tensor:
        """Zero a (side x side) square at (top, left) in the samples where ``on``."""
        n, _, h, w = x.shape
        side = max(1, min(h, w) // 2)
        dev = x.device
        top, left = top.view(n, 1), left.view(n, 1)
        ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
        rows = (ys >= top) & (ys < top + side)                  # (n, h)
        cols = (xs >= left) & (xs < left + side)                # (n, w)
        hole = rows.view(n, h, 1) & cols.view(n, 1, w) & on.view(n, 1, 1)
        return x.masked_fill(hole.unsqueeze(1), 0.0)

    def crop(self, x: torch.Tensor, dy, dx) -> torch.Tensor:
        """Zero-pad by ``pad`` (zero = the mean pixel after normalising), cut H x W at (dy, dx)."""
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (self.pad,) * 4)
        dev = x.device
        ys = torch.as_tensor(dy, device=dev).view(n, 1) + torch.arange(h, device=dev)
        xs = torch.as_tensor(dx, device=dev).view(n, 1) + torch.arange(w, device=dev)
        idx = torch.arange(n, device=dev).view(n, 1, 1)
        out = padded.permute(0, 2, 3, 1)[idx, ys.view(n, h, 1), xs.view(n, 1, w)]
        return out.permute(0, 3, 1, 2).contiguous()
