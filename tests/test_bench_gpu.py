"""``python -m mpicnn.bench gpu --dry-run``: the GPU machine's plan, end to end on the CPU."""
from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT, job_env

from mpicnn.bench.gpu import COMPILED_VARIANTS, VARIANTS, cuda_aware_choice


def test_the_cuda_aware_line():
    line = ("mpicnn: gradient sync: 2 bucket(s) ...; CUDA buffers staged through pinned host "
            "memory: the MPI library is not CUDA-aware (MPIX_Query_cuda_support() = 0)")
    assert cuda_aware_choice(line).startswith("staged through pinned host memory: the MPI")
    assert "no CUDA buffers" in cuda_aware_choice("gradient sync: plain: one Allreduce")


@pytest.mark.mpi
@pytest.mark.slow
def test_dry_run_runs_the_whole_plan_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(["python", "-m", "mpicnn.bench", "gpu", "--dry-run", "--models",
                           "seednet", "--compile-mode", "default", "--out", out],
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=580,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    assert result["tests"]["returncode"] == 0 and "skipped" in result["tests"]["summary"]
    steps = result["overhead"]["rows"]
    assert steps["mpicnn"]["syncs"] == 0 and steps["mpicnn"]["host_ops"] > steps["bare"][
        "host_ops"] > 0
    assert [r["variant"] for r in result["eager"]] == list(VARIANTS)
    assert [r["variant"] for r in result["compiled"]] == list(COMPILED_VARIANTS[:1])
    for row in result["eager"] + result["compiled"]:
        assert row["bare_images_per_s"] > 0 and row["mpicnn_images_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["mpicnn_images_per_s"] /
                                             row["bare_images_per_s"])
    assert [r["model"] for r in result["two_ranks"]] == ["seednet"]
    assert all(r["images_per_s"] > 0 and "no CUDA buffers" in r["buffers"]
               for r in result["two_ranks"])
    fashion = result["fashion"]
    for run in (fashion["eager"], fashion["compiled"]):      # one epoch: no accuracy to expect
        assert 0 <= run["val_acc"] <= 1 and run["train_s"] > 0 and run["images_per_s"] > 0
    for title in ("mpicnn/bare", "--compile default", "2 ranks sharing the cpu",
                  "Fashion-MNIST recipe", "mpicnn - bare"):
        assert title in done.stdout, title
