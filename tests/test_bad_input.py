"""Bad input stops the job before training: one clear error line, non-zero exit, no hang.

Every row is a real ``mpirun -n N python -m mpicnn.train`` launch; each must exit
non-zero with exactly one ``mpicnn: error:`` line naming the problem, no traceback,
and no process left behind.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import DIGITS
from drill import (
    assert_one_clean_error,
    digits_arrays,
    flip_tensor_byte,
    record,
    run_job,
    small_digits,
    write_h5,
)

from mpicnn.checkpoint import files as checkpoint
from mpicnn.config import FIELDS

pytestmark = pytest.mark.mpi

# Every row also gets these, so a check that fails to stop the run still ends fast.
SHORT = ["--epochs", "1", "--max-steps", "2", "--progress", "off"]
MARKER = "pwned"                       # a file that code smuggled into input would create


def has_mode(mode: str) -> bool:
    return mode in (FIELDS["mode"][1].metadata["choices"] or ())


def good(**changes):
    """The shipped digits' splits as raw arrays, with ``changes`` applied per split."""
    xt, yt, xv, yv = digits_arrays()
    splits = {"train": {"images": xt, "labels": yt}, "val": {"images": xv, "labels": yv}}
    for key, value in changes.items():
        split, name = key.split("__")
        splits[split][name] = value(splits[split][name]) if callable(value) else value
    return splits


def data(tmp: Path, **changes) -> list[str]:
    return ["--data", str(write_h5(tmp / "bad.h5", good(**changes)))]


def with_nan(images):
    images = images.astype(np.float32) / 255
    images[0, 0, 0, 0] = np.nan
    return images


def toml(tmp: Path, text: str) -> list[str]:
    path = tmp / "run.toml"
    path.write_text(text)
    return ["--config", str(path)]


# --- checkpoints to resume from ---------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """final.pt of a real 2-rank digitnet run (resume rows start from it)."""
    tmp = tmp_path_factory.mktemp("trained")
    outcome = run_job(2, ["--data", small_digits(tmp / "small.h5"), "--epochs", "1",
                          "--checkpoint-dir", tmp / "ckpt", "--progress", "off"])
    assert outcome.returncode == 0, outcome.output[-3000:]
    return tmp / "ckpt" / "final.pt"


def resume_from(tmp: Path, path: Path) -> list[str]:
    return ["--data", str(small_digits(tmp / "small.h5")), "--resume", str(path)]


def other_mode(tmp: Path, source: Path) -> Path:
    state = checkpoint.load(source)
    state["mode"] = "ps-sync"
    checkpoint.atomic_save(state, tmp / "other-mode.pt")     # a valid checksum, wrong mode
    return tmp / "other-mode.pt"


def truncate(tmp: Path, source: Path) -> Path:
    (tmp / "cut.pt").write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return tmp / "cut.pt"


class Smuggler:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        import os
        return os.system, (f"touch {MARKER}",)


def malicious(tmp: Path, source: Path) -> Path:
    state = checkpoint.load(source)
    state["model"]["extra"] = Smuggler()
    with open(tmp / "evil.pt", "wb") as fh:
        torch.save(state, fh)
    return tmp / "evil.pt"


# --- the table ----------------------------------------------------------------------

@dataclass
class Case:
    name: str
    make: Callable                  # (tmp, trained checkpoint) -> extra arguments
    expect: str                     # must appear in the error line
    n: int = 2
    needs: str = ""                 # a --mode that must exist


CASES = [
    # data file
    Case("missing-file", lambda t, c: ["--data", str(t / "nope.h5")], "does not exist"),
    Case("directory", lambda t, c: ["--data", str(t)], "is a directory"),
    Case("not-hdf5", lambda t, c: ["--data", str(_write(t / "x.h5", b"label,pixels\n1,0\n"))],
         "is not an HDF5 file"),
    Case("truncated-hdf5", lambda t, c: ["--data", str(_write(
        t / "cut.h5", DIGITS.read_bytes()[: DIGITS.stat().st_size // 2]))], "is truncated"),
    Case("missing-key", lambda t, c: ["--data", str(write_h5(t / "k.h5", {
        s: {"x": np.zeros((64, 1, 8, 8), np.uint8), "y": np.zeros(64, np.int64)}
        for s in ("train", "val")}))], "has no dataset 'images' (it has: x, y)"),
    Case("images-wrong-rank", lambda t, c: data(t, train__images=lambda x: x.reshape(len(x), -1)),
         "images must be 4-d"),
    Case("images-wrong-dtype", lambda t, c: data(t, train__images=lambda x: x.astype(np.int32)),
         "images must be uint8 or float"),
    Case("labels-not-integer", lambda t, c: data(t, val__labels=lambda y: y.astype(np.float32)),
         "labels must be integers"),
    Case("labels-negative", lambda t, c: data(t, train__labels=lambda y: y - 1),
         "labels contain negative values"),
    Case("labels-beyond-classes", lambda t, c: ["--data", str(write_h5(
        t / "c.h5", good(), attrs={"classes": [b"a", b"b", b"c"]}))],
         "labels go up to 9 but the file declares 3 classes"),
    Case("length-mismatch", lambda t, c: data(t, train__labels=lambda y: y[:-5]),
         "1438 images but 1433 labels"),
    Case("empty-split", lambda t, c: data(t, val__images=lambda x: x[:0],
                                          val__labels=lambda y: y[:0]),
         "val split"),
    Case("nan-images", lambda t, c: data(t, train__images=with_nan,
                                         val__images=lambda x: x / 255.0),
         "NaN or Inf"),
    Case("batch-larger-than-data", lambda t, c: ["--batch-size", "400"],
         "fewer than one global batch", n=4),
    # model
    Case("model-does-not-fit", lambda t, c: ["--data", str(write_h5(t / "tiny.h5", {
        s: {"images": np.zeros((64, 1, 1, 1), np.uint8), "labels": np.arange(64) % 10}
        for s in ("train", "val")})), "--layout", "nchw"], "choose a model that fits"),
    Case("unknown-model", lambda t, c: ["--model", "alexnet"], "unknown model 'alexnet'"),
    Case("model-not-a-module", lambda t, c: ["--model", "builtins:slice"],
         "not a torch.nn.Module"),
    # configuration
    Case("unknown-option", lambda t, c: ["--epoch", "3"], "did you mean --epochs"),
    Case("wrong-type", lambda t, c: ["--batch-size", "many"], "--batch-size: expected int"),
    Case("toml-unknown-key", lambda t, c: toml(t, "[training]\nlearning_rate = 0.1\n"),
         "unknown setting 'learning_rate'"),
    Case("toml-wrong-type", lambda t, c: toml(t, 'batch_size = "ten"\n'), "expected int"),
    Case("toml-is-not-code", lambda t, c: toml(
        t, f"lr = __import__('os').system('touch {MARKER}')\n"), "is not valid TOML"),
    Case("toml-paths-are-not-run", lambda t, c: toml(
        t, f'data = "$(touch {MARKER})"\nmetrics = "`touch {MARKER}`"\n'), "does not exist"),
    # output and resume
    Case("checkpoint-dir-not-writable", lambda t, c: [
        "--checkpoint-dir", str(_write(t / "file", b"") / "ckpt")], "is not writable"),
    Case("resume-missing", lambda t, c: ["--resume", str(t / "none.pt")], "no such checkpoint"),
    Case("resume-other-model", lambda t, c: resume_from(t, c) + ["--model", "lenet"],
         "written with model 'digitnet'"),
    Case("resume-other-mode", lambda t, c: resume_from(t, other_mode(t, c)),
         "written with mode 'ps-sync'"),
    Case("resume-damaged", lambda t, c: resume_from(t, flip_tensor_byte(c, t / "flipped.pt")),
         "checksum does not match"),
    Case("resume-truncated", lambda t, c: resume_from(t, truncate(t, c)), "cannot load"),
    Case("resume-pickled-code", lambda t, c: resume_from(t, malicious(t, c)),
         "plain data (posix.system)"),
    # parameter-server options that do not fit the world (rows run once PS modes exist)
    Case("ps-no-workers", lambda t, c: ["--mode", "ps-sync", "--servers", "2"], "",
         needs="ps-sync"),
    Case("ps-too-many-servers", lambda t, c: ["--mode", "ps-async", "--servers", "5"], "",
         n=4, needs="ps-async"),
    # pipeline settings that cannot work (one line each, every rank ends)
    Case("pipeline-stages-not-dividing", lambda t, c: ["--mode", "pipeline", "--stages", "2"],
         "does not divide the 3 ranks", n=3, needs="pipeline"),
    Case("pipeline-micro-over-batch", lambda t, c: ["--mode", "pipeline", "--stages", "2",
                                                    "--micro-batches", "32"],
         "--micro-batches 32 is more than --batch-size 16", needs="pipeline"),
    Case("pipeline-more-stages-than-layers",
         lambda t, c: ["--mode", "pipeline", "--stages", "3", "--model",
                       "tests.custom_model:TinyNet"],
         "more than the model's 2 layers", n=3, needs="pipeline"),
    Case("pipeline-not-sequential",
         lambda t, c: ["--mode", "pipeline", "--stages", "2", "--model",
                       "tests.custom_model:Branchy"], "no sequential form", needs="pipeline"),
    Case("pipeline-bad-split", lambda t, c: ["--mode", "pipeline", "--stages", "2",
                                             "--split", "3,5"],
         "does not cut 9 layers into 2 stages", needs="pipeline"),
    Case("pipeline-flags-without-mode", lambda t, c: ["--stages", "2"],
         "need --mode pipeline", n=1, needs="pipeline"),
    Case("pipeline-amp", lambda t, c: ["--mode", "pipeline", "--stages", "2", "--amp", "fp16"],
         "--amp fp16 is not supported with --mode pipeline", needs="pipeline"),
]


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_stops_cleanly(case, tmp_path, request):
    if case.needs and not has_mode(case.needs):
        pytest.skip(f"--mode {case.needs} is not available yet")
    trained = request.getfixturevalue("trained") if case.name.startswith("resume-") else None
    args = case.make(tmp_path, trained) + SHORT
    outcome = run_job(case.n, args, timeout=180, cwd=tmp_path)   # code would write here
    record(f"bad-input/{case.name} (n={case.n})", outcome)
    assert_one_clean_error(outcome, case.expect)
    assert not list(Path(tmp_path).rglob(MARKER)), "input was executed"
