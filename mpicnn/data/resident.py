"""``--data-on-device``: the rows a rank may read, held on its device as stored (e.g. uint8).

Read once at startup through the same chunk reader as streaming; a step then takes its
batch with one gather of images and one of labels on the device, so the host neither
reads, copies nor waits for data between steps. Batches equal the streamed ones bit for
bit: the same rows, normaliser and augmentation draws.
"""
from __future__ import annotations

import numpy as np
import torch

from ..cluster.errors import MpicnnError
from .memory import check_cache_fits, gib

READ_ROWS = 16384            # rows read and copied to the device at a time while loading
# ``auto`` keeps a split on a GPU when every rank's copy takes at most this share of it.
GPU_SHARE = 0.25


class ResidentRows:
    """Split rows ``lo <= row < hi`` and their labels, on ``device``."""

    def __init__(self, read, labels, lo: int, hi: int, sample_shape, dtype, device):
        self.lo, self.hi, self.device = lo, hi, device
        self.images = torch.empty((hi - lo, *sample_shape), dtype=torch.from_numpy(
            np.empty(0, dtype)).dtype, device=device)
        for a in range(lo, hi, READ_ROWS):
            b = min(hi, a + READ_ROWS)
            self.images[a - lo:b - lo].copy_(torch.from_numpy(read(np.arange(a, b))))
        self.labels = torch.from_numpy(np.asarray(labels[lo:hi])).to(device)

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the rows ``lo + index`` (``index`` on the device)."""
        return self.images.index_select(0, index), self.labels.index_select(0, index)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()


def keeps_on_device(setting: str, device: torch.device, need: int, ranks_sharing: int) -> bool:
    """Whether ``--data-on-device`` (auto, on, off) holds ``need`` bytes per rank on ``device``.

    ``auto``: on a GPU when the ranks sharing it all fit in ``GPU_SHARE`` of its free
    memory; never on the CPU (the reader thread there overlaps reading with the step).
    ``on``: wherever it fits, else a one-line error.
    """
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return False
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fits = need * ranks_sharing <= (GPU_SHARE if setting == "auto" else 0.8) * free
        if not fits and setting == "on":
            raise MpicnnError(
                f"--data-on-device on: the split takes {gib(need)} per rank x "
                f"{ranks_sharing} rank(s) on {device}, more than its {gib(free)} free allow; "
                f"use --data-on-device auto (streams what does not fit) or --shuffle local "
                f"(each rank keeps its shard only)", collective=True)
        return fits
    check_cache_fits(need, ranks_sharing, flag="--data-on-device on")
    return True


def ranks_sharing(device: torch.device, local_size: int) -> int:
    """How many of a node's ``local_size`` ranks hold their copy on ``device``'s memory."""
    if device.type != "cuda":
        return local_size
    return -(-local_size // max(1, torch.cuda.device_count()))
