"""Sources for ``convert``: arrays (.npz, .npy, .h5) and folders of class subfolders.

A source is read lazily: ``.npy`` files are memory-mapped, ``.h5`` datasets stay on
disk and image files are decoded only when their rows are asked for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..cluster.errors import MpicnnError
from .layout import detect_layout
from .schema import open_h5

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                  ".ppm", ".pgm")
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation", "test")}


@dataclass
class Part:
    """One split of the source: images (array-like, any layout), labels (int64)."""

    images: object
    labels: np.ndarray
    layout: str = "nchw"             # of ``images``: nchw, nhwc or nhw


@dataclass
class Source:
    parts: dict                       # "train"/"val" -> Part, or "all" -> Part (to split)
    classes: list = field(default_factory=list)
    description: str = ""


# --- arrays --------------------------------------------------------------------------
def _labels(values, where: str):
    """int64 labels and class names; string labels become indices of their sorted names."""
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise MpicnnError(f"{where}: labels must be 1-d, got shape {values.shape}")
    if values.dtype.kind in "iu":
        if values.size and values.min() < 0:
            raise MpicnnError(f"{where}: labels must not be negative (min {values.min()})")
        return values.astype(np.int64), []
    if values.dtype.kind in "USO":
        names, index = np.unique(values.astype(str), return_inverse=True)
        return index.astype(np.int64), list(names)
    if values.dtype.kind == "f" and np.all(values == np.round(values)):
        return values.astype(np.int64), []
    raise MpicnnError(f"{where}: labels must be integers or class names, got {values.dtype}")


def make_part(images, labels, layout: str, where: str) -> tuple[Part, list]:
    """A checked Part of ``images`` and ``labels``, and the class names string labels give."""
    if images.ndim not in (3, 4):
        raise MpicnnError(f"{where}: images must be (N,C,H,W), (N,H,W,C) or (N,H,W), "
                          f"got shape {images.shape}")
    if images.dtype.kind not in "uif":
        raise MpicnnError(f"{where}: images must be numeric, got {images.dtype}")
    values, names = _labels(labels, where)
    if len(values) != len(images):
        raise MpicnnError(f"{where}: {len(images)} images but {len(values)} labels")
    return Part(images, values, detect_layout(images.shape, layout)), names


def _npz_header(archive, key: str) -> tuple:
    """(shape, dtype) of one array in an .npz without decompressing it."""
    fmt = np.lib.format
    with archive.zip.open(key + ".npy") as fh:
        version = fmt.read_magic(fh)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(fh)
    return shape, dtype


def _pick_keys(arrays: dict, images_key, labels_key, val_images_key, val_labels_key,
               where: str) -> dict:
    """{"train"/"val"/"all": (images key, labels key)}, given or guessed from shapes."""
    if images_key or labels_key:
        if not (images_key and labels_key):
            raise MpicnnError("give both --images-key and --labels-key")
        keys = {"all": (images_key, labels_key)}
        if val_images_key or val_labels_key:
            if not (val_images_key and val_labels_key):
                raise MpicnnError("give both --val-images-key and --val-labels-key")
            keys = {"train": (images_key, labels_key),
                    "val": (val_images_key, val_labels_key)}
        for key in [k for pair in keys.values() for k in pair]:
            if key not in arrays:
                raise MpicnnError(f"{where} has no array {key!r} (it has: "
                                  f"{', '.join(arrays)})")
        return keys
    imgs = [k for k, (shape, _) in arrays.items() if len(shape) in (3, 4)]
    labs = [k for k, (shape, _) in arrays.items()
            if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)]
    listing = ", ".join(f"{k} {tuple(s)}" for k, (s, _) in arrays.items())
    hint = (f"{where} holds {listing}; name the arrays with --images-key/--labels-key "
            f"(and --val-images-key/--val-labels-key)")

    def partner(image_key):
        same = [k for k in labs if arrays[k][0][0] == arrays[image_key][0][0]]
        if len(same) == 1:
            return same[0]
        named = [k for k in same if _role(k) == _role(image_key)]
        if len(named) == 1:
            return named[0]
        raise MpicnnError(f"cannot tell which labels belong to {image_key!r}: {hint}")

    if len(imgs) == 1:
        return {"all": (imgs[0], partner(imgs[0]))}
    if len(imgs) == 2 and {_role(k) for k in imgs} == {"train", "val"}:
        return {_role(k): (k, partner(k)) for k in imgs}
    raise MpicnnError(f"cannot tell which arrays are images and labels: {hint}")


def _role(key: str) -> str | None:
    lowered = key.lower()
    for role, words in SPLIT_FOLDERS.items():
        if any(w in lowered for w in words):
            return role
    return None


def array_source(path: str, labels_path: str = "", images_key: str = "",
                 labels_key: str = "", val_images_key: str = "", val_labels_key: str = "",
                 layout: str = "auto") -> Source:
    """A .npz, .npy (+ ``labels_path``) or .h5 file of arrays."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        if not labels_path:
            raise MpicnnError(f"{path} holds only images: give the labels with --labels "
                              f"LABELS.npy")
        images = np.load(path, mmap_mode="r")
        part, names = make_part(images, np.load(labels_path), layout, path)
        return Source({"all": part}, names, f"converted from {os.path.basename(path)}")
    if suffix == ".npz":
        archive = np.load(path)
        arrays = {key: _npz_header(archive, key) for key in archive.files}
        loader = archive.__getitem__
    elif suffix in (".h5", ".hdf5", ".he5"):
        f = open_h5(path)
        arrays = {}
        f.visititems(lambda name, obj: arrays.__setitem__(name, (obj.shape, obj.dtype))
                     if hasattr(obj, "shape") else None)
        if not (images_key or labels_key) and {"train/images", "train/labels", "val/images",
                                               "val/labels"} <= set(arrays):
            images_key, labels_key = "train/images", "train/labels"
            val_images_key, val_labels_key = "val/images", "val/labels"
        loader = f.__getitem__
    else:
        raise MpicnnError(f"cannot convert {path!r}: give a .npz, .npy or .h5 file, or a "
                          f"folder with one subfolder per class")
    keys = _pick_keys(arrays, images_key, labels_key, val_images_key, val_labels_key, path)
    parts, classes = {}, []
    for name, (ik, lk) in keys.items():
        parts[name], names = make_part(loader(ik), loader(lk)[()] if suffix != ".npz"
                                   else loader(lk), layout, f"{path}:{ik}")
        classes = classes or names
    return Source(parts, classes, f"converted from {os.path.basename(path)} "
                                  f"({', '.join(f'{n}={k}' for n, k in keys.items())})")


# --- image folders -------------------------------------------------------------------
class ImageFiles:
    """A lazily decoded (N, H, W, C) uint8 array over image files (needs Pillow)."""

    def __init__(self, files: list, size: tuple | None, channels: int | None):
        try:
            from PIL import Image
        except ImportError:
            raise MpicnnError("converting image folders needs Pillow (pip install Pillow, "
                              "or the 'images' extra)") from None
        self.Image, self.files = Image, files
        with Image.open(files[0]) as first:
            self.mode = "L" if (channels or (1 if first.mode in ("1", "L", "I", "I;16", "F")
                                             else 3)) == 1 else "RGB"
            self.size = (size[1], size[0]) if size else first.size       # PIL: (W, H)
        c = 1 if self.mode == "L" else 3
        self.shape = (len(files), self.size[1], self.size[0], c)
        self.dtype, self.ndim = np.dtype(np.uint8), 4
        self.resize = size is not None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = range(len(self.files))[rows]
        out = np.empty((len(rows),) + self.shape[1:], np.uint8)
        for i, row in enumerate(rows):
            path = self.files[row]
            try:
                with self.Image.open(path) as img:
                    img = img.convert(self.mode)
                    if img.size != self.size:
                        if not self.resize:
                            raise MpicnnError(
                                f"{path} is {img.size[0]}x{img.size[1]} (WxH) but the first "
                                f"image is {self.size[0]}x{self.size[1]}; pass --size HxW "
                                f"to resize all images")
                        img = img.resize(self.size, self.Image.BILINEAR)
                    out[i] = np.asarray(img).reshape(self.shape[1:])
            except OSError as exc:
                raise MpicnnError(f"cannot read image {path}: {exc}") from None
        return out


def _class_files(root: str) -> tuple[list, list]:
    """(sorted class names, [(file, class index)]) from one subfolder per class."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = []
    for k, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, name))):
            files += [(os.path.join(dirpath, f), k) for f in sorted(names)
                      if f.lower().endswith(IMAGE_SUFFIXES)]
    return classes, files


def folder_source(root: str, size: tuple | None = None, channels: int | None = None
                  ) -> Source:
    """``root/<class>/*.png``, or ``root/train/<class>/…`` and ``root/val/<class>/…``."""
    subdirs = {d.lower(): d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
    split_dirs = {role: next((subdirs[w] for w in words if w in subdirs), None)
                  for role, words in SPLIT_FOLDERS.items()}
    if all(split_dirs.values()):
        roots = {role: os.path.join(root, d) for role, d in split_dirs.items()}
    else:
        roots = {"all": root}
    parts, classes = {}, None
    for role, path in roots.items():
        names, files = _class_files(path)
        if classes is not None and names != classes:
            raise MpicnnError(f"{path} has classes {names} but {roots['train']} has "
                              f"{classes}; both splits need the same class folders")
        classes = names
        if len(names) < 2 or not files:
            raise MpicnnError(f"{path} needs one subfolder per class (at least 2) holding "
                              f"images ({', '.join(IMAGE_SUFFIXES)}); found {len(names)} "
                              f"folder(s), {len(files)} image(s)")
        images = ImageFiles([f for f, _ in files], size, channels)
        parts[role] = Part(images, np.array([k for _, k in files], np.int64), "nhwc")
    return Source(parts, classes, f"converted from image folder {os.path.basename(root)}")
