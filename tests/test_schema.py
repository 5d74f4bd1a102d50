"""HDF5 schema variants and the shipped digits file."""
import h5py
import numpy as np
import pytest
import torch
from conftest import DIGITS, mpirun, read_jsonl

from mpicnn.cluster.errors import MpicnnError
from mpicnn.data.loader import Loader
from mpicnn.data.schema import open_dataset


def digits_arrays():
    with h5py.File(DIGITS, "r") as f:
        return (np.concatenate([f["train/images"][:], f["val/images"][:]]),
                np.concatenate([f["train/labels"][:], f["val/labels"][:]]))


def test_shipped_digits_file():
    data = open_dataset(str(DIGITS))
    assert (len(data.train), len(data.val)) == (1438, 359)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert data.classes == [str(i) for i in range(10)]
    counts = np.bincount(data.val.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37          # stratified
    assert data.train.images.dtype == np.uint8


def test_digits_command_reproduces_the_shipped_file(tmp_path):
    pytest.importorskip("sklearn")
    from mpicnn.data.__main__ import main

    out = tmp_path / "digits.h5"
    assert main(["digits", str(out)]) == 0
    with h5py.File(out, "r") as new, h5py.File(DIGITS, "r") as old:
        for key in ("train/images", "train/labels", "val/images", "val/labels"):
            assert np.array_equal(new[key][:], old[key][:])
        assert np.allclose(new.attrs["mean"], old.attrs["mean"])


def write_flat_nhwc(path, images_key="x", labels_key="y"):
    images, labels = digits_arrays()
    with h5py.File(path, "w") as f:
        f[images_key] = images.transpose(0, 2, 3, 1).repeat(3, axis=3)   # (N, 8, 8, 3)
        f[labels_key] = labels.astype(np.int32)


def test_flat_channels_last_file_with_other_keys(tmp_path):
    path = tmp_path / "flat.h5"
    write_flat_nhwc(path)
    with pytest.raises(MpicnnError, match="it has: x, y"):
        open_dataset(str(path))
    data = open_dataset(str(path), "x", "y", "auto", val_fraction=0.25)
    assert data.layout == "nhwc" and data.input_shape == (3, 8, 8)
    assert len(data.val) == round(1797 * 0.25) and len(data.train) + len(data.val) == 1797
    loader = Loader(data, data.val, torch.device("cpu"), 4)
    images, labels = loader.read(np.arange(3))
    assert images.shape == (3, 3, 8, 8)
    start = data.val.start
    assert np.array_equal(images[:, 0].numpy(), data.val.images[start:start + 3][..., 0])
    assert np.array_equal(labels.numpy(), data.val.labels[:3])


@pytest.mark.mpi
def test_training_on_a_flat_nhwc_file(tmp_path):
    path = tmp_path / "flat.h5"
    write_flat_nhwc(path)
    metrics = tmp_path / "m.jsonl"
    mpirun(2, ["--data", path, "--images-key", "x", "--labels-key", "y", "--layout", "nhwc",
               "--val-fraction", 0.2, "--epochs", 3, "--shuffle", "local", "--metrics", metrics])
    end = read_jsonl(metrics)[-1]
    assert end["val_acc"] > 0.85 and end["steps"] == 3 * ((1438 // 2) // 16)
