"""``convert`` from the formats of the field: IDX (MNIST family) and CIFAR python batches.

The tests write small files in these formats themselves (plain, .gz and .tar.gz) and read
them back through the tool; the last one converts Debian's real Fashion-MNIST files.
"""
import gzip
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
from conftest import skip_unless_required

from mpicnn.data.__main__ import main
from mpicnn.data.schema import open_dataset

FASHION = "/usr/share/datasets/fashion-mnist"


def tool(*args):
    return main([str(a) for a in args])


def rows_as_set(images, labels):
    return {(bytes(np.ascontiguousarray(x)), int(y)) for x, y in zip(images, labels)}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` in the IDX format (big-endian values after a magic and the sizes)."""
    code = {np.uint8: 0x08, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, gz=False):
    data = idx_bytes(array)
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as fh:
        fh.write(data)


def mnist_like(n, seed=0, size=(6, 5), classes=10):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n,) + size, dtype=np.uint8),
            rng.integers(0, classes, n).astype(np.uint8))


def write_idx_folder(folder, gz, n_train=120, n_test=40, prefix=""):
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    data = {}
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = mnist_like(n, seed)
        write_idx(folder / f"{prefix}{split}-images-idx3-ubyte{ext}", x, gz)
        write_idx(folder / f"{prefix}{split}-labels-idx1-ubyte{ext}", y, gz)
        data[split] = (x, y)
    return data


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_folder_round_trip(tmp_path, capsys, gz):
    data = write_idx_folder(tmp_path / "fashion-mnist", gz)
    out = tmp_path / "f.h5"
    assert tool("convert", tmp_path / "fashion-mnist", out) == 0
    assert "120 train, 40 val samples; classes T-shirt/top, Trouser" in capsys.readouterr().out
    ds = open_dataset(str(out))
    assert ds.input_shape == (1, 6, 5) and ds.classes[9] == "Ankle boot"
    for split, key in ((ds.train, "train"), (ds.val, "t10k")):
        x, y = data[key]
        assert rows_as_set(split.images[:], split.labels) == rows_as_set(x[:, None], y)
    assert ds.stats_in_file and np.isclose(ds.mean[0], data["train"][0].mean(), atol=1e-3)
    ds.close()


def test_class_names_come_from_the_dataset_folder_not_a_directory_above(tmp_path, capsys):
    write_idx_folder(tmp_path / "fashionista" / "mnist", gz=False)
    assert tool("convert", tmp_path / "fashionista" / "mnist", tmp_path / "m.h5") == 0
    assert "classes" not in capsys.readouterr().out
    ds = open_dataset(str(tmp_path / "m.h5"))
    assert ds.classes == [str(k) for k in range(10)]
    ds.close()


def test_idx_file_with_its_labels_beside_it_and_gz_read_in_bounded_slices(tmp_path,
                                                                          monkeypatch):
    from mpicnn.data import convert

    data = write_idx_folder(tmp_path / "digits", gz=True, n_train=300)
    # a small memory budget forces several forward scans over the gzip stream
    monkeypatch.setattr(convert, "MEMORY_BYTES", 40 * 30)
    out = tmp_path / "one.h5"
    assert tool("convert", tmp_path / "digits" / "train-images-idx3-ubyte.gz", out,
                "--val-fraction", 0.2) == 0
    ds = open_dataset(str(out))
    assert len(ds.train) == 240 and len(ds.val) == 60 and ds.classes[:2] == ["0", "1"]
    x, y = data["train"]
    got = rows_as_set(np.concatenate([ds.train.images[:], ds.val.images[:]]),
                      np.concatenate([ds.train.labels, ds.val.labels]))
    assert got == rows_as_set(x[:, None], y)
    ds.close()


def test_idx_float_images_and_an_explicit_labels_file(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 7, 6)).astype(np.float32)
    y = (np.arange(50) % 5).astype(np.uint8)
    write_idx(tmp_path / "x.idx", x)
    write_idx(tmp_path / "y.idx", y)
    assert tool("convert", tmp_path / "x.idx", tmp_path / "o.h5", "--labels",
                tmp_path / "y.idx", "--val-fraction", 0.2) == 0
    ds = open_dataset(str(tmp_path / "o.h5"))
    assert ds.train.images.dtype == np.float32 and len(ds.val) == 10
    got = rows_as_set(np.concatenate([ds.train.images[:], ds.val.images[:]]),
                      np.concatenate([ds.train.labels, ds.val.labels]))
    assert got == rows_as_set(x[:, None], y)
    ds.close()


def bad_idx_cases(tmp_path):
    x, y = mnist_like(20)
    good_x, good_y = idx_bytes(x), idx_bytes(y)
    cases = {
        "truncated": (good_x[:-7], good_y, False, "is truncated: its IDX header (20, 6, 5)"),
        "extra": (good_x + b"\0", good_y, False, "has extra bytes"),
        "magic": (b"\x1f\x8b" + good_x[2:], good_y, False, "is not an IDX file: it starts "
                                                            "with 1f 8b"),
        "mismatch": (good_x, idx_bytes(y[:19]), False, "holds 20 images but"),
        "swapped": (good_y, good_x, False, "not images (N,H,W); is it a labels file?"),
        "gz-cut": (good_x, good_y, True, "is truncated or damaged"),
    }
    for name, (xb, yb, cut, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        ext = ".gz" if cut else ""
        for fname, data in (("train-images-idx3-ubyte", xb), ("train-labels-idx1-ubyte", yb)):
            raw = gzip.compress(data) if cut else data
            if cut and "images" in fname:
                raw = raw[: len(raw) // 2]
            (folder / (fname + ext)).write_bytes(raw)
        yield name, folder, message


def test_damaged_idx_files_fail_with_one_line_naming_the_problem(tmp_path, capsys):
    for name, folder, message in bad_idx_cases(tmp_path):
        assert tool("convert", folder, tmp_path / f"{name}.h5") == 2, name
        err = capsys.readouterr().err
        assert err.startswith("mpicnn: error: ") and err.count("\n") == 1, err
        assert message in err, (name, err)
        assert not (tmp_path / f"{name}.h5").exists()


def test_idx_folder_with_unpaired_or_ambiguous_files(tmp_path, capsys):
    write_idx_folder(tmp_path / "a", gz=False)
    os.remove(tmp_path / "a" / "t10k-labels-idx1-ubyte")
    assert tool("convert", tmp_path / "a", tmp_path / "a.h5") == 2
    assert "t10k-images-idx3-ubyte but no matching labels file" in capsys.readouterr().err
    write_idx_folder(tmp_path / "b", gz=True, prefix="emnist-digits-")
    write_idx_folder(tmp_path / "b", gz=True, prefix="emnist-letters-")
    assert tool("convert", tmp_path / "b", tmp_path / "b.h5") == 2
    assert ("holds IDX pairs 'emnist-digits-t10k', 'emnist-digits-train', "
            "'emnist-letters-t10k'") in capsys.readouterr().err


# --- CIFAR ---------------------------------------------------------------------------
def cifar_batch(n, seed, hundred=False):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    if hundred:
        return {b"data": data, b"fine_labels": list(map(int, rng.integers(0, 100, n))),
                b"coarse_labels": list(map(int, rng.integers(0, 20, n)))}
    return {b"data": data, b"labels": list(map(int, rng.integers(0, 10, n)))}


def write_cifar(folder, hundred=False):
    """A small CIFAR-10 (or -100) in its python layout, pickled as Python 2 did (protocol 2)."""
    folder.mkdir(parents=True)
    if hundred:
        files = {"train": cifar_batch(30, 1, True), "test": cifar_batch(10, 2, True),
                 "meta": {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                          b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}}
    else:
        files = {f"data_batch_{i}": cifar_batch(7 + i, i) for i in range(1, 6)}
        files["test_batch"] = cifar_batch(9, 9)
        files["batches.meta"] = {b"label_names": [n.encode() for n in CIFAR10_NAMES]}
    for name, content in files.items():
        with open(folder / name, "wb") as fh:
            pickle.dump(content, fh, protocol=2)
    return files


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


def as_nchw(batches, key="labels"):
    x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    return x, np.concatenate([b[key.encode()] for b in batches])


def tar_gz(folder, out):
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tar.gz"])
def test_cifar10_round_trip(tmp_path, capsys, packed):
    files = write_cifar(tmp_path / "cifar-10-batches-py")
    source = tmp_path / "cifar-10-batches-py"
    if packed:
        tar_gz(source, tmp_path / "cifar-10-python.tar.gz")
        source = tmp_path / "cifar-10-python.tar.gz"
    assert tool("convert", source, tmp_path / "c.h5") == 0
    assert "50 train, 9 val samples; classes airplane, automobile" in capsys.readouterr().out
    ds = open_dataset(str(tmp_path / "c.h5"))
    assert ds.input_shape == (3, 32, 32) and ds.classes == CIFAR10_NAMES
    x, y = as_nchw([files[f"data_batch_{i}"] for i in range(1, 6)])
    assert rows_as_set(ds.train.images[:], ds.train.labels) == rows_as_set(x, y)
    x, y = as_nchw([files["test_batch"]])
    assert rows_as_set(ds.val.images[:], ds.val.labels) == rows_as_set(x, y)
    ds.close()


def test_cifar10_parent_folder_and_batches_crossing_write_blocks(tmp_path, monkeypatch):
    from mpicnn.data import convert

    files = write_cifar(tmp_path / "parent" / "cifar-10-batches-py")
    monkeypatch.setattr(convert, "MEMORY_BYTES", 3072 * 11)     # segments across batches
    assert tool("convert", tmp_path / "parent", tmp_path / "c.h5") == 0
    ds = open_dataset(str(tmp_path / "c.h5"))
    x, y = as_nchw([files[f"data_batch_{i}"] for i in range(1, 6)])
    assert rows_as_set(ds.train.images[:], ds.train.labels) == rows_as_set(x, y)
    ds.close()


@pytest.mark.parametrize("coarse", [False, True], ids=["fine", "coarse"])
def test_cifar100_fine_or_coarse_labels(tmp_path, coarse):
    files = write_cifar(tmp_path / "cifar-100-python", hundred=True)
    tar_gz(tmp_path / "cifar-100-python", tmp_path / "c100.tar.gz")
    args = ["--coarse-labels"] if coarse else []
    assert tool("convert", tmp_path / "c100.tar.gz", tmp_path / "c.h5", *args) == 0
    ds = open_dataset(str(tmp_path / "c.h5"))
    key = "coarse_labels" if coarse else "fine_labels"
    assert ds.num_classes == (20 if coarse else 100)
    assert ds.classes[3] == ("c3" if coarse else "f3")
    x, y = as_nchw([files["train"]], key)
    assert rows_as_set(ds.train.images[:], ds.train.labels) == rows_as_set(x, y)
    ds.close()


def test_damaged_cifar_fails_with_one_line(tmp_path, capsys):
    files = write_cifar(tmp_path / "c10")
    cases = []
    # a batch whose labels do not match its images
    bad = {**files["data_batch_2"], b"labels": files["data_batch_2"][b"labels"][:-1]}
    cases.append(("data_batch_2", pickle.dumps(bad, protocol=2), "holds 9 images but 8 labels"))
    # a pickle that would run code when loaded: refused, nothing runs
    pwned = tmp_path / "pwned"
    evil = pickle.dumps(Evil(pwned), protocol=2)
    cases.append(("data_batch_3", evil, "system is not allowed in a data batch"))
    cut = pickle.dumps(files["test_batch"])[:-100]
    cases.append(("test_batch", cut, "is not a CIFAR python batch"))
    for name, raw, message in cases:
        folder = tmp_path / f"case-{name}" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for other, content in files.items():
            (folder / other).write_bytes(raw if other == name else pickle.dumps(content, 2))
        assert tool("convert", folder.parent, tmp_path / "x.h5") == 2
        assert not pwned.exists(), "the pickle's command ran"
        err = capsys.readouterr().err
        assert err.startswith("mpicnn: error: ") and err.count("\n") == 1, err
        assert message in err, err
    assert not (tmp_path / "x.h5").exists()
    (tmp_path / "cut.tar.gz").write_bytes(b"\x1f\x8b\x08" + b"\0" * 20)
    assert tool("convert", tmp_path / "cut.tar.gz", tmp_path / "x.h5") == 2
    assert "is not a readable tar archive" in capsys.readouterr().err


class Evil:
    """Unpickled, runs ``touch PATH`` (an absolute path: nothing depends on the directory)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


# --- the real Fashion-MNIST from Debian ------------------------------------------------
def test_fashion_mnist_from_the_debian_package(tmp_path, capsys):
    if not os.path.isdir(FASHION):
        skip_unless_required(f"{FASHION} is absent: apt-get install dataset-fashion-mnist "
                             f"(.ci/run does)")
    out = tmp_path / "fashion.h5"
    assert tool("convert", FASHION, out) == 0
    assert "60000 train, 10000 val samples; classes T-shirt/top" in capsys.readouterr().out
    ds = open_dataset(str(out))
    assert ds.input_shape == (1, 28, 28) and ds.train.images.dtype == np.uint8
    assert ds.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                          "Shirt", "Sneaker", "Bag", "Ankle boot"]
    # both splits are exactly balanced: 6,000 and 1,000 of each class
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
    assert np.bincount(ds.val.labels).tolist() == [1000] * 10
    assert 0.28 < ds.mean[0] / 255 < 0.29 and 0.35 < ds.std[0] / 255 < 0.36
    ds.close()
