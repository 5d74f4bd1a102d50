"""Image layouts: detection from the shape, and the one transform to NCHW (no MPI)."""
import numpy as np
import pytest

from mpicnn.cluster.errors import MpicnnError
from mpicnn.data.layout import LAYOUTS, detect_layout, sample_shape, to_nchw


@pytest.mark.parametrize("shape,layout", [((5, 3, 32, 32), "nchw"), ((5, 32, 32, 3), "nhwc"),
                                          ((5, 1, 28, 28), "nchw"), ((5, 28, 28, 1), "nhwc"),
                                          ((5, 28, 28), "nhw")])
def test_layout_detection(shape, layout):
    assert detect_layout(shape, "auto") == layout


def test_ambiguous_layout_asks_for_the_flag():
    with pytest.raises(MpicnnError, match="--layout"):
        detect_layout((5, 3, 3, 3), "auto")
    assert detect_layout((5, 3, 3, 3), "nhwc") == "nhwc"
    assert detect_layout((5, 3, 3), "nchw") == "nhw"        # 3-d has no channel axis


@pytest.mark.parametrize("layout", LAYOUTS)
def test_to_nchw_puts_every_pixel_where_the_model_expects_it(layout):
    channels = 1 if layout == "nhw" else 3
    nchw = np.arange(4 * channels * 5 * 6, dtype=np.uint8).reshape(4, channels, 5, 6)
    stored = {"nchw": nchw, "nhwc": nchw.transpose(0, 2, 3, 1).copy(),
              "nhw": nchw[:, 0].copy()}[layout]
    out = to_nchw(stored, layout)
    assert out.flags.c_contiguous and out.dtype == np.uint8
    assert np.array_equal(out, nchw)
    assert out.shape[1:] == sample_shape(stored.shape, layout)
    as_float = to_nchw(stored, layout, np.float32)
    assert as_float.dtype == np.float32 and as_float.flags.c_contiguous
    assert np.array_equal(as_float, nchw.astype(np.float32))
