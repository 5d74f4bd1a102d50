"""Stops and failures across two emulated nodes (root, namespaces).

A stop signal to one rank of one node, a partition (one node's link taken down),
every rank of one node killed at once, and one link ten times slower than the other:
each job must end (or not) as a user expects with default flags, and ``--resume
auto`` must go on from what it left.
``MPICNN_DRILL_REPORT=drills.tsv`` records each drill's exit code and time.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import torch
from conftest import cluster_while_used, private_cluster, read_jsonl
from drill import Job, assert_one_clean_error, file_contains, rank_pids, record

from mpicnn.cluster.hydra import mpiexec_command
from mpicnn.cluster.netns import BURST_BYTES, rate_bits
from mpicnn.config import parse_config
from mpicnn.resilience.preemption import PREEMPTED_EXIT
from mpicnn.resilience.watchdog import CUT_OFF_FACTOR
from mpicnn.training.models import build_model

pytestmark = [pytest.mark.mpi, pytest.mark.cluster]
HANG = 240                       # seconds after which a run counts as hung (loaded machine)
UNREACHABLE = 60                 # --unreachable-abort in the partition drill (default 120)
EPOCH_RECORD = '"event": "epoch"'     # a checkpoint exists once it does
COMMON = ["--device", "cpu", "--threads", "1", "--progress", "off", "--deterministic"]
# the default engine, and the exchange going on into the next forward (small buckets, so
# that some are still in flight when a step ends)
ENGINES = pytest.mark.parametrize("engine", [[], ["--overlap-forward", "--bucket-mb", "0.05"]],
                                  ids=["default", "overlap-forward"])


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of this module's own, 2 ranks each; links restored after every drill."""
    yield from cluster_while_used("d", nodes=2)


def start(cluster, args, netmod: str = "ucx") -> Job:
    """``mpicnn.train args`` on 2 nodes x 2 ranks, in the background."""
    argv, env = mpiexec_command(cluster, [sys.executable, "-m", "mpicnn.train",
                                          *map(str, args)], 2, 4, netmod)
    return Job(4, [], env=env, command=argv)


def resume(cluster, out, *args) -> str:
    """``--resume auto`` from ``out`` across the nodes; the run's output (it must succeed)."""
    with start(cluster, [*COMMON, "--checkpoint-dir", out, "--metrics", out / "m.jsonl",
                         "--resume", "auto", *args]) as job:
        outcome = job.finish(timeout=HANG)
    assert outcome.returncode == 0, outcome.output[-3000:]
    assert "damaged" not in outcome.output        # the newest checkpoint was intact
    return outcome.stdout


def trained_epoch(out) -> int:
    """The last epoch a run finished, from its metrics."""
    return max(r["epoch"] for r in read_jsonl(out / "m.jsonl") if r["event"] == "epoch")


def node_ranks_gone(job: Job, ranks, timeout: float) -> bool:
    """Whether ``ranks`` (their processes) have ended within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not set(rank_pids(job.processes())) & set(ranks):
            return True
        time.sleep(0.5)
    return False


def test_a_stop_signal_on_one_node_stops_both_and_resume_ends_as_if_uninterrupted(
        tmp_path, cluster):
    args = [*COMMON, "--epochs", 3]
    out = tmp_path / "stopped"
    metrics = out / "m.jsonl"
    with start(cluster, [*args, "--checkpoint-dir", out, "--metrics", metrics]) as job:
        job.wait_until(lambda: file_contains(metrics, EPOCH_RECORD), HANG, "an epoch record")
        os.kill(rank_pids(job.processes())[3], signal.SIGUSR1)     # rank 3, on node 2 alone
        outcome = job.finish(timeout=HANG)
    record("preemption: SIGUSR1 to rank 3 (node 2 of 2)", outcome)
    assert outcome.returncode == PREEMPTED_EXIT, outcome.output[-3000:]
    assert not outcome.survivors
    stopped = read_jsonl(metrics)[-1]
    assert stopped["event"] == "stopped" and stopped["signal"] == "a signal to another rank"
    step = stopped["step"]
    assert (out / f"checkpoint-{step:08d}.pt").exists()
    stdout = resume(cluster, out, "--epochs", 3)
    assert f"checkpoint-{step:08d}.pt at epoch {stopped['epoch']}, step {step}" in stdout
    with start(cluster, [*args, "--checkpoint-dir", tmp_path / "plain"]) as job:
        assert job.finish(timeout=HANG).returncode == 0
    ours = torch.load(out / "final.pt", weights_only=True)["model"]
    plain = torch.load(tmp_path / "plain" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


@ENGINES
def test_partition_ends_the_job_naming_the_node_and_resume_continues(tmp_path, cluster, engine):
    out = tmp_path / "run"
    metrics = out / "m.jsonl"
    node2 = cluster.node_list[1].hostname
    try:
        with start(cluster, [*COMMON, *engine, "--epochs", 1000, "--checkpoint-dir", out,
                             "--metrics", metrics, "--unreachable-abort", UNREACHABLE]) as job:
            job.wait_until(lambda: file_contains(metrics, EPOCH_RECORD), HANG, "an epoch record")
            cut = time.monotonic()
            cluster.set_link(2, up=False)
            # Wall clock is the property here: the job must end. Rank 0 aborts after
            # UNREACHABLE s without a heartbeat (when exactly: silent_ranks, a pure function
            # tested in test_failure_units); each bound adds one more limit of headroom for
            # the heartbeat interval, the abort and a loaded machine.
            ended = job.wait_exit(2 * UNREACHABLE) - cut
            # rank 0's abort cannot reach node 2: its ranks end themselves (CUT_OFF_FACTOR x
            # the limit without an answer from rank 0)
            cut_off_gone = node_ranks_gone(job, (2, 3),
                                           (CUT_OFF_FACTOR + 1) * UNREACHABLE - ended)
            left = {pid: p for pid, p in job.processes().items()
                    if pid not in cluster.node_pids(2)}
            outcome = job.finish(timeout=10, since=cut)
    finally:
        cluster.set_link(2, up=True)
    record(f"partition: link of node 2 of 2 down, --unreachable-abort {UNREACHABLE} "
           f"{' '.join(engine)}", outcome)
    assert cut_off_gone, "the cut-off node's ranks never ended"
    assert not left, f"processes left outside the cut-off node: {left}"
    outcome.survivors = {}        # the cut-off node's launcher proxy cannot hear mpiexec
    line = assert_one_clean_error(outcome, f"unreachable: no heartbeat for {UNREACHABLE} s "
                                           f"from ranks 2-3 (node {node2}, all its ranks)")
    assert "--resume auto" in line
    epoch = trained_epoch(out)
    stdout = resume(cluster, out, *engine, "--epochs", 1000, "--stop-epoch", epoch + 1)
    assert f"at epoch {epoch}," in stdout and trained_epoch(out) == epoch + 1


@ENGINES
def test_every_rank_of_a_node_killed_ends_the_job_and_resume_continues(tmp_path, cluster,
                                                                         engine):
    out = tmp_path / "run"
    metrics = out / "m.jsonl"
    with start(cluster, [*COMMON, *engine, "--epochs", 1000, "--checkpoint-dir", out,
                         "--metrics", metrics]) as job:
        job.wait_until(lambda: file_contains(metrics, EPOCH_RECORD), HANG, "an epoch record")
        victims = [pid for rank, pid in rank_pids(job.processes()).items() if rank in (2, 3)]
        assert len(victims) == 2
        killed = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        outcome = job.finish(timeout=HANG, since=killed)
    record(f"node lost: SIGKILL to both ranks of node 2 of 2 {' '.join(engine)}", outcome)
    assert outcome.returncode != 0
    # Wall clock is the property: the job must end. The launcher ends it once the node's
    # ranks are dead; were that broken, only the watchdog would, at the default
    # --unreachable-abort and with a line of its own: that limit is the bound here.
    assert outcome.seconds < parse_config([]).failure.unreachable_abort, outcome.seconds
    assert "unreachable:" not in outcome.output and "stall:" not in outcome.output
    assert not outcome.survivors, f"processes left: {outcome.survivors}"
    epoch = trained_epoch(out)
    stdout = resume(cluster, out, *engine, "--epochs", 1000, "--stop-epoch", epoch + 1)
    assert f"at epoch {epoch}," in stdout and trained_epoch(out) == epoch + 1


SLOW, FAST = "2mbit", "20mbit"
# digitnet's whole float32 gradient (--sufficient-factors off): bytes each step's exchange
# must bring into node 2, and take out of it (it needs node 1's sum, node 1 needs its own)
GRADIENT = 4 * sum(p.numel() for p in build_model("digitnet", (1, 8, 8), 10).parameters())


def link_seconds(nbytes: float, rate: str) -> float:
    """Seconds ``nbytes`` take on a link shaped to ``rate``."""
    return 8 * nbytes / rate_bits(rate)


def test_a_ten_times_slower_link_is_no_stall_and_the_record_shows_the_wait(tmp_path):
    # Node 2's link at 2 Mbit/s: one exchange of digitnet's gradient takes seconds, and
    # heartbeats queue behind it. Thresholds a few exchanges long must still not fire.
    # They are set in exchanges (the link's time for one gradient, which CPU load does not
    # change), not in seconds of this machine.
    exchange = link_seconds(GRADIENT, SLOW)
    slow = private_cluster("w", nodes=2, rate=FAST, slow_links={2: SLOW})
    out = tmp_path / "run"
    shape = ["--batch-size", 64, "--epochs", 2, "--sufficient-factors", "off",
             "--stop-check-every", 1, "--stall-warn", round(8 * exchange),
             "--unreachable-abort", round(4 * exchange)]
    try:
        with start(slow, [*COMMON, *shape, "--checkpoint-dir", out, "--metrics", out / "m.jsonl",
                          "--stop-epoch", 1]) as job:
            outcome = job.finish(timeout=HANG)
        record("slow link: node 2 of 2 at 2mbit, the other at 20mbit", outcome)
        assert outcome.returncode == 0, outcome.output[-3000:]
        assert "stall:" not in outcome.output and "error" not in outcome.output
        epoch = next(r for r in read_jsonl(out / "m.jsonl") if r["event"] == "epoch")
        # Where the time went: each step's exchange brings GRADIENT bytes into each node
        # (the whole sum depends on the other node's), which node 2's link passes at its
        # rate beyond the BURST_BYTES it lets through at once. The bytes of a step exist
        # only once the step has started (the ranks meet at every step's end: the stop
        # check), so what the step's compute did not cover of that time, rank 0's record
        # must show as the wait in comm: a bound from the link, not from compute speed.
        link_ms = 1000 * link_seconds(GRADIENT - BURST_BYTES, SLOW)
        compute_ms = sum(epoch[f"{p}_ms"] for p in ("data", "forward", "backward"))
        assert epoch["comm_ms"] >= link_ms - compute_ms, (link_ms, epoch)
        stdout = resume(slow, out, *shape)                # the same run, to its end
        assert "at epoch 1," in stdout and trained_epoch(out) == 2
    finally:
        slow.down()
