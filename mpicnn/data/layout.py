"""Image layouts: which axis holds the channels, and the one transform to NCHW.

Files and sources store images as ``nchw``, ``nhwc`` or ``nhw`` (one channel, no
axis); the model, the writer and the statistics see (N, C, H, W).
"""
from __future__ import annotations

import numpy as np

from ..cluster.errors import MpicnnError

LAYOUTS = ("nchw", "nhwc", "nhw")
CHOICES = ("auto", "nchw", "nhwc")     # what --layout accepts (3-d images are always nhw)


def detect_layout(shape: tuple, layout: str = "auto") -> str:
    """The layout of images of ``shape``: ``nhw`` for 3-d; for 4-d ``layout``, or if
    ``auto`` the one the shape shows unambiguously."""
    if len(shape) == 3:
        return "nhw"
    if layout != "auto":
        return layout
    _, a, b, c = shape
    nchw = a <= 4 or (b == c and a != b)
    nhwc = c <= 4 or (a == b and c != a)
    if nchw != nhwc:
        return "nchw" if nchw else "nhwc"
    raise MpicnnError(f"cannot tell whether images of shape {tuple(shape)} are channels-first "
                      f"or channels-last; pass --layout nchw or --layout nhwc")


def sample_shape(shape: tuple, layout: str) -> tuple[int, int, int]:
    """(C, H, W) of one sample of images of ``shape`` stored in ``layout``."""
    if layout == "nhw":
        return (1,) + tuple(shape[1:])
    if layout == "nhwc":
        return (shape[3], shape[1], shape[2])
    return tuple(shape[1:])


def to_nchw(images: np.ndarray, layout: str, dtype=None) -> np.ndarray:
    """``images`` stored in ``layout`` as a contiguous (N, C, H, W) array (of ``dtype``)."""
    if layout == "nhwc":
        images = images.transpose(0, 3, 1, 2)
    elif layout == "nhw":
        images = images[:, None]
    # one copy at most: the transpose above is a view, the cast and reorder happen together
    return np.ascontiguousarray(images, dtype=dtype)
