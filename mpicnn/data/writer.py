"""Write mpicnn HDF5 files block by block, in whole-sample chunks, with channel statistics.

Memory stays bounded by one block whatever the number of samples; files appear
atomically (written under a temporary name, renamed when complete).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from .chunks import chunk_rows
from .stats import ChannelStats

COMPRESSIONS = ("none", "gzip", "lzf")     # filters h5py writes without plugins


@contextmanager
def atomic_h5(path: str):
    """An HDF5 file open for writing that appears at ``path`` only if the block succeeds."""
    import h5py

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class SplitWriter:
    """Append (images NCHW, labels) blocks to ``group/images`` and ``group/labels``."""

    def __init__(self, group, n: int, sample_shape, dtype, compression: str | None = None,
                 stats: bool = False):
        sample_shape = tuple(sample_shape)
        rows = chunk_rows(int(np.prod(sample_shape)) * np.dtype(dtype).itemsize)
        self.images = group.create_dataset(
            "images", shape=(n,) + sample_shape, dtype=dtype,
            chunks=(max(1, min(rows, n)),) + sample_shape,
            compression=compression if compression not in (None, "none") else None)
        self.labels = group.create_dataset("labels", shape=(n,), dtype=np.int64)
        self.stats = ChannelStats(sample_shape[0]) if stats else None
        self.n, self.pos = n, 0

    def append(self, images: np.ndarray, labels: np.ndarray) -> None:
        end = self.pos + len(images)
        if end > self.n or len(images) != len(labels):
            raise ValueError(f"block of {len(images)} images / {len(labels)} labels does "
                             f"not fit at row {self.pos} of {self.n}")
        self.images[self.pos: end] = images
        self.labels[self.pos: end] = labels
        if self.stats is not None:
            self.stats.add(images)
        self.pos = end


def write_attrs(f, stats: ChannelStats | None, classes=None, attrs=None) -> None:
    """Root attributes: mean/std from ``stats``, class names, provenance."""
    import h5py

    if stats is not None:
        f.attrs["mean"], f.attrs["std"] = stats.result()
    if classes is not None:
        f.attrs["classes"] = np.array([str(c) for c in classes], dtype=h5py.string_dtype())
    for key, value in (attrs or {}).items():
        f.attrs[key] = value


def write_splits(path: str, splits: dict, classes=None, attrs=None,
                 stats_from: str = "train") -> None:
    """Write ``{"train": (images NCHW, labels), "val": ...}`` atomically, with statistics."""
    with atomic_h5(path) as f:
        stats = None
        for name, (images, labels) in splits.items():
            writer = SplitWriter(f.create_group(name), len(images), images.shape[1:],
                                 images.dtype, stats=name == stats_from)
            writer.append(images, labels.astype(np.int64))
            stats = writer.stats or stats
        write_attrs(f, stats, classes, attrs)
