"""``convert``: write a :mod:`sources` source as mpicnn HDF5.

Rows are written in a seeded random order (so the chunk-aware shuffle mixes classes),
NCHW, in whole-sample chunks, block by block (``.npy`` and ``.h5`` sources are never
loaded whole), with per-channel statistics of the train split.
"""
from __future__ import annotations

import numpy as np

from ..cluster.errors import MpicnnError
from .chunks import block_rows, row_bytes
from .layout import sample_shape, to_nchw
from .sources import ImageFiles, Source
from .writer import SplitWriter, atomic_h5, write_attrs

MEMORY_BYTES = 1 << 30          # rows gathered per forward scan of an on-disk source


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int):
    """Sorted train and val row indices with each class split in the same proportion."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(rows) * val_fraction))
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _out_dtype(dtype) -> np.dtype:
    """uint8 stays; floats become float32; other integers become float32 (no clipping)."""
    return np.dtype(np.uint8) if np.dtype(dtype) == np.uint8 else np.dtype(np.float32)


def write_source(source: Source, out: str, val_fraction: float = 0.1, seed: int = 0,
                 shuffle: bool = True, compression: str | None = None,
                 classes: list | None = None, progress=None,
                 memory: int = MEMORY_BYTES) -> dict:
    """Write ``source`` to ``out``; returns the rows per split."""
    rng = np.random.default_rng(seed)
    splits = {}                                 # name -> (Part, rows in output order)
    if "all" in source.parts:
        part = source.parts["all"]
        if not 0 < val_fraction < 1:
            raise MpicnnError("--val-fraction must be between 0 and 1 for a source "
                              "without train and val parts")
        train, val = stratified_split(part.labels, val_fraction, seed)
        if not len(train) or not len(val):
            raise MpicnnError(f"{len(part.labels)} samples are too few to split at "
                              f"--val-fraction {val_fraction}")
        splits = {"train": (part, train), "val": (part, val)}
    else:
        splits = {name: (p, np.arange(len(p.labels))) for name, p in source.parts.items()}
    classes = classes or source.classes
    with atomic_h5(out) as f:
        stats, counts = None, {}
        for name, (part, rows) in splits.items():
            if shuffle:
                rows = rng.permutation(rows)
            sample = sample_shape(part.images.shape, part.layout)
            dtype = _out_dtype(part.images.dtype)
            writer = SplitWriter(f.create_group(name), len(rows), sample, dtype,
                                 compression, stats=name == "train")
            step = block_rows(int(np.prod(sample)) * dtype.itemsize)
            for want, block in gathered(part.images, rows, step, memory):
                if dtype.kind == "f" and not np.isfinite(block).all():
                    raise MpicnnError(f"{name} images contain NaN or Inf; clean them first")
                writer.append(to_nchw(block, part.layout, dtype), part.labels[want])
                if progress:
                    progress(len(want))
            stats = writer.stats or stats
            counts[name] = len(rows)
        top = max(int(p.labels.max()) for p, _ in splits.values()) + 1
        if classes and len(classes) < top:
            raise MpicnnError(f"labels go up to {top - 1} but {len(classes)} class names "
                              f"were given")
        write_attrs(f, stats, classes or [str(k) for k in range(top)],
                    {"source": source.description})
    return counts


def gathered(images, rows: np.ndarray, step: int, memory: int):
    """(rows, images) blocks of ``step`` rows in the order of ``rows``, memory-bounded.

    In-memory arrays and image files are indexed directly. Arrays on disk (h5py, .npy
    maps) are read forward in large slices: ``rows`` is taken in segments of about
    ``memory`` bytes, each collected by one forward scan of the rows it spans (an
    exactly shuffled copy costs a scan per segment; ``--keep-order`` needs one).
    """
    on_disk = not isinstance(images, np.ndarray) or isinstance(images, np.memmap)
    if not on_disk or not hasattr(images, "dtype") or isinstance(images, ImageFiles):
        for a in range(0, len(rows), step):
            want = rows[a: a + step]
            ordered = np.sort(want)
            yield want, np.asarray(images[ordered])[np.searchsorted(ordered, want)]
        return
    segment = max(1, memory // max(1, row_bytes(images)))
    for s0 in range(0, len(rows), segment):
        want = rows[s0: s0 + segment]
        ordered = np.sort(want)
        held = np.empty((len(want),) + tuple(images.shape[1:]), images.dtype)
        for a in range(int(ordered[0]), int(ordered[-1]) + 1, step):
            lo, hi = np.searchsorted(ordered, [a, a + step])
            if hi > lo:
                span = np.asarray(images[a: min(a + step, int(ordered[-1]) + 1)])
                held[lo:hi] = span[ordered[lo:hi] - a]
        placed = np.searchsorted(ordered, want)
        for a in range(0, len(want), step):
            yield want[a: a + step], held[placed[a: a + step]]
