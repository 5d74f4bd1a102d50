"""``bench cluster`` and the scaling model's check against it: pure parts, then a tiny run.

The tiny run proves the plumbing (every variant runs across emulated nodes, the table
and JSON come out, the model reads them); it asserts no speed: benchmarks measure speed.
"""
from __future__ import annotations

import json
import sys

import pytest
from conftest import job_env, run_command

from mpicnn.bench import cluster as bench
from mpicnn.bench import scale
from mpicnn.cluster.errors import MpicnnError
from mpicnn.cluster.netns import BURST_BYTES

M = 8e6                                 # gradient bytes in the examples


def test_shapes_and_variants_are_checked():
    assert bench.shapes_of("2x2, 4x1") == [(2, 2), (4, 1)]
    for bad in ("2", "1x4", "2x0", "twoxtwo"):
        with pytest.raises(MpicnnError, match="is not NODESxRANKS"):
            bench.shapes_of(bad)
    assert bench.variants_of("mpicnn,DDP gloo") == ["mpicnn", "DDP gloo"]
    with pytest.raises(MpicnnError, match="unknown 'nccl'"):
        bench.variants_of("mpicnn,nccl")


def test_bytes_through_a_node_link_per_step():
    # a flat ring over 4 ranks moves 1.5 gradients each way through every node's link;
    # the leaders (or the windows' slice owners) of 2 nodes move 1
    assert bench.link_bytes("ring", 2, 2, M) == pytest.approx(1.5 * M)
    assert bench.link_bytes("nodes", 2, 2, M) == pytest.approx(M)
    assert bench.link_bytes("ring", 4, 1, M) == bench.link_bytes("nodes", 4, 1, M)
    assert bench.link_bytes(None, 2, 2, M) == 0.0
    # 1 Gbit/s = 125e6 B/s; the hierarchical 2x2 at batch 8: 125e6 / 8e6 * 32 images
    assert bench.link_bound("mpicnn hier", 2, 2, M, 8, "1gbit") == pytest.approx(500.0)
    assert bench.link_bound("mpicnn hier bf16", 2, 2, M, 8, "1gbit") == pytest.approx(1000.0)
    assert bench.link_bound("DDP gloo", 2, 2, M, 8, "1gbit") == pytest.approx(500.0 / 1.5)
    assert bench.link_bound("mpicnn", 2, 2, M, 8, "none") is None
    assert bench.link_bound("no-comm ceiling", 2, 2, M, 8, "1gbit") is None


def test_factored_layers_move_their_factors_instead_of_their_gradient():
    seednet = [(4096, 512), (512, 10)]
    gradient = 4 * (4096 * 512 + 512 + 512 * 10 + 10) + 150_000
    # batch 8 on 2x2: the 4096 x 512 weight goes as factors (auto: 14x fewer bytes); the
    # other node's 2 ranks' 8 rows of 4608 float32 values come in
    dense, factors = bench.traffic("mpicnn", 2, 2, 8, gradient, seednet)
    assert dense == gradient - 4 * 4096 * 512
    assert factors == 4 * 2 * 8 * 4608
    assert bench.link_bound("mpicnn", 2, 2, gradient, 8, "1gbit", seednet) == \
        pytest.approx(125e6 / (dense + factors) * 32)
    # batch 64: 1.8x, not enough for auto; on takes it; off, the plain path and DDP never
    assert bench.traffic("mpicnn", 2, 2, 64, gradient, seednet) == (gradient, 0)
    assert bench.traffic("mpicnn factors overlap", 2, 2, 64, gradient, seednet)[1] > 0
    for variant in ("mpicnn dense", "mpicnn plain", "DDP gloo", "no-comm ceiling"):
        assert bench.traffic(variant, 2, 2, 8, gradient, seednet) == (gradient, 0)


def test_ratios_compare_like_with_like():
    runs = {"mpicnn": [{"images_per_s": 300, "comm_ms": 5.0, "comm_busy_ms": 9.0},
                       {"images_per_s": 340, "comm_ms": 7.0, "comm_busy_ms": 11.0}],
            "mpicnn bf16": [{"images_per_s": 400}],
            "DDP gloo": [{"images_per_s": 200}],
            "DDP gloo fp16": [{"images_per_s": 250}],
            "no-comm ceiling": [{"images_per_s": 800}]}
    rows = {r["variant"]: r for r in bench.summarize(runs, 2, 2, "1gbit", 8, M)}
    assert rows["mpicnn"]["images_per_s"] == 320 and rows["mpicnn"]["runs"] == [300, 340]
    assert rows["mpicnn"]["x_ddp"] == pytest.approx(1.6)            # fp32 vs DDP fp32
    assert rows["mpicnn bf16"]["x_ddp"] == pytest.approx(1.6)       # bf16 vs DDP fp16 hook
    assert rows["mpicnn"]["of_ceiling"] == pytest.approx(0.4)
    assert (rows["mpicnn"]["comm_ms"], rows["mpicnn"]["comm_busy_ms"]) == (6.0, 10.0)
    assert rows["mpicnn"]["of_link_bound"] == pytest.approx(320 / 500)
    assert rows["no-comm ceiling"]["x_ddp"] is None
    text = bench.table(list(rows.values()))
    assert text.splitlines()[1].split()[:5] == ["2x2", "1gbit", "8", "mpicnn", "320.0"]


def test_the_model_predicts_each_run_from_its_ceiling_and_shared_links():
    inter, intra = (0.0, 8e-9), (0.0, 1e-10)        # 1 Gbit/s links, fast memory
    # the nodes of a 2x2 share one link: the leaders' ring moves the whole gradient
    assert scale.shared_link_seconds("nodes", 2, 2, M, inter, intra) == \
        pytest.approx(M * 1e-10 + M * 8e-9)
    assert scale.shared_link_seconds("ring", 2, 2, M, inter, intra) == \
        pytest.approx(1.5 * M * 8e-9)
    rows = [{"nodes": 2, "ranks_per_node": 2, "rate": "1gbit", "batch": 8, "variant": v,
             "images_per_s": x, "pattern": bench.VARIANTS[v][3], "wire": bench.VARIANTS[v][2]}
            for v, x in (("mpicnn hier", 300.0), ("no-comm ceiling", 640.0),
                         ("DDP gloo", 200.0))]
    rows.append(dict(rows[0], rate="10gbit"))                  # another rate: not predicted
    runs = {r["variant"]: r for r in scale.predict_cluster_runs(rows, M, inter, intra, "1gbit")}
    assert set(runs) == {"mpicnn hier", "DDP gloo"}
    hier = runs["mpicnn hier"]
    assert hier["compute_ms"] == pytest.approx(50.0)           # 32 images at 640 images/s
    assert hier["comm_ms"] == pytest.approx(1000 * (M * 1e-10 + M * 8e-9))
    assert hier["predicted"] == pytest.approx(32 / (0.05 + hier["comm_ms"] / 1000))
    assert hier["error"] == pytest.approx(hier["predicted"] / 300 - 1)
    # a factored run: its dense part around the nodes, its factors in one Allgather
    factored = dict(rows[0], variant="mpicnn", dense_bytes=M / 4, factor_bytes=M / 16)
    [run] = scale.predict_cluster_runs([factored, rows[1]], M, (1e-4, 8e-9), intra, "1gbit")
    assert run["comm_ms"] == pytest.approx(1000 * (
        scale.shared_link_seconds("nodes", 2, 2, M / 4, (1e-4, 8e-9), intra)
        + 1e-4 + M / 16 * 8e-9))
    assert all(s >= 4 * BURST_BYTES for s in scale.link_probe_sizes(100_000, short=True))


@pytest.mark.cluster
@pytest.mark.mpi
def test_tiny_cluster_benchmark_and_model_check(tmp_path, emulated_cluster):
    out = tmp_path / "cluster.json"
    run = run_command([sys.executable, "-m", "mpicnn.bench", "cluster", "--shapes", "2x1",
                       "--rates", "1gbit", "--batches", "4", "--reps", "1", "--steps", "8",
                       "--model", "seednet",       # the plumbing, not resnet18's minutes
                       "--variants", "mpicnn,DDP gloo fp16,DDP gloo powersgd,no-comm ceiling",
                       "--json", out],
                      timeout=900, env=job_env(), check=True)
    lines = run.stdout.splitlines()
    assert [line.split()[3] for line in lines[1:5]] == ["mpicnn", "DDP", "DDP", "no-comm"]
    assert "links 1gbit" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["mpicnn", "DDP gloo fp16", "DDP gloo powersgd",
                                            "no-comm ceiling"]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert rows[0]["comm_busy_ms"] is not None and rows[0]["link_bound"] > 0
    check = tmp_path / "check.json"
    run = run_command([sys.executable, "-m", "mpicnn.bench", "scale", "--link", "1gbit",
                       "--compare", out, "--short", "--probe-seconds", "1", "--json", check],
                      timeout=600, env=job_env(), check=True)
    assert "scaling model vs bench cluster at 1gbit" in run.stdout
    predicted = json.loads(check.read_text())["runs"]
    assert [r["variant"] for r in predicted] == ["mpicnn", "DDP gloo fp16", "DDP gloo powersgd"]
    assert all(r["predicted"] > 0 for r in predicted)


@pytest.mark.cluster
@pytest.mark.mpi
def test_ps_benchmark_across_emulated_nodes_places_ranks_one_per_node(tmp_path,
                                                                       emulated_cluster):
    """2 workers and a server on 2 nodes: the straggler (worker 1) has node 2 to itself."""
    out = tmp_path / "ps.json"
    run = run_command([sys.executable, "-m", "mpicnn.bench", "ps", "--workers", 2,
                       "--epochs", 1, "--reps", 1, "--modes", "allreduce,ps-sync",
                       "--nodes", 2, "--rate", "1gbit", "--out", out, "--",
                       "--max-steps", 12],
                      timeout=900, env=job_env(), check=True)
    assert "2 node(s)" in run.stdout and "links 1gbit" in run.stdout
    assert "ranks placed one per node in turn" in run.stdout
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["straggler"], r["ranks"]) for r in rows] == [
        ("allreduce", 1.0, 2), ("ps-sync", 1.0, 3), ("allreduce", 2.0, 2), ("ps-sync", 2.0, 3)]
    assert all(r["images_per_s"] > 0 and r["val_acc"] > 0 for r in rows)


def test_a_failed_run_is_reported_and_the_others_kept():
    runs = {"mpicnn": [{"images_per_s": 30.0}, {"images_per_s": None, "error": " FAILED: boom"}],
            "DDP gloo": [{"images_per_s": None, "error": " FAILED: gloo aborted"}],
            "no-comm ceiling": [{"images_per_s": 40.0}]}
    rows = bench.summarize(runs, 2, 2, "1gbit", 8, 4 * 10 ** 6)
    mine, ddp, _ = rows
    assert mine["images_per_s"] == 30.0 and mine["runs"] == [30.0]
    assert mine["of_ceiling"] == 0.75 and mine["x_ddp"] is None
    assert mine["failed"] == ["boom"] and ddp["failed"] == ["gloo aborted"]
    assert ddp["images_per_s"] is None and ddp["of_link_bound"] is None
    text = bench.table(rows)
    assert "failed: gloo aborted" in text and "failed: boom" in text
    assert scale.predict_cluster_runs(rows, 4 * 10 ** 6, (1e-4, 8e-9), (1e-5, 1e-9),
                                      "1gbit")[0]["variant"] == "mpicnn"
