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
