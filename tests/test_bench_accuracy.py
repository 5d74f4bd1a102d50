"""The accuracy benchmarks, ``tta`` and ``largebatch``, end to end at tiny settings.

No timing is asserted: the figures these print are measured on a quiet machine.
"""
from __future__ import annotations

import json
import sys

import pytest
from conftest import DIGITS, run_command

from mpicnn.bench.largebatch import accum_steps, job_flags
from mpicnn.bench.tta import fashion_data
from mpicnn.cluster.errors import MpicnnError


@pytest.mark.mpi
def test_tta_races_both_programs_and_reports_medians(tmp_path):
    out = tmp_path / "tta.json"
    run = run_command([sys.executable, "-m", "mpicnn.bench", "tta", "--data", DIGITS,
                       "--reps", "2", "--target", "0.0", "--out", out, "--",
                       "--epochs", "2", "--max-steps", "60", "--batch-size", "16"], 600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {r["system"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"mpicnn", "ddp"}
    for row in rows.values():
        assert row["reached"] == 2 and row["epoch"] == 1 and len(row["runs"]) == 2
        assert 0 < row["final_acc"] <= 1 and row["tta_s"] > 0
        assert {"data", "forward", "backward", "optimizer"} <= set(row["split_ms"])
    assert "DDP / mpicnn time to 0.0:" in run.stdout
    assert "DDP gloo + DataLoader/DistributedSampler" in run.stdout
    # alternating order: the second repetition starts with DDP
    order = [line.split()[2] for line in run.stderr.splitlines() if line.startswith("  rep")]
    assert order == ["mpicnn", "ddp", "ddp", "mpicnn"]


def test_tta_without_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MpicnnError, match="apt-get install dataset-fashion-mnist"):
        fashion_data("data/fashion.h5", package_dir=str(tmp_path / "absent"))
    with pytest.raises(MpicnnError, match="--data 'nope.h5' does not exist"):
        fashion_data("nope.h5")


def test_largebatch_cells_scale_the_lr_and_slice_big_rank_batches():
    assert accum_steps(4096, 512) == 8 and accum_steps(128, 512) == 1
    assert accum_steps(1000, 512) == 2 and accum_steps(96, 40) == 3
    sgd = job_flags("sgd", 2048, 2, 512)
    assert sgd[sgd.index("--lr") + 1] == "0.8"                 # 0.1 x 2048 / 256
    assert sgd[sgd.index("--batch-size") + 1] == 1024 and sgd[sgd.index("--accum-steps") + 1] == 2
    lamb = job_flags("lamb", 8192, 2, 512)
    assert lamb[lamb.index("--lr") + 1] == "0.0226274"         # 0.004 x sqrt(32)


@pytest.mark.mpi
def test_largebatch_prints_a_table_of_optimizers_by_batch(tmp_path):
    out = tmp_path / "lb.json"
    run = run_command([sys.executable, "-m", "mpicnn.bench", "largebatch", "--data", DIGITS,
                       "--epochs", "1", "--batches", "32,128", "--optimizers", "sgd,lamb",
                       "--micro-batch", "32", "--out", out, "--", "--max-steps", "8"], 600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.read_text())
    assert [(r["optimizer"], r["batch"]) for r in rows] == [("sgd", 32), ("sgd", 128),
                                                           ("lamb", 32), ("lamb", 128)]
    assert all(0 < r["val_acc"] <= 1 and r["steps"] == 8 for r in rows)
    table = run.stdout.splitlines()
    assert table[1].split() == ["optimizer", "32", "128"]
    assert table[2].startswith("SGD (linear + warmup)") and table[3].startswith("LAMB")
