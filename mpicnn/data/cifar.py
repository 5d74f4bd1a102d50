"""CIFAR-10/100 "python version" batches, from their folder or the ``.tar.gz``, as a convert source.

CIFAR-10: ``data_batch_1..5`` (train), ``test_batch`` (val), names in ``batches.meta``.
CIFAR-100: ``train``, ``test``, names in ``meta``; fine (100) or coarse (20) labels.
Each batch is a pickled dict whose ``data`` is (N, 3072) uint8, channel-major 3x32x32.
Batches are unpickled one at a time (only numpy arrays and plain containers are
allowed in them), so memory stays bounded by the largest batch.
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np

from ..cluster.errors import MpicnnError
from .sources import Part, Source

SHAPE = (3, 32, 32)
ROW = int(np.prod(SHAPE))
CIFAR10 = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"],
           "meta": "batches.meta"}
CIFAR100 = {"train": ["train"], "val": ["test"], "meta": "meta"}
LABEL_SETS = ("fine", "coarse")


def _allowed_globals() -> dict:
    """What a CIFAR pickle may construct: numpy arrays and dtypes, nothing that runs code."""
    import _codecs

    try:
        from numpy._core import multiarray, numeric
    except ImportError:            # numpy 1
        from numpy.core import multiarray, numeric
    return {("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _codecs.encode}


class _DataUnpickler(pickle.Unpickler):
    allowed = None

    def find_class(self, module, name):
        allowed = _DataUnpickler.allowed = _DataUnpickler.allowed or _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data batch")
        return allowed[(module, name)]


def load_batch(raw: bytes, where: str) -> dict:
    """A pickled batch as a dict with str keys (Python 2 pickles give bytes keys)."""
    try:
        batch = _DataUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:       # any damage in a pickle surfaces as some exception
        raise MpicnnError(f"{where} is not a CIFAR python batch: {type(exc).__name__}: "
                          f"{exc}") from None
    if not isinstance(batch, dict):
        raise MpicnnError(f"{where} is not a CIFAR python batch: it holds a "
                          f"{type(batch).__name__}, not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def batch_folder(path: str) -> str | None:
    """``path``, or the one folder inside it (as the archive unpacks), if it holds CIFAR meta."""
    inner = [os.path.join(path, d) for d in os.listdir(path)
             if os.path.isdir(os.path.join(path, d))]
    for folder in [path] + (inner if len(inner) == 1 else []):
        if any(os.path.exists(os.path.join(folder, layout["meta"]))
               for layout in (CIFAR10, CIFAR100)):
            return folder
    return None


class Members:
    """The files of a CIFAR folder or ``.tar.gz``, found by their base names."""

    def __init__(self, path: str):
        self.path, self.archive = path, None
        if os.path.isdir(path):
            folder = batch_folder(path) or path
            self.names = {n: os.path.join(folder, n) for n in os.listdir(folder)}
        else:
            try:
                self.archive = tarfile.open(path, "r:*")
                self.names = {os.path.basename(m.name): m for m in self.archive.getmembers()
                              if m.isfile()}
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise MpicnnError(f"{path} is not a readable tar archive: {exc}") from None

    def where(self, name: str) -> str:
        """How errors name member ``name``: its path, or archive:member."""
        return f"{self.path}:{name}" if self.archive is not None else self.names[name]

    def read(self, name: str) -> bytes:
        where = self.where(name)
        try:
            if self.archive is None:
                with open(self.names[name], "rb") as fh:
                    return fh.read()
            return self.archive.extractfile(self.names[name]).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise MpicnnError(f"{where} is truncated or damaged: {exc}") from None

    def layout(self) -> dict:
        """The CIFAR-10 or CIFAR-100 file names these members hold."""
        for layout in (CIFAR10, CIFAR100):
            wanted = layout["train"] + layout["val"] + [layout["meta"]]
            if all(n in self.names for n in wanted):
                return layout
        raise MpicnnError(f"{self.path} holds neither CIFAR-10 python batches (data_batch_1..5, "
                          f"test_batch, batches.meta) nor CIFAR-100 ones (train, test, meta)")

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()


class CifarImages:
    """(N, 3, 32, 32) uint8 rows of consecutive batches, unpickled one batch at a time."""

    def __init__(self, members: Members, names: list, counts: list):
        self.members, self.names = members, names
        self.starts = np.cumsum([0] + counts)
        self.shape, self.dtype, self.ndim = (int(self.starts[-1]),) + SHAPE, np.dtype(np.uint8), 4
        self.held = (None, None)             # (batch index, its images)

    def __len__(self) -> int:
        return self.shape[0]

    def _batch(self, index: int) -> np.ndarray:
        if self.held[0] != index:
            name = self.names[index]
            data = load_batch(self.members.read(name), self.members.where(name))["data"]
            self.held = (index, np.asarray(data, np.uint8).reshape((-1,) + SHAPE))
        return self.held[1]

    def __getitem__(self, rows) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("CifarImages reads contiguous slices only")
        a, b, _ = rows.indices(self.shape[0])
        pieces = []
        while a < b:
            index = int(np.searchsorted(self.starts, a, side="right")) - 1
            end = min(b, int(self.starts[index + 1]))
            pieces.append(self._batch(index)[a - self.starts[index]: end - self.starts[index]])
            a = end
        return np.concatenate(pieces) if pieces else np.empty((0,) + SHAPE, np.uint8)


def _batch_labels(batch: dict, key: str, where: str) -> np.ndarray:
    """The labels of one batch, checked against its images."""
    if "data" not in batch or key not in batch:
        raise MpicnnError(f"{where} has no {'data' if 'data' not in batch else key!r} entry "
                          f"(it has: {', '.join(map(str, batch))})")
    data, labels = batch["data"], np.asarray(batch[key])
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != ROW:
        raise MpicnnError(f"{where}: 'data' must be (N, {ROW}) uint8 rows of 3x32x32 images, "
                          f"got {getattr(data, 'shape', type(data).__name__)}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise MpicnnError(f"{where} holds {len(data)} images but {labels.size} labels")
    return labels.astype(np.int64)


def cifar_source(path: str, label_set: str = "fine") -> Source:
    """CIFAR-10 or CIFAR-100 from the unpacked folder or the downloaded ``.tar.gz``."""
    members = Members(path)
    layout = members.layout()
    hundred = layout is CIFAR100
    key = f"{label_set}_labels" if hundred else "labels"
    parts = {}
    for role in ("train", "val"):
        labels, counts = [], []
        for name in layout[role]:        # a first pass for the labels; images come later
            where = members.where(name)
            labels.append(_batch_labels(load_batch(members.read(name), where), key, where))
            counts.append(len(labels[-1]))
        parts[role] = Part(CifarImages(members, layout[role], counts), np.concatenate(labels))
    meta = load_batch(members.read(layout["meta"]), members.where(layout["meta"]))
    names_key = f"{label_set}_label_names" if hundred else "label_names"
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    top = max(int(p.labels.max()) for p in parts.values()) + 1
    if len(classes) < top:
        raise MpicnnError(f"{members.where(layout['meta'])} names {len(classes)} classes but the "
                          f"labels go up to {top - 1}")
    which = f"CIFAR-100 ({label_set} labels)" if hundred else "CIFAR-10"
    return Source(parts, classes, f"converted from {which} python batches "
                                  f"{os.path.basename(path.rstrip('/'))}")
