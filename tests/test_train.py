"""End-to-end training over real MPI ranks on real HDF5 files."""
import os

import pytest
import torch
from conftest import DIGITS, initial_params, mpirun, param_difference, read_jsonl

from mpicnn.config import parse_config
from mpicnn.data.loader import Loader
from mpicnn.data.schema import open_dataset
from mpicnn.training.loop import evaluate
from mpicnn.training.models import build_model

END_FIELDS = {"event", "val_acc", "val_loss", "train_loss", "images_per_s", "steps", "epochs",
              "world_size", "mode", "wall_s"}


def final_params(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2, 4])
def test_default_run_reaches_97_percent(n, tmp_path):
    """The no-argument run: accuracy, outputs, and evaluation equal to a single process."""
    metrics, ckpt = tmp_path / "run.jsonl", tmp_path / "ckpt"
    run = mpirun(n, ["--metrics", metrics, "--checkpoint-dir", ckpt], timeout=300)
    records = read_jsonl(metrics)
    end = records[-1]
    assert END_FIELDS <= set(end) and end["event"] == "end"
    assert end["world_size"] == n and end["mode"] == "allreduce" and end["epochs"] == 20
    assert end["val_acc"] >= 0.97, end
    assert end["images_per_s"] > 0
    assert [r["event"] for r in records].count("epoch") == 20
    assert records[0]["event"] == "config"
    assert run.stdout.count("mpicnn: done:") == 1            # one summary, from rank 0
    assert (ckpt / "config.toml").exists() and (ckpt / "final.pt").exists()

    data = open_dataset(str(DIGITS))
    model = build_model("digitnet", data.input_shape, data.num_classes)
    model.load_state_dict(final_params(ckpt / "final.pt"))
    loader = Loader(data, data.val, torch.device("cpu"), 16)
    val_loss, val_acc = evaluate(model, loader, None)
    assert val_acc == pytest.approx(end["val_acc"], abs=1e-12)
    assert val_loss == pytest.approx(end["val_loss"], rel=1e-5)


@pytest.mark.mpi
def test_four_ranks_match_one_rank_with_the_global_batch(tmp_path):
    common = ["--model", "kerasnet", "--max-steps", 20, "--deterministic", "--optimizer", "sgd",
              "--lr", 0.05, "--weight-decay", 5e-4, "--seed", 3]
    mpirun(4, common + ["--batch-size", 8, "--checkpoint-dir", tmp_path / "n4"])
    mpirun(1, common + ["--batch-size", 32, "--checkpoint-dir", tmp_path / "n1"])
    four = final_params(tmp_path / "n4" / "final.pt")
    one = final_params(tmp_path / "n1" / "final.pt")
    assert param_difference(four, one) <= 1e-4
    # it did train: away from the seeded start both runs had
    assert param_difference(initial_params("kerasnet", seed=3), four) > 1e-2


@pytest.mark.mpi
def test_resume_continues_exactly(tmp_path):
    common = ["--epochs", 3, "--deterministic", "--model", "lenet", "--seed", 5]
    mpirun(2, common + ["--checkpoint-dir", tmp_path / "whole"])
    first = mpirun(2, common + ["--checkpoint-dir", tmp_path / "split", "--stop-epoch", 1])
    assert not (tmp_path / "split" / "final.pt").exists()
    assert "epoch 1/3" in first.stdout
    second = mpirun(2, common + ["--checkpoint-dir", tmp_path / "split", "--resume", "auto",
                                 "--metrics", tmp_path / "resumed.jsonl"])
    assert "resumed from" in second.stdout
    epochs = [r["epoch"] for r in read_jsonl(tmp_path / "resumed.jsonl") if r["event"] == "epoch"]
    assert epochs == [2, 3]
    whole = final_params(tmp_path / "whole" / "final.pt")
    split = final_params(tmp_path / "split" / "final.pt")
    assert param_difference(whole, split) == 0.0


@pytest.mark.mpi
def test_exception_on_one_rank_ends_the_job():
    # Rank 0 waits in step 4's exchange for rank 1, which raised: the failing rank's abort
    # must end the job. Were it missing, only the watchdog would end it, at the default
    # --unreachable-abort, with a line of its own: that limit is mpirun's timeout here
    # (past it the test fails as a hang), and the one error line below is rank 1's.
    limit = parse_config([]).failure.unreachable_abort
    run = mpirun(2, ["--model", "tests.custom_model:FailOnRankOne", "--epochs", 50],
                 timeout=limit, check=False)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("mpicnn: error:")]
    assert errors == ["mpicnn: error: rank 1: ValueError: injected failure on one rank "
                      "(rerun with --debug for the traceback)"]
    assert "Traceback" not in run.stderr


@pytest.mark.mpi
def test_bad_arguments_fail_once_before_training(tmp_path):
    run = mpirun(2, ["--epochz", 2], timeout=60, check=False)
    assert run.returncode == 2
    assert run.stderr.count("mpicnn: error:") == 1
    assert "did you mean --epochs" in run.stderr
    missing = mpirun(2, ["--data", tmp_path / "nope.h5"], timeout=60, check=False)
    assert missing.returncode == 2 and missing.stderr.count("mpicnn: error:") == 1
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_help_groups_the_flags():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mpicnn.train", "--help"], capture_output=True,
                         text=True, timeout=60, cwd=DIGITS.parent.parent).stdout
    for heading in ("data:", "model:", "training:", "distribution:", "output and control:"):
        assert heading in out
    for flag in ("--data", "--model", "--epochs", "--batch-size", "--lr", "--seed", "--optimizer",
                 "--mode", "--device", "--checkpoint-dir", "--checkpoint-every", "--resume",
                 "--metrics", "--config", "--images-key", "--labels-key", "--layout",
                 "--val-fraction", "--shuffle", "--deterministic", "--debug"):
        assert flag in out


def test_deterministic_on_cuda_fixes_the_cublas_workspace_and_only_warns(monkeypatch):
    import logging

    from mpicnn.training.trainer import make_deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        make_deterministic(torch.device("cuda"), logging.getLogger("test"))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        make_deterministic(torch.device("cpu"), logging.getLogger("test"))
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_jobs_of_cpu_tests_see_no_gpu():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
