"""IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST), plain or ``.gz``, as a convert source.

An IDX file is ``00 00 <type> <dims>``, ``dims`` big-endian 32-bit sizes, then the
values row-major and big-endian. Plain files are memory-mapped; ``.gz`` files are read
forward in slices, so memory stays bounded by what ``convert`` asks for at once.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
import zlib

import numpy as np

from ..cluster.errors import MpicnnError
from .sources import Source, make_part

TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
         0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# "train-images-idx3-ubyte.gz", "emnist-digits-t10k-labels-idx1-ubyte", "train-images.idx3-ubyte"
NAME = re.compile(r"^(?P<prefix>.*?)[-_.]?(?P<kind>images|labels)[-_.]idx(?P<dims>\d)[-_.]ubyte"
                  r"(?P<gz>\.gz)?$", re.IGNORECASE)
ROLES = {"train": ("train",), "val": ("t10k", "test", "val")}
# IDX files carry no class names; these datasets publish theirs
KNOWN_CLASSES = {
    "fashion": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                "Sneaker", "Bag", "Ankle boot"],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}
DAMAGED = (EOFError, OSError, zlib.error)      # gzip.BadGzipFile is an OSError


def _open(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def read_header(path: str) -> tuple[np.dtype, tuple, int]:
    """(big-endian dtype, shape, bytes before the data) of an IDX file."""
    try:
        with _open(path) as fh:
            magic = fh.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in TYPES:
                raise MpicnnError(f"{path} is not an IDX file: it starts with "
                                  f"{magic.hex(' ') or 'nothing'}, IDX files with 00 00 "
                                  f"<type> <dims>")
            dims = fh.read(4 * magic[3])
    except DAMAGED as exc:
        raise MpicnnError(f"{path} cannot be read as IDX: {exc}") from None
    if magic[3] == 0 or len(dims) < 4 * magic[3]:
        raise MpicnnError(f"{path} is truncated inside its IDX header")
    shape = struct.unpack(f">{magic[3]}I", dims)
    return TYPES[magic[2]], shape, 4 + len(dims)


def _gzip_size(path: str) -> int:
    """The uncompressed size modulo 2**32 that a gzip file records in its last 4 bytes."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return struct.unpack("<I", fh.read(4))[0]


class GzipRows:
    """Rows of a gzipped IDX file as a lazy array: slices are read forward from the stream."""

    def __init__(self, path: str, dtype: np.dtype, shape: tuple, offset: int):
        self.path, self.offset, self.shape = path, offset, shape
        self.file_dtype, self.dtype, self.ndim = dtype, dtype.newbyteorder("="), len(shape)
        self.row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.fh = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("GzipRows reads contiguous slices only")
        a, b, _ = rows.indices(self.shape[0])
        b = max(a, b)
        if self.fh is None:
            self.fh = gzip.open(self.path, "rb")
        want = (b - a) * self.row
        try:
            self.fh.seek(self.offset + a * self.row)   # forward: decompresses and skips
            data = self.fh.read(want)
        except DAMAGED as exc:
            raise MpicnnError(f"{self.path} is truncated or damaged: {exc}") from None
        if len(data) < want:
            raise MpicnnError(f"{self.path} is truncated: its header promises "
                              f"{self.shape[0]} rows, the data ends inside row "
                              f"{a + len(data) // self.row}")
        out = np.frombuffer(data, self.file_dtype).reshape((b - a,) + self.shape[1:])
        return out.astype(self.dtype, copy=False)


def idx_array(path: str):
    """The values of an IDX file as an array-like read lazily (memory map or gzip stream)."""
    dtype, shape, offset = read_header(path)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if path.lower().endswith(".gz"):
        if _gzip_size(path) != (offset + expected) % 2 ** 32:
            raise MpicnnError(f"{path} is truncated or damaged: its gzip trailer does not "
                              f"record the {offset + expected} bytes its IDX header "
                              f"{shape} promises")
        return GzipRows(path, dtype, shape, offset)
    size = os.path.getsize(path)
    if size != offset + expected:
        what = "is truncated" if size < offset + expected else "has extra bytes"
        raise MpicnnError(f"{path} {what}: its IDX header {shape} of {dtype.name} promises "
                          f"{offset + expected} bytes, the file holds {size}")
    return np.memmap(path, dtype, "r", offset, shape)


def read_labels(path: str) -> np.ndarray:
    """A whole 1-d IDX labels file."""
    labels = idx_array(path)
    if labels.ndim != 1:
        raise MpicnnError(f"{path} holds an array of shape {labels.shape}, not 1-d labels; "
                          f"is it an images file?")
    return np.asarray(labels[:]).astype(np.int64)


def idx_pair(images_path: str, labels_path: str, where: str = ""):
    """(Part, class names) of one images file and its labels file."""
    images = idx_array(images_path)
    if images.ndim not in (3, 4):
        raise MpicnnError(f"{images_path} holds an array of shape {images.shape}, not images "
                          f"(N,H,W); is it a labels file?")
    labels = read_labels(labels_path)
    if len(labels) != len(images):
        raise MpicnnError(f"{images_path} holds {len(images)} images but {labels_path} "
                          f"{len(labels)} labels; they are not a pair")
    return make_part(images, labels, "auto", where or images_path)


def find_pairs(folder: str) -> dict:
    """{prefix: {"images": path, "labels": path}} of the IDX files in ``folder``."""
    pairs = {}
    for name in sorted(os.listdir(folder)):
        match = NAME.match(name)
        if match:
            pairs.setdefault(match["prefix"], {})[match["kind"].lower()] = \
                os.path.join(folder, name)
    return pairs


def _role(prefix: str) -> str | None:
    words = re.split(r"[-_.]", prefix.lower())
    return next((role for role, names in ROLES.items() if any(w in words for w in names)),
                None)


def known_classes(path: str, parts: dict) -> list:
    """Published class names of the dataset ``path`` names, if they cover the labels; else [].

    Only the folder holding the files counts, and a file's own name: the dataset's name,
    not some directory above it.
    """
    steps = os.path.abspath(path).lower().split(os.sep)
    lowered = "/".join(steps[-1:] if os.path.isdir(path) else steps[-2:])
    names = next((names for key, names in KNOWN_CLASSES.items() if key in lowered), [])
    top = max(int(p.labels.max()) for p in parts.values()) + 1
    return names if len(names) >= top else []


def idx_folder_source(folder: str) -> Source:
    """A folder of IDX pairs: ``train-*`` becomes /train, ``t10k-*`` (or test) /val."""
    pairs = find_pairs(folder)
    for prefix, pair in pairs.items():
        if len(pair) != 2:
            missing = "labels" if "images" in pair else "images"
            raise MpicnnError(f"{folder} has {os.path.basename(next(iter(pair.values())))} "
                              f"but no matching {missing} file")
    roles = {}
    for prefix in pairs:
        roles.setdefault(_role(prefix), []).append(prefix)
    if len(pairs) == 1:
        chosen = {"all": next(iter(pairs))}
    elif sorted(roles) == ["train", "val"] and all(len(v) == 1 for v in roles.values()):
        chosen = {role: prefixes[0] for role, prefixes in roles.items()}
    else:
        raise MpicnnError(f"{folder} holds IDX pairs {', '.join(repr(p) for p in pairs)}; "
                          f"convert needs one pair, or one train and one t10k/test pair: "
                          f"move the others away or give one images file with --labels")
    parts = {role: idx_pair(pairs[prefix]["images"], pairs[prefix]["labels"])[0]
             for role, prefix in chosen.items()}
    files = ", ".join(os.path.basename(pairs[p]["images"]) for p in chosen.values())
    return Source(parts, known_classes(folder, parts), f"converted from IDX files {files}")


def idx_file_source(images_path: str, labels_path: str) -> Source:
    """One IDX images file and its labels (``--labels``), split by ``--val-fraction``."""
    match = NAME.match(os.path.basename(images_path))
    if not labels_path and match:          # its partner beside it
        sibling = find_pairs(os.path.dirname(images_path) or ".").get(match["prefix"], {})
        labels_path = sibling.get("labels", "")
    if not labels_path:
        raise MpicnnError(f"{images_path} holds only images: give its labels file with "
                          f"--labels LABELS-idx1-ubyte")
    parts = {"all": idx_pair(images_path, labels_path)[0]}
    return Source(parts, known_classes(images_path, parts),
                  f"converted from IDX file {os.path.basename(images_path)}")
