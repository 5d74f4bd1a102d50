"""The comm and ps benchmarks run end to end (tiny settings; no timing is asserted)."""
from __future__ import annotations

import json
import sys

import pytest
from conftest import run_command

pytestmark = pytest.mark.mpi


def bench(*args, timeout: float = 400):
    run = run_command([sys.executable, "-m", "mpicnn.bench", *map(str, args)], timeout)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def test_comm_benchmark_prints_every_variant_with_ratios():
    run = bench("comm", "--reps", 1, "--steps", 8, "--batches", 8, "--bw-reps", 2)
    rows = {line[12:30].strip(): line.split() for line in run.stdout.splitlines()
            if line.strip().startswith("8 ")}
    assert set(rows) == {"mpicnn engine", "DDP gloo", "flat Allreduce", "1 rank 1 thread",
                         "no-comm ceiling"}
    assert float(rows["DDP gloo"][-4]) == 1.0                    # x DDP of the peer itself
    assert float(rows["mpicnn engine"][-3]) > 0                   # x flat
    assert float(rows["no-comm ceiling"][-1]) > 0                 # its efficiency
    assert "raw comm.Allreduce" in run.stdout and "ratio" in run.stdout


def test_ps_benchmark_reports_medians_and_the_straggler_ratio(tmp_path):
    out = tmp_path / "ps.json"
    run = bench("ps", "--workers", 2, "--epochs", 1, "--reps", 2, "--modes", "ps-sync,ps-async",
                "--out", out, "--", "--max-steps", 20)
    assert "ps-async / ps-sync throughput" in run.stdout
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["straggler"]) for r in rows] == [
        ("ps-sync", 1.0), ("ps-async", 1.0), ("ps-sync", 2.0), ("ps-async", 2.0)]
    assert all(len(r["runs"]) == 2 and r["val_acc"] > 0 for r in rows)


def test_checkpoint_benchmark_compares_sync_and_async_stalls(tmp_path):
    out = tmp_path / "ckpt.json"
    run = bench("checkpoint", "--model", "digitnet", "--batch", 8, "--steps", 8, "--every", 3,
                "--rounds", 1, "--json", out, timeout=200)
    assert "stall async / sync" in run.stdout
    figures = json.loads(out.read_text())["figures"]
    assert set(figures) == {"sync", "async"}
    for row in figures.values():
        assert row["checkpoints"] == 2 and row["mb"] > 0 and row["write_ms"] > 0


def test_pipeline_benchmark_reports_every_grid_against_data_parallel(tmp_path):
    out = tmp_path / "pipeline.json"
    run = bench("pipeline", "--ranks", 2, "--model", "digitnet", "--steps", 7,
                "--micro-batches", "1,2", "--global-batch", 8, "--out", out)
    rows = json.loads(out.read_text())
    assert [(r["grid"], r["micro_batches"]) for r in rows] == [
        ("2x1", 1), ("2x1", 2), ("1x2", 1), ("1x2", 2), ("allreduce x2", 1)]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert rows[0]["bubble_ideal"] == 0.5 and rows[1]["bubble_ideal"] == pytest.approx(1 / 3, abs=1e-4)
    assert all(0 <= r["bubble"] < 1 for r in rows if r["stages"])
    assert rows[0]["params_mb_per_rank"] < rows[2]["params_mb_per_rank"]   # a stage < all
    assert "vs DP" in run.stdout
