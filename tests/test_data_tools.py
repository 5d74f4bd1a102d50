"""``python -m mpicnn.data``: synth, convert and inspect on real files."""
import sys

import h5py
import numpy as np
import pytest
from conftest import DIGITS, run_command

from mpicnn.data.__main__ import main
from mpicnn.data.schema import open_dataset


def tool(*args):
    """Run the tool in this process; returns its exit code."""
    return main([str(a) for a in args])


def rows_as_set(images, labels):
    return {(bytes(np.ascontiguousarray(x)), int(y)) for x, y in zip(images, labels)}


def centroid_accuracy(data, shuffle_labels=False):
    flat = lambda s: s.images[:].reshape(len(s), -1).astype(np.float32)   # noqa: E731
    train, labels = flat(data.train), data.train.labels.copy()
    if shuffle_labels:
        np.random.default_rng(0).shuffle(labels)
    centres = np.stack([train[labels == k].mean(0) for k in range(data.num_classes)])
    guess = np.argmin(((flat(data.val)[:, None] - centres[None]) ** 2).sum(-1), 1)
    return float(np.mean(guess == data.val.labels))


def test_every_command_has_help():
    for command in ("synth", "convert", "inspect", "digits"):
        run = run_command([sys.executable, "-m", "mpicnn.data", command, "--help"], 60)
        assert run.returncode == 0 and "usage:" in run.stdout, run.stderr


def test_synth_is_learnable_valid_and_reproducible(tmp_path, capsys):
    out = tmp_path / "s.h5"
    assert tool("synth", out, "--n", 2000, "--shape", "3x12x10", "--classes", 5) == 0
    assert "1800 train, 200 val" in capsys.readouterr().out
    data = open_dataset(str(out))
    assert data.input_shape == (3, 12, 10) and data.num_classes == 5 and data.stats_in_file
    assert data.train.images.chunks[1:] == (3, 12, 10)       # whole samples per chunk
    pixels = data.train.images[:].astype(np.float64)
    assert np.allclose(data.mean, pixels.mean(axis=(0, 2, 3)), atol=1e-3)
    assert np.allclose(data.std, pixels.std(axis=(0, 2, 3)), atol=1e-3)
    assert np.bincount(data.train.labels).min() > 250
    # class patterns: a nearest-centroid guess works; with scrambled labels it cannot
    assert centroid_accuracy(data) > 0.6
    assert centroid_accuracy(data, shuffle_labels=True) < 0.4
    first = data.train.images[:50]
    data.close()
    tool("synth", tmp_path / "again.h5", "--n", 2000, "--shape", "3x12x10", "--classes", 5)
    with h5py.File(tmp_path / "again.h5") as f:
        assert np.array_equal(f["train/images"][:50], first)


def test_synth_rejects_bad_shapes(tmp_path, capsys):
    assert tool("synth", tmp_path / "x.h5", "--n", 10, "--shape", "3x32") == 2
    assert "mpicnn: error: --shape takes CxHxW" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_convert_npz_with_train_and_test_arrays_in_nhwc(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 9, 7, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 300)
    np.savez(tmp_path / "a.npz", x_train=x[:240], y_train=y[:240], x_test=x[240:],
             y_test=y[240:])
    assert tool("convert", tmp_path / "a.npz", tmp_path / "a.h5") == 0
    data = open_dataset(str(tmp_path / "a.h5"))
    assert data.layout == "nchw" and data.input_shape == (3, 9, 7)
    assert len(data.train) == 240 and len(data.val) == 60
    nchw = x.transpose(0, 3, 1, 2)
    for split, rows in ((data.train, slice(0, 240)), (data.val, slice(240, 300))):
        assert rows_as_set(split.images[:], split.labels) == rows_as_set(nchw[rows], y[rows])
    assert not np.array_equal(data.train.labels, y[:240])         # written shuffled
    data.close()


def test_convert_npz_with_any_names_and_string_labels(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = rng.random((200, 2, 5, 5)).astype(np.float64)
    names = np.array(["owl", "cat", "bee"])[rng.integers(0, 3, 200)]
    np.savez(tmp_path / "b.npz", pixels=x, kind=names)
    assert tool("convert", tmp_path / "b.npz", tmp_path / "b.h5", "--val-fraction",
                "0.25") == 0
    data = open_dataset(str(tmp_path / "b.h5"))
    assert data.classes == ["bee", "cat", "owl"]
    assert data.train.images.dtype == np.float32
    for k, name in enumerate(data.classes):                   # stratified split
        assert np.sum(data.val.labels == k) == round(np.sum(names == name) * 0.25)
    data.close()
    np.savez(tmp_path / "c.npz", a=x, b=x, labels=np.zeros(200, int))
    assert tool("convert", tmp_path / "c.npz", tmp_path / "c.h5") == 2
    err = capsys.readouterr().err
    assert "a (200, 2, 5, 5)" in err and "--images-key" in err
    assert tool("convert", tmp_path / "c.npz", tmp_path / "c.h5", "--images-key", "b",
                "--labels-key", "labels") == 0


def test_convert_npy_with_labels_and_h5_rechunking(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (500, 8, 8), dtype=np.uint8)         # (N, H, W): one channel
    y = rng.integers(0, 3, 500)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    assert tool("convert", tmp_path / "x.npy", tmp_path / "x.h5", "--labels",
                tmp_path / "y.npy", "--keep-order", "--val-fraction", "0.2") == 0
    data = open_dataset(str(tmp_path / "x.h5"))
    assert data.input_shape == (1, 8, 8)
    train_rows = np.sort(np.concatenate([np.flatnonzero(y == k)[:-round(
        np.sum(y == k) * 0.2)] for k in range(3)]))
    assert len(data.train) == len(train_rows)
    data.close()
    with h5py.File(tmp_path / "bad.h5", "w") as f:             # small, cut, compressed
        for name in ("train", "val"):
            f.create_dataset(f"{name}/images", data=np.repeat(x[:, None], 3, 1),
                             chunks=(4, 1, 8, 8), compression="gzip", compression_opts=9)
            f.create_dataset(f"{name}/labels", data=y)
    from mpicnn.data.convert import write_source
    from mpicnn.data.sources import array_source
    write_source(array_source(str(tmp_path / "bad.h5")), str(tmp_path / "mixed.h5"),
                 memory=60 * 192)              # 60 rows per segment: 9 scans per split
    with h5py.File(tmp_path / "mixed.h5") as f:
        mixed, labels = f["train/images"][:, 0], f["train/labels"][:]
        assert rows_as_set(mixed, labels) == rows_as_set(x, y)
        assert not np.array_equal(labels, y)
    assert tool("convert", tmp_path / "bad.h5", tmp_path / "good.h5", "--keep-order") == 0
    with h5py.File(tmp_path / "good.h5") as f:
        assert f["train/images"].chunks == (500, 3, 8, 8) and f["train/images"].compression \
            is None
        assert np.array_equal(f["train/images"][:, 0], x)
        assert np.array_equal(f["val/labels"][:], y)


def test_convert_image_folders(tmp_path, capsys):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    root = tmp_path / "imgs"
    for split, count in (("train", 6), ("val", 2)):
        for name in ("ant", "bug"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                image.fromarray(pixels).save(root / split / name / f"{i}.png")
    assert tool("convert", root, tmp_path / "i.h5") == 0
    data = open_dataset(str(tmp_path / "i.h5"))
    assert data.classes == ["ant", "bug"] and data.input_shape == (3, 10, 12)
    assert (len(data.train), len(data.val)) == (12, 4)
    data.close()
    image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "train" / "ant" / "big.png")
    assert tool("convert", root, tmp_path / "j.h5") == 2
    assert "big.png is 20x20" in capsys.readouterr().err and not (tmp_path / "j.h5").exists()
    assert tool("convert", root, tmp_path / "j.h5", "--size", "5x6", "--channels", 1) == 0
    data = open_dataset(str(tmp_path / "j.h5"))
    assert data.input_shape == (1, 5, 6) and len(data.train) == 13
    data.close()


def test_inspect_accepts_good_files_and_warns_about_slow_ones(tmp_path, capsys):
    assert tool("inspect", DIGITS) == 0
    out = capsys.readouterr().out
    assert "1438 samples" in out and "warning" not in out and "passes the training" in out
    rng = np.random.default_rng(4)
    x = rng.random((400, 3, 16, 16))
    y = np.sort(rng.integers(0, 4, 400))                         # grouped by label
    with h5py.File(tmp_path / "slow.h5", "w") as f:
        for name in ("train", "val"):
            f.create_dataset(f"{name}/images", data=x, chunks=(8, 1, 16, 16),
                             compression="gzip", compression_opts=9)
            f.create_dataset(f"{name}/labels", data=y)
    assert tool("inspect", tmp_path / "slow.h5") == 0
    out = capsys.readouterr().out
    for expected in ("cut every sample into 3 pieces", "KiB are small", "gzip level 9",
                     "float64 images", "rows are grouped by label", "--write-stats",
                     "mpicnn.data convert"):
        assert expected in out, expected
    assert tool("inspect", tmp_path / "slow.h5", "--write-stats") == 0
    out = capsys.readouterr().out
    assert "wrote mean" in out and "--write-stats`" not in out
    with h5py.File(tmp_path / "slow.h5") as f:
        assert np.allclose(f.attrs["mean"], x.mean(axis=(0, 2, 3)), atol=1e-5)
        assert np.allclose(f.attrs["std"], x.std(axis=(0, 2, 3)), atol=1e-5)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert tool("inspect", tmp_path / "junk.h5") == 2
    err = capsys.readouterr().err
    assert err.startswith("mpicnn: error:") and "not an HDF5 file" in err
