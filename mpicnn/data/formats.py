"""Which reader a ``convert`` SOURCE needs: IDX, CIFAR, arrays, or image folders."""
from __future__ import annotations

import os

from ..cluster.errors import MpicnnError
from .sources import Source

ARCHIVES = (".tar.gz", ".tgz", ".tar")


def open_source(path: str, labels: str = "", keys: tuple = ("", "", "", ""),
                layout: str = "auto", size: tuple | None = None, channels: int | None = None,
                coarse: bool = False) -> Source:
    """The source at ``path``, read lazily; ``keys``: images, labels, val images, val labels."""
    from . import cifar, idx, sources

    if not os.path.exists(path):
        raise MpicnnError(f"{path!r} does not exist")
    label_set = "coarse" if coarse else "fine"
    if os.path.isdir(path):
        if idx.find_pairs(path):
            return idx.idx_folder_source(path)
        if cifar.batch_folder(path):
            return cifar.cifar_source(path, label_set)
        return sources.folder_source(path, size, channels)
    lowered = path.lower()
    if lowered.endswith(ARCHIVES):
        return cifar.cifar_source(path, label_set)
    if idx.NAME.match(os.path.basename(path)) or lowered.endswith((".idx", ".gz")):
        return idx.idx_file_source(path, labels)
    return sources.array_source(path, labels, *keys, layout)

