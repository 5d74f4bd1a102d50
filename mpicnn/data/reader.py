"""Read rows of one split from HDF5 as whole, chunk-aligned units (numpy and h5py only).

Every file access is one contiguous slice of ``unit`` rows aligned to the file's
chunks, so HDF5 decompresses each chunk once and the OS reads forward. Units are kept
in a small LRU (bounded memory) or, with ``--cache``, in a :class:`RangeCache` that
holds the rank's whole range. This module imports no torch, so a reader process
starts quickly.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .cache import RangeCache

CHUNK_CACHE_BYTES = 1 << 20     # HDF5's own cache: units are read whole, once


def to_nchw(images: np.ndarray, layout: str) -> np.ndarray:
    """Stored layout -> contiguous (N, C, H, W)."""
    if layout == "nhwc":
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if layout == "nhw":
        return images[:, None]
    return images


def unit_rows(images) -> int:
    """Rows per read unit: the file's chunk height, or about 1 MiB for contiguous data."""
    from .writer import chunk_rows

    if images.chunks:
        return int(images.chunks[0])
    return chunk_rows(int(np.prod(images.shape[1:])) * images.dtype.itemsize)


class LRUStore:
    """The ``capacity`` most recently used units."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.units: OrderedDict = OrderedDict()

    def get(self, unit: int):
        rows = self.units.get(unit)
        if rows is not None:
            self.units.move_to_end(unit)
        return rows

    def put(self, unit: int, lo: int, rows: np.ndarray) -> np.ndarray:
        self.units[unit] = rows
        while len(self.units) > self.capacity:
            self.units.popitem(last=False)
        return rows


@dataclass
class ReaderSpec:
    """Everything needed to (re)open a reader, also in another process."""

    path: str
    dataset: str            # HDF5 path of the images dataset
    start: int              # first file row of the split
    n: int                  # rows in the split
    layout: str
    unit: int               # rows per read unit (1: read single rows, no unit store)
    capacity: int           # units kept in the LRU
    cache_range: tuple | None = None   # (lo, hi) split rows kept in RAM with --cache

    def open(self, images=None) -> "ChunkReader":
        """A reader on ``images`` (an open h5py dataset), or on the file opened here."""
        if images is None:
            from .schema import open_h5

            images = open_h5(self.path, rdcc_nbytes=CHUNK_CACHE_BYTES)[self.dataset]
        return ChunkReader(images, self)

    def unit_bytes(self, sample_bytes: int) -> int:
        return self.unit * sample_bytes

    def store_bytes(self, sample_bytes: int) -> int:
        """Memory the unit store may hold (the LRU, or the whole cached range)."""
        if self.cache_range is not None:
            return (self.cache_range[1] - self.cache_range[0]) * sample_bytes
        return 0 if self.unit == 1 else self.capacity * self.unit * sample_bytes


class ChunkReader:
    """Rows of one split, read through chunk-aligned units."""

    def __init__(self, images, spec: ReaderSpec):
        self.images, self.spec = images, spec
        self.sample_shape = tuple(images.shape[1:])
        if spec.cache_range is not None:
            self.store = RangeCache(*spec.cache_range, self.sample_shape, images.dtype)
        else:
            self.store = LRUStore(spec.capacity)
        self.units_read = 0

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images (N, C, H, W) of sorted split ``rows``, into ``out`` when given."""
        rows = np.asarray(rows)
        stored = np.empty((len(rows),) + self.sample_shape, self.images.dtype)
        if self.spec.unit == 1 and self.spec.cache_range is None:
            self._read_rows(rows, stored)
        else:
            self._read_units(rows, stored)
        images = to_nchw(stored, self.spec.layout)
        if out is None:
            return images
        out[: len(rows)] = images
        return out[: len(rows)]

    def _read_rows(self, rows: np.ndarray, stored: np.ndarray) -> None:
        """Row by row runs: for sample-level shuffles where no unit is reused."""
        start = self.spec.start
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(np.arange(len(rows)), breaks):
            if len(run):
                a = start + rows[run[0]]
                self.images.read_direct(stored, np.s_[a: a + len(run)],
                                        np.s_[run[0]: run[-1] + 1])

    def _read_units(self, rows: np.ndarray, stored: np.ndarray) -> None:
        unit, start = self.spec.unit, self.spec.start
        ids = (rows + start) // unit
        cuts = np.flatnonzero(np.diff(ids)) + 1
        for lo_i, hi_i in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
            u = int(ids[lo_i])
            lo, block = self._unit(u)
            stored[lo_i:hi_i] = block[rows[lo_i:hi_i] - lo]

    def _unit(self, u: int) -> tuple[int, np.ndarray]:
        """(first split row, rows) of unit ``u``, from the store or the file."""
        unit, start = self.spec.unit, self.spec.start
        lo = max(u * unit - start, 0)
        hi = min((u + 1) * unit - start, self.spec.n)
        if self.spec.cache_range is not None:     # only the cached range, never beyond
            lo, hi = max(lo, self.spec.cache_range[0]), min(hi, self.spec.cache_range[1])
        block = self.store.get(u)
        if block is None:
            block = self.store.put(u, lo, self.images[start + lo: start + hi])
            self.units_read += 1
        return lo, block
