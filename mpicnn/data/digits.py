"""Write the UCI optical handwritten digits (scikit-learn's bundled copy) as mpicnn HDF5."""
from __future__ import annotations

import numpy as np

from ..cluster.errors import MpicnnError
from .convert import stratified_split
from .writer import write_splits

VAL_PER_CLASS_FRACTION = 0.2
SPLIT_SEED = 0


def digits_arrays():
    """(images uint8 (N,1,8,8) scaled 0..255, labels int64) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MpicnnError("the digits conversion needs scikit-learn "
                          "(pip install scikit-learn)") from None
    digits = load_digits()
    images = np.clip(digits.images * 16.0, 0, 255).round().astype(np.uint8)[:, None]
    return images, digits.target.astype(np.int64)


def write_digits(out: str) -> dict:
    images, labels = digits_arrays()
    train, val = stratified_split(labels, VAL_PER_CLASS_FRACTION, SPLIT_SEED)
    attrs = {"source": "UCI ML Optical Recognition of Handwritten Digits "
                       "(scikit-learn load_digits), CC BY 4.0",
             "split": f"stratified, val fraction {VAL_PER_CLASS_FRACTION}, seed {SPLIT_SEED}"}
    write_splits(out, {"train": (images[train], labels[train]),
                       "val": (images[val], labels[val])},
                 classes=[str(i) for i in range(10)], attrs=attrs)
    return {"train": len(train), "val": len(val)}
