"""The data section: which file, which split, read order, prefetch, cache, augmentation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.layout import CHOICES as LAYOUT_CHOICES
from .fields import must, non_negative, opt

# the digits shipped with mpicnn: the checkout's data/, else the copy that setup.py puts
# into an installed package
_CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "data" / "digits.h5"
_PACKAGED_DATA = Path(__file__).resolve().parents[1] / "data" / "digits.h5"
SHIPPED_DATA = _CHECKOUT_DATA if _CHECKOUT_DATA.is_file() else _PACKAGED_DATA


@dataclass
class DataConfig:
    """Settings of the data pipeline (``mpicnn.data``)."""

    data: str = opt(str(SHIPPED_DATA), "HDF5 dataset", "data", metavar="FILE",
                    default_text="the shipped digits dataset")
    images_key: str = opt("images", "name of the images dataset in each split", "data")
    labels_key: str = opt("labels", "name of the labels dataset in each split", "data")
    layout: str = opt("auto", "image layout in the file", "data", list(LAYOUT_CHOICES))
    val_fraction: float = opt(0.1, "validation share carved from a flat file (no train/val "
                              "groups)", "data")
    shuffle: str = opt("global", "global: world-size-invariant global batches; local: each "
                       "rank keeps one contiguous shard and shuffles within it", "data",
                       ["global", "local"])
    # --- data pipeline: read order, prefetch, cache, augmentation (issue 7) -------
    shuffle_block: int = opt(0, "global order: blocks of this many consecutive rows are "
                             "shuffled (0: the file's chunk rows; 1: single samples)", "data")
    shuffle_window: int = opt(0, "then each window of this many rows is dealt into its "
                              "batches (0: 64 global batches, at most 64 MiB)", "data")
    prefetch: int = opt(2, "batches a background reader keeps ready (off: read in the loop)",
                        "data", metavar="BATCHES", off=0)
    prefetch_mode: str = opt("thread", "where the reader runs", "data", ["thread", "process"])
    cache: bool = opt(False, "keep rows in RAM once read (the rank's shard with --shuffle "
                      "local, else the split); checked against node memory", "data")
    data_on_device: str = opt("auto", "hold the rows a rank reads on its device as stored "
                              "(uint8 stays uint8) and gather each batch there: no reading, "
                              "copying or waiting on the host per step; auto: on a GPU when "
                              "the split takes at most a quarter of its free memory",
                              "data", ["auto", "on", "off"])
    augment: str = opt("", "comma-separated augmentations: crop (pad and random crop), flip "
                       "(horizontal), erase (cutout: zero a random square of half the side "
                       "in half the samples); e.g. crop,flip", "data", metavar="LIST",
                       off="")

    def validate(self) -> None:
        must(0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)")
        non_negative(self, "shuffle_block", "shuffle_window", "prefetch")
        from ..data.augment import parse_augment

        parse_augment(self.augment)
