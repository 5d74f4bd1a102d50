"""Failure-handling pieces that need no MPI: checksums, pruning, stall diagnosis, NaN policy."""
from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest
import torch

from mpicnn.checkpoint import checksum as digest
from mpicnn.checkpoint import files as checkpoint
from mpicnn.checkpoint.state import plain_scheduler_state
from mpicnn.cluster.errors import MpicnnError
from mpicnn.cluster.world import World
from mpicnn.config import parse_config
from mpicnn.resilience import drills as faults
from mpicnn.resilience.nan_policy import NanGuard, grads_finite
from mpicnn.resilience.watchdog import (
    COMPUTE,
    DONE,
    PEER,
    SERVE,
    WAIT,
    Seen,
    describe_silent,
    diagnose,
    heartbeat_interval,
    silent_ranks,
    spans,
)
from mpicnn.training.optim import build_scheduler

PACKAGE = Path(__file__).resolve().parent.parent / "mpicnn"
LOG = logging.getLogger("test")


# --- checksums ------------------------------------------------------------------------

def sample_state():
    return {"model": {"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16)},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"lr": 0.1}]},
            "epoch": 2, "name": "digitnet", "rng": torch.get_rng_state()}


def test_checksum_detects_any_change():
    sealed = digest.seal(sample_state())
    assert digest.verify(sealed) is None
    for change in (lambda s: s["model"]["w"].view(-1)[5].add_(1e-6),
                   lambda s: s["optimizer"]["groups"][0].update(lr=0.2),
                   lambda s: s.update(epoch=3),
                   lambda s: s["model"].update(extra=torch.zeros(0))):
        tampered = digest.seal(sample_state())
        change(tampered)
        assert "does not match" in digest.verify(tampered)
    assert "no checksum" in digest.verify(sample_state())


def test_checksum_encoding_is_unambiguous():
    assert digest.content_digest({"a": [1]}) != digest.content_digest({"a": 1})
    assert digest.content_digest({"a": (1,)}) != digest.content_digest({"a": [1]})
    assert digest.content_digest(torch.zeros(2, 3)) != digest.content_digest(torch.zeros(3, 2))
    assert digest.content_digest({"x": 1, "y": 2}) == digest.content_digest({"y": 2, "x": 1})


def test_save_load_round_trip_and_refusals(tmp_path):
    state = sample_state()
    checkpoint.atomic_save(state, tmp_path / "c.pt")
    loaded = checkpoint.load(tmp_path / "c.pt")
    assert digest.KEY not in loaded and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"
    torch.save(state, tmp_path / "plain.pt")                 # no checksum
    with pytest.raises(MpicnnError, match="no checksum"):
        checkpoint.load(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MpicnnError, match="damaged or not a checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_is_refused_not_run(tmp_path):
    state = digest.seal({"model": {"w": torch.zeros(2)}})
    state["model"]["hook"] = RunsCode(tmp_path / "ran")
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(MpicnnError, match=r"other than tensors and plain data \(posix.system\)"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


def test_scheduler_state_loads_without_unpickling_objects(tmp_path):
    cfg = parse_config([])
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(cfg.training, optimizer, 10, 100)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    checkpoint.atomic_save({"scheduler": plain_scheduler_state(scheduler)}, tmp_path / "s.pt")
    again = build_scheduler(cfg.training, torch.optim.SGD(model.parameters(), lr=0.1), 10, 100)
    again.load_state_dict(checkpoint.load(tmp_path / "s.pt")["scheduler"])
    assert again.last_epoch == 7 and again.get_last_lr() == scheduler.get_last_lr()


# --- keeping the newest checkpoints ---------------------------------------------------

def test_prune_keeps_newest_and_removes_leftovers(tmp_path):
    for step in (2, 4, 6, 8, 10):
        checkpoint.atomic_save({"step": step}, tmp_path / checkpoint.checkpoint_name(step))
    checkpoint.atomic_save({"step": 99}, tmp_path / checkpoint.FINAL)
    dead = tmp_path / f".{checkpoint.checkpoint_name(12)}.tmp999999999"
    ours = tmp_path / f".{checkpoint.checkpoint_name(12)}.tmp{os.getpid()}"
    unrelated = tmp_path / ".server-1.pt.tmp123"
    for path in (dead, ours, unrelated):
        path.write_bytes(b"partial")
    checkpoint.prune(tmp_path, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([checkpoint.checkpoint_name(8), checkpoint.checkpoint_name(10),
                            checkpoint.FINAL, ours.name, unrelated.name])
    checkpoint.prune(tmp_path, keep=0)                      # 0 keeps every checkpoint
    assert len(list(tmp_path.glob("checkpoint-*.pt"))) == 2


def test_load_newest_falls_back_past_damaged_files(tmp_path):
    for step in (1, 2):
        checkpoint.atomic_save({"step": step}, tmp_path / checkpoint.checkpoint_name(step))
    (tmp_path / checkpoint.checkpoint_name(3)).write_bytes(b"half a checkpoint")
    warnings = []
    path, state = checkpoint.load_newest(tmp_path, warnings.append)
    assert path.name == checkpoint.checkpoint_name(2) and state["step"] == 2
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"warning: resume: skipping "
                                  f"{tmp_path / checkpoint.checkpoint_name(3)}: damaged or not "
                                  f"a checkpoint (")
    assert warnings[0].endswith("; trying the next older one")
    with pytest.raises(MpicnnError, match="cannot load checkpoint"):    # named: refused
        checkpoint.load(tmp_path / checkpoint.checkpoint_name(3))
    for step in (1, 2):
        (tmp_path / checkpoint.checkpoint_name(step)).write_bytes(b"")
    with pytest.raises(MpicnnError, match="none of the 3 checkpoint"):
        checkpoint.load_newest(tmp_path, warnings.append)
    assert checkpoint.load_newest(tmp_path / "empty", warnings.append) == (None, None)


# --- stall diagnosis -------------------------------------------------------------------

def seen(state, step, since, heard=100.0):
    return Seen(state, step, since, heard)


def test_diagnose_names_missing_ranks():
    now = 100.0
    ranks = [seen(WAIT, 7, 30.0), seen(WAIT, 7, 35.0), seen(COMPUTE, 7, 20.0),
             seen(COMPUTE, 6, 10.0, heard=50.0), seen(SERVE, 0, 0.0)]
    waited, point, text = diagnose(ranks, now, silent_after=10)
    assert waited == 70 and point == (WAIT, 7)
    assert text == ("ranks 0-1 have waited 70 s at the gradient exchange of step 7; missing: "
                    "rank 2 (computing step 7 for 80 s), rank 3 (silent for 50 s; last "
                    "computing step 6 for 90 s)")


def test_diagnose_quiet_cases():
    assert diagnose([seen(COMPUTE, 3, 0.0)] * 3, 100.0, 10) is None
    waited, point, text = diagnose([seen(WAIT, 3, 50.0)] * 2 + [seen(SERVE, 0, 0.0)], 100.0, 10)
    assert "none is missing" in text and waited == 50
    _, point, text = diagnose([seen(DONE, 9, 40.0), seen(COMPUTE, 9, 10.0)], 100.0, 10)
    assert point == (DONE, 9) and "rank 0 has waited 60 s at the end of the run" in text


def test_diagnose_names_the_stage_its_neighbours_wait_for():
    # a 3-stage pipeline whose last stage is stuck in its forward: stages 0 and 1 wait for
    # the gradients of their outputs (without PEER marks all three would look computing)
    labels = [f"stage {k} of 3, replica 0" for k in range(3)]
    ranks = [seen(PEER, 5, 20.0), seen(PEER, 5, 25.0), seen(COMPUTE, 5, 18.0)]
    waited, point, text = diagnose(ranks, 100.0, silent_after=10, labels=labels)
    assert waited == 80 and point == (PEER, 5)
    assert text == ("ranks 0-1 have waited 80 s at the pipeline exchange of step 5 (a "
                    "neighbouring stage's activations or gradients); missing: rank 2 (stage 2 "
                    "of 3, replica 0; computing step 5 for 82 s)")


def test_diagnose_lists_at_most_a_few_ranks():
    ranks = [seen(WAIT, 2, 0.0)] + [seen(COMPUTE, 2, 0.0)] * 20
    _, _, text = diagnose(ranks, 100.0, 10)
    assert text.count("(computing") == 8 and text.endswith("ranks 9-20")
    assert spans([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_heartbeat_interval_bounds():
    assert heartbeat_interval(60, 0) == 5.0
    assert heartbeat_interval(60, 2) == 0.5
    assert heartbeat_interval(0.01, 0) == 0.05
    assert heartbeat_interval(0, 0, 8) == 2.0
    assert heartbeat_interval(60, 300, 120) == 5.0         # the defaults


def test_silent_ranks_are_named_with_their_nodes():
    heard = [Seen(heard=h) for h in (0.0, 95.0, 30.0, 20.0, 10.0)]
    # rank 0 is the listener; rank 4 finished (it beats no more); limit 60 s at t = 100
    assert silent_ranks(heard, finished={4}, now=100.0, limit=60) == [2, 3]
    assert silent_ranks(heard, finished=set(), now=100.0, limit=100) == []
    hosts = ["a", "a", "b", "b", "c"]
    assert describe_silent([2, 3], hosts) == "ranks 2-3 (node b, all its ranks)"
    assert describe_silent([1, 4], hosts) == "rank 1 (node a), rank 4 (node c)"
    assert describe_silent([1, 2, 3], hosts) == "rank 1 (node a), ranks 2-3 (node b, all its ranks)"


def test_a_hung_or_cut_off_job_ends_with_default_flags():
    failure = parse_config([]).failure
    assert failure.stall_abort == 300.0 and failure.unreachable_abort == 120.0
    assert parse_config(["--unreachable-abort", "60"]).failure.unreachable_abort == 60.0
    with pytest.raises(MpicnnError, match="--unreachable-abort must not be negative"):
        parse_config(["--unreachable-abort", "-1"])


# --- NaN policy -------------------------------------------------------------------------

def test_grads_finite():
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    assert grads_finite(params)                            # no gradients yet
    for p in params:
        p.grad = torch.ones(3)
    assert grads_finite(params)
    params[1].grad[2] = float("inf")
    assert not grads_finite(params)
    params[1].grad[2] = float("nan")
    assert not grads_finite(params)


def test_nan_guard_policies():
    with pytest.raises(MpicnnError, match=r"at step 12 \(lr 0\.05\)") as caught:
        NanGuard("abort", LOG).apply(False, 12, 0.05, agreed=True)
    assert caught.value.collective
    with pytest.raises(MpicnnError) as caught:
        NanGuard("abort", LOG).apply(False, 12, 0.05, agreed=False)
    assert not caught.value.collective                      # the failing rank reports
    guard = NanGuard("skip", LOG, max_consecutive=3)
    assert guard.apply(True, 1, 0.1, True)
    assert not guard.apply(False, 2, 0.1, True) and not guard.apply(False, 3, 0.1, True)
    assert guard.apply(True, 4, 0.1, True) and guard.skipped == 2
    guard.apply(False, 5, 0.1, True)
    guard.apply(False, 6, 0.1, True)
    with pytest.raises(MpicnnError, match="last 3 updates were all skipped"):
        guard.apply(False, 7, 0.1, True)


def test_failure_options_parse():
    """(Their bad values are in test_config's table of rejected settings.)"""
    cfg = parse_config(["--nan-policy", "skip", "--stall-warn", "5", "--stall-abort", "30",
                        "--keep-checkpoints", "0"])
    assert (cfg.failure.nan_policy, cfg.failure.stall_warn, cfg.failure.stall_abort,
            cfg.output.keep_checkpoints) == ("skip", 5.0, 30.0, 0)


def test_drill_sleep_spec():
    assert faults.parse_sleeps("1:3:2.5, 0:4:1,1:3:1", rank=1) == {3: 3.5}
    assert faults.parse_sleeps("", rank=0) == {}
    assert faults.parse_sleeps("1:3:2:forward,1:4:1", rank=1, where="forward") == {3: 2.0}
    assert faults.parse_sleeps("1:3:2:forward,1:4:1", rank=1) == {4: 1.0}
    for bad in ("1:3", "1:3:2:backward"):
        with pytest.raises(MpicnnError, match="rank:step:seconds"):
            faults.parse_sleeps(bad, rank=0)


class OneRank:
    def allgather(self, value):
        return [value]


def test_agree_turns_unexpected_exceptions_into_one_error():
    world = World(comm=OneRank())

    def broken():
        raise TypeError("bad factory")
    with pytest.raises(MpicnnError, match="TypeError: bad factory") as caught:
        world.agree(broken)
    assert caught.value.collective and isinstance(caught.value.__cause__, TypeError)


# --- config safety ------------------------------------------------------------------------

FORBIDDEN_CALLS = {"eval", "exec", "os.system", "os.popen", "pickle.load", "pickle.loads",
                   "yaml.load", "marshal.loads", "shelve.open"}
SOCKET_OPENERS = {"socket.socket", "socket.create_server", "socket.create_connection"}
FORBIDDEN_IMPORTS = {"socketserver", "http.server", "xmlrpc.server", "asyncio"}
# The DDP peers of the benchmarks need gloo's loopback rendezvous.
MAY_OPEN_SOCKETS = {"bench/_gloo.py"}


def _name(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def test_package_never_evaluates_input_or_listens():
    """No eval/exec/shell/unpickling of files, no servers: config values stay data."""
    problems = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                name = _name(node.func)
                may_open = str(path.relative_to(PACKAGE)) in MAY_OPEN_SOCKETS
                if name in FORBIDDEN_CALLS or (name in SOCKET_OPENERS and not may_open):
                    problems.append(f"{where} calls {name}")
                if any(k.arg == "shell" and getattr(k.value, "value", False)
                       for k in node.keywords):
                    problems.append(f"{where} runs a shell")
                if name == "torch.load" and not any(
                        k.arg == "weights_only" and getattr(k.value, "value", None) is True
                        for k in node.keywords):
                    problems.append(f"{where} calls torch.load without weights_only=True")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module or ""]
                problems += [f"{where} imports {m}" for m in modules if m in FORBIDDEN_IMPORTS]
    assert not problems, "\n".join(problems)
    assert "tomllib.load(" in (PACKAGE / "config" / "toml.py").read_text()


def test_diagnose_names_what_each_rank_is():
    ranks = [seen(WAIT, 3, 40.0), seen(COMPUTE, 3, 30.0)]
    labels = ["stage 0 of 2, replica 0", "stage 1 of 2, replica 0"]
    _, _, text = diagnose(ranks, 100.0, 10, labels=labels)
    assert text == ("rank 0 (stage 0 of 2, replica 0) has waited 60 s at the gradient "
                    "exchange of step 3; missing: rank 1 (stage 1 of 2, replica 0; computing "
                    "step 3 for 70 s)")
