"""Write arrays as an mpicnn HDF5 file: train/val groups, chunked per sample, with stats."""
from __future__ import annotations

import os

import numpy as np

SAMPLES_PER_CHUNK_BYTES = 1 << 20


def chunk_rows(sample_bytes: int) -> int:
    """Rows per chunk: whole samples, about 1 MiB, so reads never cut a sample."""
    return max(1, SAMPLES_PER_CHUNK_BYTES // max(1, sample_bytes))


def channel_stats(images: np.ndarray, layout: str = "nchw"):
    """Per-channel mean and std in stored pixel units."""
    axes = (0, 2, 3) if layout == "nchw" else (0, 1, 2)
    x = images.astype(np.float64)
    return x.mean(axis=axes).astype(np.float32), x.std(axis=axes).astype(np.float32)


def write_splits(path: str, splits: dict, classes=None, attrs=None,
                 stats_from: str = "train") -> None:
    """Write ``{"train": (images, labels), "val": ...}`` atomically (temp file + rename)."""
    import h5py

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            for name, (images, labels) in splits.items():
                group = f.create_group(name)
                rows = chunk_rows(int(np.prod(images.shape[1:])) * images.dtype.itemsize)
                group.create_dataset("images", data=images,
                                     chunks=(min(rows, len(images)),) + images.shape[1:])
                group.create_dataset("labels", data=labels.astype(np.int64))
            mean, std = channel_stats(splits[stats_from][0])
            f.attrs["mean"], f.attrs["std"] = mean, np.maximum(std, 1e-6)
            if classes is not None:
                f.attrs["classes"] = np.array(classes, dtype=h5py.string_dtype())
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
