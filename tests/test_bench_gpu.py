"""``python -m mpicnn.bench gpu --dry-run``: the GPU machine's plan, end to end on the CPU."""
from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT, job_env

from mpicnn.bench.gpu import SKIPPED, VARIANTS, cuda_aware_choice, missing, train_flags


def test_missing_flags_and_the_cuda_aware_line():
    assert missing(["--amp", "bf16", "--channels-last"], {"--channels-last"}) == ["--amp"]
    assert missing([], set()) == []
    line = ("mpicnn: gradient sync: 2 bucket(s) ...; CUDA buffers staged through pinned host "
            "memory: the MPI library is not CUDA-aware (MPIX_Query_cuda_support() = 0)")
    assert cuda_aware_choice(line).startswith("staged through pinned host memory: the MPI")
    assert "no CUDA buffers" in cuda_aware_choice("gradient sync: plain: one Allreduce")


@pytest.mark.mpi
def test_dry_run_runs_the_whole_plan_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(["python", "-m", "mpicnn.bench", "gpu", "--dry-run", "--out", out],
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=540,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    assert result["tests"]["returncode"] == 0 and "skipped" in result["tests"]["summary"]
    assert [(r["model"], r["variant"]) for r in result["rows"]] == \
        [(m, v) for m in ("resnet18", "seednet") for v in VARIANTS]
    flags = train_flags()
    for row in result["rows"]:
        assert row["bare_images_per_s"] > 0
        if missing(VARIANTS[row["variant"]][2], flags):
            assert row["mpicnn_images_per_s"].startswith(SKIPPED) and row["ratio"] is None
        else:
            assert row["mpicnn_images_per_s"] > 0 and row["ratio"] > 0
    assert [r["model"] for r in result["two_ranks"]] == ["resnet18", "seednet"]
    assert all(r["images_per_s"] > 0 and "no CUDA buffers" in r["buffers"]
               for r in result["two_ranks"])
    assert "mpicnn/bare" in done.stdout and "2 ranks sharing the cpu" in done.stdout
