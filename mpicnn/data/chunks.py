"""Row counts of HDF5 I/O: chunks, read units and write blocks, all whole samples.

Writer and reader agree here: files are chunked in about 1 MiB of whole samples, a
reader reads one chunk (or, in contiguous files, as many rows) per access, and tools
stream whole numbers of chunks per block.
"""
from __future__ import annotations

import numpy as np

CHUNK_BYTES = 1 << 20
BLOCK_BYTES = 16 << 20          # rows handed to HDF5 per write by the tools


def row_bytes(images) -> int:
    """Bytes of one row of ``images`` (an array or h5py dataset)."""
    return int(np.prod(images.shape[1:])) * images.dtype.itemsize


def chunk_rows(sample_bytes: int) -> int:
    """Rows per chunk: whole samples, about 1 MiB, so reads never cut a sample."""
    return max(1, CHUNK_BYTES // max(1, sample_bytes))


def block_rows(sample_bytes: int) -> int:
    """Rows per write block: a whole number of chunks, about ``BLOCK_BYTES``."""
    rows = chunk_rows(sample_bytes)
    return rows * max(1, BLOCK_BYTES // (rows * max(1, sample_bytes)))


def unit_rows(images) -> int:
    """Rows per read unit: the file's chunk height, or one chunk's worth if contiguous."""
    if images.chunks:
        return int(images.chunks[0])
    return chunk_rows(row_bytes(images))
