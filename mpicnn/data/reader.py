"""Read rows of one split from HDF5 as whole, chunk-aligned units (numpy and h5py only).

Every file access is one contiguous slice of ``unit`` rows aligned to the file's
chunks, so HDF5 decompresses each chunk once and the OS reads forward. Units are kept
in a small LRU (bounded memory) or, with ``--cache``, in a store that holds the rank's
whole range (:mod:`stores`). This module imports no torch, so a reader process
starts quickly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import to_nchw
from .schema import open_h5
from .stores import MISSING, RangeStore, SlabStore

CHUNK_CACHE_BYTES = 1 << 20     # HDF5's own cache: units are read whole, once


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

    def open(self, images=None) -> ChunkReader:
        """A reader on ``images`` (an open h5py dataset), or on the file opened here."""
        if images is None:
            images = open_h5(self.path, rdcc_nbytes=CHUNK_CACHE_BYTES)[self.dataset]
        return ChunkReader(images, self)

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
        self.first_unit = spec.start // spec.unit
        units = (spec.start + spec.n - 1) // spec.unit - self.first_unit + 1
        if spec.cache_range is not None:
            self.store = RangeStore(*spec.cache_range, units, self.sample_shape, images.dtype)
        else:
            self.store = SlabStore(spec.capacity if spec.unit > 1 else 0, spec.unit, units,
                                   self.sample_shape, images.dtype)
        self.units_read = 0

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images (N, C, H, W) of sorted split ``rows``, into ``out`` when given."""
        rows = np.asarray(rows, np.int64)
        if self.spec.unit == 1 and self.spec.cache_range is None:
            stored = np.empty((len(rows),) + self.sample_shape, self.images.dtype)
            self._read_rows(rows, stored)
        else:
            stored = self._read_units(rows)
        images = to_nchw(stored, self.spec.layout)
        if out is None:
            return images
        out[: len(rows)] = images
        return out[: len(rows)]

    def _read_rows(self, rows: np.ndarray, stored: np.ndarray) -> None:
        """Runs of consecutive rows, one h5py call each, into ``stored``."""
        start = self.spec.start
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            a = start + int(rows[first])
            self.images.read_direct(stored, np.s_[a: a + last - first], np.s_[first: last])

    def _read_units(self, rows: np.ndarray) -> np.ndarray:
        """Load the units under ``rows`` that the store lacks, then gather in one indexing."""
        ids = (rows + self.spec.start) // self.spec.unit - self.first_unit
        offsets = self.store.offsets[ids]
        absent = offsets == MISSING
        if absent.any():
            keep = set(np.unique(ids).tolist())
            for u in np.unique(ids[absent]).tolist():
                self._load(u, keep)
            offsets = self.store.offsets[ids]
            absent = offsets == MISSING
            if absent.any():                  # rare: a batch wider than the whole store
                stored = np.empty((len(rows),) + self.sample_shape, self.images.dtype)
                stored[~absent] = self.store.rows[rows[~absent] + offsets[~absent]]
                extra = np.empty((int(absent.sum()),) + self.sample_shape, stored.dtype)
                self._read_rows(rows[absent], extra)
                stored[absent] = extra
                return stored
        return self.store.rows[rows + offsets]

    def _load(self, u: int, keep) -> None:
        """Read unit ``u`` (an index from ``first_unit``) into the store, if it has room."""
        unit, start = self.spec.unit, self.spec.start
        lo = max((self.first_unit + u) * unit - start, 0)
        hi = min((self.first_unit + u + 1) * unit - start, self.spec.n)
        if self.spec.cache_range is not None:     # only the cached range, never beyond
            lo, hi = max(lo, self.spec.cache_range[0]), min(hi, self.spec.cache_range[1])
        at = self.store.reserve(u, lo, hi - lo, keep)
        if at is not None:
            self.images.read_direct(self.store.rows, np.s_[start + lo: start + hi],
                                    np.s_[at: at + hi - lo])
            self.units_read += 1
