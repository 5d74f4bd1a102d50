"""The trained model out of the checkpoint: export, predict and evaluate, end to end.

Real runs (``mpirun -n 2 python -m mpicnn.train``) write the checkpoints; the commands
run as users start them. The reference is the checkpoint's model applied to images as
the loader hands them over (``data.loader.Normalizer``), and the run's own end record.
"""
from __future__ import annotations

import csv
import importlib.util
import re
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import DIGITS, job_env, mpirun, run_command, train

from mpicnn.checkpoint import files
from mpicnn.checkpoint.trained import INPUT, RawImageModel, load_model
from mpicnn.data.layout import to_nchw
from mpicnn.data.loader import Normalizer
from mpicnn.data.schema import open_dataset
from mpicnn.training.models import build_model

TOLERANCE = 1e-4
RIGHT = re.compile(r"(\w+): (?:loss ([\d.]+), )?accuracy [\d.]+ \((\d+)/(\d+) right\)")


def command(module: str, *args, check: bool = True):
    """``python -m module args`` as a user runs it: (exit code, its output)."""
    finished = run_command([sys.executable, "-m", module, *map(str, args)], timeout=240,
                           env=job_env(), check=check)
    return finished.returncode, finished.stdout + finished.stderr


def flat_nhwc_digits(path):
    """The digits in one flat file, channels last, without mean/std attributes."""
    with h5py.File(DIGITS, "r") as f:
        images = np.concatenate([f["train/images"][:], f["val/images"][:]])
        labels = np.concatenate([f["train/labels"][:], f["val/labels"][:]])
    with h5py.File(path, "w") as f:
        f["images"] = images.transpose(0, 2, 3, 1)
        f["labels"] = labels
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two one-epoch runs on 2 ranks: the shipped digits (NCHW, groups), and a flat NHWC
    file whose validation share (--val-fraction 0.25) the commands must carve alike."""
    tmp = tmp_path_factory.mktemp("trained")
    flat = flat_nhwc_digits(tmp / "flat.h5")
    return {"digits": (*train(tmp, "digits", 2, "--epochs", 1), DIGITS),
            "flat": (*train(tmp, "flat", 2, "--epochs", 1, "--data", flat, "--val-fraction",
                            0.25, "--batch-size", 32), flat)}


def val_split(run):
    """(raw val images as stored, the dataset) of a run's file, split as the run split it."""
    out, _, path = run
    config = torch.load(out / "final.pt", weights_only=True)["config"]
    data = open_dataset(str(path), val_fraction=config["val_fraction"])
    split = data.val
    return np.asarray(split.images[split.start: split.start + len(split)]), data


def reference_logits(out, raw: np.ndarray, data) -> torch.Tensor:
    """The checkpoint's model on images as the training loader normalises them."""
    saved = torch.load(out / "final.pt", weights_only=True)
    model = build_model(saved["model_name"], data.input_shape, data.num_classes)
    model.load_state_dict(saved["model"])
    images = torch.from_numpy(to_nchw(raw, data.layout))
    with torch.no_grad():
        return model.eval()(Normalizer(data.mean, data.std, torch.device("cpu"))(images))


@pytest.mark.mpi
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["digits", "flat"])
def test_torchscript_takes_stored_images_and_matches_the_model(runs, tmp_path, name):
    out, _, _ = runs[name]
    code, log = command("mpicnn.export", out / "final.pt", tmp_path / "m.pt",
                        "--format", "torchscript")
    assert code == 0 and "mpicnn: export: digitnet" in log, log
    raw, data = val_split(runs[name])
    expected = reference_logits(out, raw, data)
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    for rows in (slice(None), slice(0, 3)):        # any batch size, not just the traced one
        got = scripted(torch.from_numpy(raw[rows]))
        assert (got - expected[rows]).abs().max().item() < TOLERANCE
    assert data.layout == ("nchw" if name == "digits" else "nhwc")


@pytest.mark.mpi
def test_onnx_matches_the_model_under_onnxruntime(runs, tmp_path):
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not importlib.util.find_spec(m)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install 'mpicnn[onnx]')")
    import onnxruntime

    out, _, _ = runs["digits"]
    code, log = command("mpicnn.export", out / "final.pt", tmp_path / "m.onnx", "--format", "onnx")
    assert code == 0, log
    raw, data = val_split(runs["digits"])
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(["logits"], {"images": raw})[0]
    assert raw.dtype == np.uint8
    assert np.abs(got - reference_logits(out, raw, data).numpy()).max() < TOLERANCE


@pytest.mark.mpi
def test_the_state_dict_export_loads_plainly_and_through_load_model(runs, tmp_path):
    out, _, _ = runs["digits"]
    code, log = command("mpicnn.export", out / "final.pt", tmp_path / "w.pt",
                        "--format", "state_dict")
    assert code == 0, log
    plain = torch.load(tmp_path / "w.pt", weights_only=True)
    model = build_model(plain["model_name"], plain[INPUT]["shape"], plain[INPUT]["num_classes"])
    model.load_state_dict(plain["model"])
    raw, data = val_split(runs["digits"])
    expected = reference_logits(out, raw, data)
    with torch.no_grad():
        assert (load_model(tmp_path / "w.pt")(torch.from_numpy(raw)) - expected).abs().max() \
            < TOLERANCE
        assert (load_model(out / "final.pt")(torch.from_numpy(raw)) - expected).abs().max() \
            < TOLERANCE


def accuracies(log: str) -> dict:
    """split -> (right, total, loss or None) from the commands' accuracy lines."""
    return {m[1]: (int(m[3]), int(m[4]), float(m[2]) if m[2] else None)
            for m in RIGHT.finditer(log)}


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["digits", "flat"])
def test_predict_writes_every_image_and_its_accuracy_is_the_runs(runs, tmp_path, name):
    out, end, _ = runs[name]
    code, log = command("mpicnn.predict", out / "final.pt", "--out", tmp_path / "p.csv",
                        "--batch-size", 100)
    assert code == 0, log
    right, total, _ = accuracies(log)["val"]
    assert abs(right / total - end["val_acc"]) < 1e-9, (log, end)
    with open(tmp_path / "p.csv") as fh:
        rows = list(csv.DictReader(fh))
    raw, data = val_split(runs[name])
    assert len(rows) == total == len(data.val)
    assert [int(r["row"]) for r in rows] == list(range(data.val.start, data.val.start + total))
    assert sum(r["label"] == r["predicted"] for r in rows) == right
    probs = np.array([[float(r[f"p_{c}"]) for c in range(10)] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (probs.argmax(1) == [int(r["predicted"]) for r in rows]).all()


@pytest.mark.mpi
def test_evaluate_only_gives_the_runs_loss_and_accuracy_on_any_number_of_ranks(runs):
    out, end, _ = runs["digits"]
    one = command("mpicnn.evaluate", out / "final.pt", "--split", "all")[1]
    two = mpirun(2, [out / "final.pt"], module="mpicnn.evaluate")
    for log in (one, two.stdout + two.stderr):
        found = accuracies(log)
        right, total, loss = found["val"]
        assert abs(right / total - end["val_acc"]) < 1e-9, (log, end)
        assert abs(loss - end["val_loss"]) < 1e-6, (log, end)
    assert set(accuracies(one)) == {"train", "val"} and accuracies(one)["train"][1] == 1438


def test_the_raw_image_model_reads_every_stored_layout_alike():
    torch.manual_seed(0)
    model = build_model("digitnet", (3, 8, 8), 5).eval()
    nchw = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = [10.0, 20.0, 30.0], [50.0, 60.0, 70.0]
    expected = model(Normalizer(np.float32(mean), np.float32(std), torch.device("cpu"))(nchw))
    for layout, stored in (("nchw", nchw), ("nhwc", nchw.permute(0, 2, 3, 1).contiguous())):
        got = RawImageModel(model, mean, std, layout)(stored)
        assert torch.equal(got, expected), layout
    gray = build_model("digitnet", (1, 8, 8), 5).eval()
    flat = nchw[:, 0]
    assert torch.equal(RawImageModel(gray, [1.0], [2.0], "nhw")(flat),
                       RawImageModel(gray, [1.0], [2.0], "nchw")(flat[:, None]))


@pytest.mark.mpi
def test_an_older_checkpoint_without_its_input_record(runs, tmp_path):
    out, _, _ = runs["digits"]
    saved = files.load(out / "final.pt")
    del saved[INPUT]
    saved["config"]["data"] = str(tmp_path / "moved.h5")      # its dataset is gone
    files.atomic_save(saved, tmp_path / "old.pt")
    code, log = command("mpicnn.export", tmp_path / "old.pt", tmp_path / "m.pt", check=False)
    assert code == 2 and log.count("mpicnn: error:") == 1, log
    assert "does not record the input" in log and "--data FILE" in log
    code, log = command("mpicnn.export", tmp_path / "old.pt", tmp_path / "m.pt",
                        "--data", DIGITS)
    assert code == 0, log
    code, log = command("mpicnn.predict", tmp_path / "old.pt", "--data", DIGITS,
                        "--out", tmp_path / "p.csv")
    assert code == 0 and "val: accuracy" in log, log


@pytest.mark.parametrize("args,message", [
    (["missing.pt", "out.pt"], "does not exist"),
    (["final.pt", "out.pt", "--format", "jpeg"], "invalid choice: 'jpeg'"),
])
def test_bad_export_arguments_are_one_line(tmp_path, args, message):
    code, log = command("mpicnn.export", *args, check=False)
    assert code == 2 and log.count("mpicnn: error:") == 1 and message in log, log
