"""Every zoo model builds for its input shape and outputs one logit per class."""
import pytest
import torch

from mpicnn.cluster.errors import MpicnnError
from mpicnn.training.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape,classes", [((1, 8, 8), 10), ((3, 32, 32), 10),
                                           ((3, 28, 28), 7)])
def test_output_shape(name, shape, classes):
    model = build_model(name, shape, classes)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, classes)


def test_seednet_has_the_documented_size():
    model = build_model("seednet", (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == 2_141_514


def test_custom_model_by_import_path():
    model = build_model("tests.custom_model:TinyNet", (1, 8, 8), 10)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_unknown_and_misfitting_models_fail_clearly():
    with pytest.raises(MpicnnError, match="unknown model 'vgg99'"):
        build_model("vgg99", (1, 8, 8), 10)
    with pytest.raises(MpicnnError, match="cannot import model"):
        build_model("no.such.module:Net", (1, 8, 8), 10)
    with pytest.raises(MpicnnError, match="does not accept|cannot be built"):
        build_model("tests.custom_model:Fixed32", (1, 8, 8), 10)


def test_constructor_shapes_users_bring_are_accepted_and_logged():
    lines = []
    model = build_model("tests.custom_model:KeywordNet", (1, 5, 5), 7, lines.append)
    assert model(torch.zeros(3, 1, 5, 5)).shape == (3, 7)
    assert lines == ["model tests.custom_model:KeywordNet: built as KeywordNet(num_classes=7)"]
    lines.clear()
    build_model("tests.custom_model:TinyNet", (1, 8, 8), 10, lines.append)
    assert lines == ["model tests.custom_model:TinyNet: built as TinyNet((1, 8, 8), 10)"]
    lines.clear()
    # a no-argument constructor is called as such; it then fails on its flatten, not on
    # "takes 1 positional argument but 3 were given"
    with pytest.raises(MpicnnError) as caught:
        build_model("tests.custom_model:DataParallelNet", (3, 32, 32), 10, lines.append)
    assert lines == ["model tests.custom_model:DataParallelNet: built as DataParallelNet()"]
    message = str(caught.value)
    assert "changed the batch dimension: 2 samples in, 32 rows out (16 per sample)" in message
    assert "x.view(-1, K)" in message and "x.flatten(1)" in message
    # on 8x8 inputs the same net fits, and is built
    assert build_model("tests.custom_model:DataParallelNet", (3, 8, 8), 10)


def test_constructors_that_fit_no_shape_name_the_shapes():
    with pytest.raises(MpicnnError, match=r"its signature is \(depth, width, activation\); "
                                          r"mpicnn calls Class\(input_shape, num_classes\), "
                                          r"Class\(num_classes=N\) or Class\(\)"):
        build_model("tests.custom_model:NeedsDepth", (1, 8, 8), 10)


def test_undeclared_sparse_labels_warn_with_the_distinct_count(tmp_path):
    import numpy as np

    from mpicnn.data.schema import label_warning, open_dataset
    from mpicnn.data.writer import write_splits

    images = np.zeros((40, 1, 4, 5), np.uint8)
    codes = np.array([0, 5, 17, 23, 42, 50, 61, 77, 80, 95, 99] * 4)[:40]
    write_splits(str(tmp_path / "codes.h5"), {"train": (images[:30], codes[:30]),
                                              "val": (images[30:], codes[30:])})
    data = open_dataset(str(tmp_path / "codes.h5"))
    message = label_warning(data)
    assert data.num_classes == 100
    assert "reach 99 but only 11 distinct values occur" in message
    assert "remap them to 0..10" in message and "convert --classes" in message
    data.close()
    write_splits(str(tmp_path / "dense.h5"), {"train": (images[:30], np.arange(30) % 3),
                                              "val": (images[30:], np.arange(10) % 3)})
    data = open_dataset(str(tmp_path / "dense.h5"))
    assert label_warning(data) == ""
    data.close()
