"""``python -m mpicnn.bench tta`` end to end at tiny settings (no timing is asserted)."""
from __future__ import annotations

import json
import sys

import pytest
from conftest import DIGITS, run_command

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
