"""Open an HDF5 dataset and check it against the mpicnn schema.

Schema: groups ``train`` and ``val``, each holding ``images`` (N,C,H,W) or
(N,H,W,C) uint8/float and ``labels`` (N,) integer; optional root attributes
``classes`` (names), ``mean`` and ``std`` (per channel, in stored pixel units).
A flat file (``images``/``labels`` at the root) is split by ``val_fraction``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..cluster.errors import MpicnnError
from .layout import detect_layout, sample_shape

SPLITS = ("train", "val")
NAN_SAMPLE = 256           # float images checked for NaN/Inf per split
CHUNK_CACHE_BYTES = 16 << 20


@dataclass
class Split:
    """One split: an h5py images dataset, its labels in memory, and a row range."""

    name: str
    images: object           # h5py.Dataset
    labels: np.ndarray       # int64, only this split's rows
    start: int = 0           # first row of this split inside ``images``

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    path: str
    layout: str                       # as stored: one of layout.LAYOUTS
    input_shape: tuple                # (C, H, W) as the model sees it
    num_classes: int
    mean: np.ndarray                  # (C,) in stored pixel units
    std: np.ndarray
    train: Split
    val: Split
    classes: list
    file: object = None               # the open h5py.File
    stats_in_file: bool = True        # False: mean/std are the dtype defaults

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def open_h5(path: str, rdcc_nbytes: int = CHUNK_CACHE_BYTES):
    """Open read-only, without HDF5 file locking (parallel filesystems)."""
    import h5py

    if not os.path.exists(path):
        raise MpicnnError(f"data file {path!r} does not exist; check --data")
    if os.path.isdir(path):
        raise MpicnnError(f"data path {path!r} is a directory; give --data the .h5 file")
    try:
        return h5py.File(path, "r", locking=False, rdcc_nbytes=rdcc_nbytes)
    except OSError as exc:
        if not h5py.is_hdf5(path):
            raise MpicnnError(f"{path!r} is not an HDF5 file; give --data a file in the "
                              f"mpicnn schema (see the README)") from None
        if "truncated" in str(exc):
            raise MpicnnError(f"{path!r} is truncated ({exc}); copy or write it "
                              f"again") from None
        raise MpicnnError(f"cannot open {path!r}: {exc}; check that it is readable and "
                          f"not damaged") from None


def _get(container, key: str, where: str):
    if key not in container:
        have = ", ".join(sorted(container.keys())) or "nothing"
        raise MpicnnError(f"{where} has no dataset {key!r} (it has: {have}); "
                          f"choose with --images-key / --labels-key")
    return container[key]


def _check_images(images, where: str) -> None:
    if images.ndim not in (3, 4):
        raise MpicnnError(f"{where} images must be 4-d (N,C,H,W or N,H,W,C), got shape "
                          f"{images.shape}; store one image per row")
    kind = images.dtype.kind
    if not (images.dtype == np.uint8 or kind == "f"):
        raise MpicnnError(f"{where} images must be uint8 or float, got {images.dtype}; "
                          f"convert them to uint8 or float32")


def _read_labels(labels, where: str, rows: slice = slice(None)) -> np.ndarray:
    if labels.ndim != 1 and not (labels.ndim == 2 and labels.shape[1] == 1):
        raise MpicnnError(f"{where} labels must be 1-d (N,), got shape {labels.shape}; "
                          f"store one class index per image")
    if labels.dtype.kind not in "iu":
        raise MpicnnError(f"{where} labels must be integers, got {labels.dtype}; store "
                          f"class indices 0..classes-1 as integers")
    values = np.asarray(labels[rows]).reshape(-1).astype(np.int64)
    if values.size and values.min() < 0:
        raise MpicnnError(f"{where} labels contain negative values (min {values.min()}); "
                          f"class indices start at 0")
    return values


def _check_lengths(images, labels, where: str) -> None:
    if len(images) != len(labels):
        raise MpicnnError(f"{where} has {len(images)} images but {len(labels)} labels; "
                          f"every image needs exactly one label")


def _check_finite(split: Split, where: str) -> None:
    images = split.images
    if images.dtype.kind != "f" or len(split) == 0:
        return
    rows = np.unique(np.linspace(0, len(split) - 1, min(NAN_SAMPLE, len(split))).astype(int))
    sample = images[split.start + rows]
    if not np.isfinite(sample).all():
        raise MpicnnError(f"{where} images contain NaN or Inf values (sampled check); "
                          f"clean the file or convert it with `python -m mpicnn.data`")


def open_dataset(path: str, images_key: str = "images", labels_key: str = "labels",
                 layout: str = "auto", val_fraction: float = 0.1) -> Dataset:
    """Open and validate ``path``; every failure is an MpicnnError naming the fix."""
    f = open_h5(path)
    try:
        return _describe(f, path, images_key, labels_key, layout, val_fraction)
    except MpicnnError:
        f.close()
        raise
    except Exception as exc:          # corrupt internals surface as h5py errors
        f.close()
        raise MpicnnError(f"cannot read {path!r}: {type(exc).__name__}: {exc}; the file "
                          f"may be damaged") from None


def _describe(f, path, images_key, labels_key, layout, val_fraction) -> Dataset:
    if all(s in f for s in SPLITS):
        splits = {}
        for name in SPLITS:
            group = f[name]
            images = _get(group, images_key, f"{path}:/{name}")
            labels = _get(group, labels_key, f"{path}:/{name}")
            _check_images(images, f"{path}:/{name}")
            _check_lengths(images, labels, f"{path}:/{name}")
            splits[name] = Split(name, images, _read_labels(labels, f"{path}:/{name}"))
    elif images_key in f and labels_key in f:
        images, labels = f[images_key], f[labels_key]
        _check_images(images, path)
        _check_lengths(images, labels, path)
        all_labels = _read_labels(labels, path)
        n_val = int(round(len(all_labels) * val_fraction))
        n_train = len(all_labels) - n_val
        splits = {"train": Split("train", images, all_labels[:n_train], 0),
                  "val": Split("val", images, all_labels[n_train:], n_train)}
    else:
        have = ", ".join(sorted(f.keys())) or "nothing"
        missing = [s for s in SPLITS if s not in f]
        raise MpicnnError(f"{path!r} has neither groups 'train' and 'val' (missing "
                          f"{', '.join(missing)}) nor datasets {images_key!r} and "
                          f"{labels_key!r} at the root (it has: {have})")

    for split in splits.values():
        if len(split) == 0:
            raise MpicnnError(f"the {split.name} split of {path!r} is empty; add samples "
                              f"to it")

    first = splits["train"].images
    stored_layout = detect_layout(first.shape, layout)
    shape = sample_shape(first.shape, stored_layout)
    for split in splits.values():
        if split.images.shape[1:] != first.shape[1:]:
            raise MpicnnError(f"train and val images differ in shape: "
                              f"{first.shape[1:]} vs {split.images.shape[1:]}; store both "
                              f"splits at one size")

    classes = [c.decode() if isinstance(c, bytes) else str(c)
               for c in np.atleast_1d(f.attrs["classes"])] if "classes" in f.attrs else []
    top = max(int(s.labels.max()) for s in splits.values()) + 1
    num_classes = len(classes) or top
    if top > num_classes:
        raise MpicnnError(f"labels go up to {top - 1} but the file declares "
                          f"{num_classes} classes; fix the labels or the 'classes' "
                          f"attribute")

    channels = shape[0]
    default_std = 255.0 if first.dtype == np.uint8 else 1.0
    mean = np.broadcast_to(np.asarray(f.attrs.get("mean", 0.0), np.float32), (channels,))
    std = np.broadcast_to(np.asarray(f.attrs.get("std", default_std), np.float32), (channels,))
    if (std <= 0).any():
        raise MpicnnError(f"{path!r} attribute 'std' must be positive, got {std}")
    for split in splits.values():
        _check_finite(split, f"{path}:/{split.name}")
    return Dataset(path=path, layout=stored_layout, input_shape=shape,
                   num_classes=num_classes, mean=mean.copy(), std=std.copy(),
                   train=splits["train"], val=splits["val"], classes=classes, file=f,
                   stats_in_file="mean" in f.attrs and "std" in f.attrs)


def label_warning(data: Dataset) -> str:
    """A warning when undeclared classes leave label indices unused, else ""."""
    if data.classes:
        return ""
    distinct = len(np.union1d(np.unique(data.train.labels), np.unique(data.val.labels)))
    if distinct == data.num_classes:
        return ""
    return (f"labels of {data.path} reach {data.num_classes - 1} but only {distinct} distinct "
            f"values occur, and the file declares no classes: the model gets "
            f"{data.num_classes} outputs. If the labels are codes, remap them to "
            f"0..{distinct - 1} (convert does this for string labels); to keep "
            f"{data.num_classes} classes, declare their names (convert --classes A,B,... or "
            f"the file's 'classes' attribute)")
