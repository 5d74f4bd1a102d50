"""train.sbatch across two emulated nodes: a slurmd in each, slurmctld on the bridge.

``sbatch jobs/slurm/train.sbatch`` with the script's own shape (2 nodes x 4 ranks, 4
GPUs per node) and only the cores overridden for this machine (1 per rank; the GPUs
are the test cluster's fake ones, the ranks train on CPU) really spans two nodes via
``srun --mpi=pmi2``: MPI crosses the emulated link, ``COMM_TYPE_SHARED`` finds two
nodes. Then the preemption drill across them: USR1 mid-run, checkpoint, requeue,
resume, the same final parameters. Needs root, namespaces and SLURM (Debian's packages,
which .ci/run installs); skips otherwise, naming why (in CI a missing package fails).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, job_env, private_cluster, read_jsonl, slurm_tier
from slurm_cluster import LocalSlurm, running_slurm

from mpicnn.cluster.hydra import NETMODS

pytestmark = [pytest.mark.slurm, pytest.mark.mpi, pytest.mark.cluster]

SCRIPT = ROOT / "jobs" / "slurm" / "train.sbatch"
TRAIN_ARGS = ["--epochs", "3", "--deterministic", "--device", "cpu", "--progress", "off"]
FOR_THIS_MACHINE = ["--cpus-per-task=1", "--time=20"]     # the rest is the script's own
JOB_TIMEOUT = 300       # a plain run takes about 20 s; under pytest's 600 s
PREEMPTED_EXIT = 75


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    nodes = private_cluster("l", nodes=2)
    try:
        with slurm_tier(), running_slurm(tmp_path_factory.mktemp("slurm"), nodes,
                                         timeout=120) as cluster:
            yield cluster
    finally:
        nodes.down()


def submit(cluster: LocalSlurm, where: Path) -> str:
    """sbatch train.sbatch from ``where``; cross-node MPI over TCP as on the emulated links."""
    where.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch(*FOR_THIS_MACHINE, SCRIPT, *TRAIN_ARGS, cwd=where,
                          env=job_env({"MPICNN_DIR": str(ROOT), "PYTHON": sys.executable,
                                       "LAUNCHER": "srun", **NETMODS["ucx"]}))


def finished(cluster: LocalSlurm, job_id: str, where: Path) -> tuple[dict, str]:
    records = cluster.wait(job_id, JOB_TIMEOUT)
    log = where / f"mpicnn-{job_id}.out"
    return records[0], log.read_text() if log.exists() else f"(no log {log})"


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    """The script's default shape across both nodes, start to end: (job id, submit dir)."""
    where = tmp_path_factory.mktemp("plain")
    job_id = submit(slurm, where)
    record, log = finished(slurm, job_id, where)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, log)
    return job_id, where, log


def test_train_sbatch_spans_two_nodes_through_srun(slurm, uninterrupted):
    job_id, where, log = uninterrupted
    hosts = ", ".join(sorted(slurm.node_addresses()))
    assert "running: srun --mpi=pmi2" in log and "mpicnn: error" not in log
    assert f"world: 2 node(s) x 4 rank(s)/node = 8 rank(s) on {hosts}" in log, log[:6000]
    end = read_jsonl(where / "runs" / f"mpicnn-{job_id}" / "metrics.jsonl")[-1]
    assert end["event"] == "end" and end["world_size"] == 8 and end["epochs"] == 3, end
    assert end["val_acc"] >= 0.9, end


def test_preemption_drill_across_nodes_requeues_and_matches(slurm, uninterrupted, tmp_path):
    reference_id, reference_dir, _ = uninterrupted
    job_id = submit(slurm, tmp_path)
    metrics = tmp_path / "runs" / f"mpicnn-{job_id}" / "metrics.jsonl"
    slurm.wait_for(lambda: metrics.exists() and '"event": "epoch"' in metrics.read_text(),
                   JOB_TIMEOUT, "the first epoch record", job_id)
    slurm.command("scancel", "--signal=USR1", "--batch", job_id)
    record, log = finished(slurm, job_id, tmp_path)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", (record, log)
    events = read_jsonl(metrics)
    stopped = [r for r in events if r["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["exit_code"] == PREEMPTED_EXIT, events
    step = stopped[0]["step"]
    assert f"requeueing job {job_id} (restart 1 of at most 3)" in log
    assert f"at epoch {stopped[0]['epoch']}, step {step}" in log          # resumed there
    assert events[-1]["event"] == "end" and events[-1]["world_size"] == 8
    ours = torch.load(metrics.parent / "final.pt", weights_only=True)["model"]
    reference = torch.load(reference_dir / "runs" / f"mpicnn-{reference_id}" / "final.pt",
                           weights_only=True)["model"]
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
