"""Metrics schema, progress, timeline traces and the run report, on real runs."""
from __future__ import annotations

import io
import json
import struct
import sys
import time

import pytest
from conftest import mpirun, read_jsonl, run_command

from mpicnn.cluster.errors import MpicnnError
from mpicnn.observe import records as metrics
from mpicnn.observe import timeline
from mpicnn.observe.progress import Progress, status_line
from mpicnn.observe.records import check_record
from mpicnn.observe.steps import PHASES, PhaseTimer

STEPS, EVERY, WINDOW = 20, 4, (3, 9)


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# ---- pure pieces -------------------------------------------------------------------

def test_check_record_names_what_is_wrong():
    good = {"event": "interval", "schema": metrics.SCHEMA_VERSION, "time": 1.0, "epoch": 0.5,
            "step": 4, "steps": 4, "loss": 2.0, "lr": 1e-3, "images_per_s": 100.0,
            **{f"{p}_ms": 1.0 for p in PHASES}}
    assert check_record(good) == []
    assert check_record({**good, "ps_push_ms": 0.5, "staleness_hist": {"0": 3}}) == []
    missing = dict(good)
    del missing["lr"]
    assert check_record(missing) == ["interval: missing lr"]
    assert "is not" in check_record({**good, "step": 4.5})[0]
    assert "is not" in check_record({**good, "staleness_hist": [1, 2]})[0]
    assert "schema" in check_record({**good, "schema": 1})[0]
    assert check_record({"event": "bogus"}) == ["unknown event 'bogus'"]


def test_nested_wait_is_charged_to_itself_not_to_the_phase():
    timer = PhaseTimer()
    start = time.perf_counter()
    with timer.phase("comm"):
        time.sleep(0.02)
        with timeline.span("ps_push", bytes=10):
            time.sleep(0.03)
        with timeline.span("not a phase"):      # stays part of comm
            time.sleep(0.01)
    outer = time.perf_counter() - start
    assert timer.totals["ps_push"] >= 0.03
    assert timer.totals["comm"] >= 0.03
    assert timer.totals["comm"] + timer.totals["ps_push"] <= outer
    assert "not a phase" not in timer.totals
    taken = timer.take()
    assert taken["ps_push"] == timer.totals["ps_push"] and timer.take()["comm"] == 0.0
    with timeline.span("ps_pull"):                # outside any phase: nobody listens
        pass
    assert "ps_pull" not in timer.totals


def test_recorder_keeps_only_the_window_and_all_threads():
    recorder = timeline.Recorder(rank=0, window=(2, 4))
    timeline._recorder = recorder
    try:
        for step in range(6):
            timeline.step(step)
            with timeline.span("forward"):
                pass
            timeline.event("mark", step=step)
        import threading

        timeline.step(3)
        worker = threading.Thread(target=lambda: timeline.span("bucket 0").__enter__()
                                  .__exit__(None, None, None), name="comm")
        worker.start()
        worker.join()
    finally:
        timeline._recorder = None
    steps = sorted({e["args"]["step"] for e in recorder.events})
    assert steps == [2, 3]
    assert sorted(recorder.threads.values()) == ["comm", "main"]
    assert all(e["dur"] >= 0 for e in recorder.events if e["ph"] == "X")
    assert timeline.span("forward") is timeline._NULL      # off again: a no-op


def test_clock_offsets_are_corrected():
    # rank 1's clock runs 1000 s ahead; its round trips saw it 1000 s + 1 ms ahead at best
    samples = [(0.0, 1000.05, 0.1), (1.0, 1001.0015, 1.001), (2.0, 1002.3, 2.5)]
    offset, trip = timeline.best_offset(samples)
    assert trip == pytest.approx(0.001) and offset == pytest.approx(1000.001)
    parts = [{"host": "a", "wall0": 50.0, "threads": {"7": "main"},
              "events": [{"name": "x", "ph": "X", "ts": 0.0, "dur": 5.0, "tid": 7}]},
             {"host": "b", "wall0": 1050.0, "threads": {"9": "main"},
              "events": [{"name": "x", "ph": "X", "ts": 2.0, "dur": 5.0, "tid": 9}]}]
    events = [e for e in timeline.merge(parts, [0.0, 1000.0]) if e["ph"] == "X"]
    assert [(e["pid"], e["tid"], e["ts"]) for e in events] == [(0, 0, 0.0), (1, 0, 2.0)]


def test_timeline_steps_must_be_a_range():
    assert timeline.parse_steps("10:30") == (10, 30)
    for bad in ["10", "5:5", "-1:4", "a:b", "4:2"]:
        with pytest.raises(MpicnnError, match="--timeline-steps"):
            timeline.parse_steps(bad)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_at_a_terminal_shows_epoch_step_loss_rate_eta():
    stream = _Terminal()
    bar = Progress(True, "auto", stream=stream)
    bar.start(total=100, done=10, epochs=3, global_batch=32)
    for step in range(11, 15):
        bar.update(epoch=1, step=step, loss=0.5)
    bar.bar.refresh()
    shown = stream.getvalue()
    bar.close()
    for text in ["epoch 1/3", "14/100", "loss=0.5000", "img_s=", "<"]:
        assert text in shown, f"{text!r} not in the bar: {shown!r}"
    assert not Progress(True, "auto", stream=io.StringIO()).enabled     # a file: no bar
    assert not Progress(False, "on", stream=_Terminal()).enabled        # rank > 0: nothing


def test_status_line():
    line = status_line(2, 20, 150, 2000, 0.53214, 1000.0, 32)
    # 1850 steps left x 32 images / 1000 images/s = 59.2 s
    assert line == "epoch 2/20 step 150/2000 loss 0.5321 1000 images/s ETA 0:00:59"
    assert status_line(1, 1, 0, 10, 1.0, 0.0, 32).endswith("ETA ?")


# ---- real runs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    """A 2-rank and a 1-rank run of the same global batch, with metrics and timelines."""
    out = tmp_path_factory.mktemp("runs")
    result = {}
    for n, batch in [(2, 8), (1, 16)]:
        jsonl, trace = out / f"run{n}.jsonl", out / f"trace{n}.json"
        run = mpirun(n, ["--data", digits, "--batch-size", batch, "--max-steps", STEPS,
                         "--log-every", EVERY, "--metrics", jsonl, "--timeline", trace,
                         "--timeline-steps", f"{WINDOW[0]}:{WINDOW[1]}", "--threads", 1])
        result[n] = (run, jsonl, trace)
    return result


@pytest.mark.mpi
def test_metrics_records_follow_the_schema(runs):
    for n, (run, jsonl, _) in runs.items():
        records = read_jsonl(jsonl)
        for record in records:
            assert check_record(record) == [], record
        kinds = [r["event"] for r in records]
        assert kinds[0] == "config" and kinds[-1] == "end" and "timeline" in kinds
        intervals = [r for r in records if r["event"] == "interval"]
        assert [r["step"] for r in intervals] == list(range(EVERY, STEPS + 1, EVERY))
        assert all(r["steps"] == EVERY and r["images_per_s"] > 0 for r in intervals)
        assert all(r["epoch"] == pytest.approx(r["step"] / records[0]["steps_per_epoch"],
                                               abs=1e-4) for r in intervals)
        epoch = next(r for r in records if r["event"] == "epoch")
        assert 0 < epoch["val_acc"] <= 1 and epoch["step"] == STEPS
        assert records[-1]["world_size"] == n
        # not a terminal: one status line per interval on stdout, no bar on stderr
        status = [line for line in run.stdout.splitlines() if " images/s ETA " in line]
        assert len(status) == len(intervals)
        assert status[-1].startswith(f"mpicnn: epoch 1/20 step {STEPS}/{STEPS} loss ")
        assert "step/s" not in run.stderr and "\r" not in run.stderr
    # the same global batches: the loss is the same whatever the number of ranks
    losses = [[r["loss"] for r in read_jsonl(runs[n][1]) if r["event"] == "interval"]
              for n in (1, 2)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.mpi
def test_trace_has_every_rank_and_phase(runs):
    for n, (_, jsonl, trace_path) in runs.items():
        trace = json.loads(trace_path.read_text())
        events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert {e["pid"] for e in events} == set(range(n))
        for rank in range(n):
            names = {e["name"] for e in events if e["pid"] == rank}
            assert set(PHASES) <= names, (rank, names)
            steps = {e["args"]["step"] for e in events if e["pid"] == rank}
            assert steps == set(range(*WINDOW))
        assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events)
        assert min(e["ts"] for e in events) == 0
        named = {e["pid"] for e in trace["traceEvents"] if e["name"] == "process_name"}
        assert named == set(range(n))
        summary = next(r for r in read_jsonl(jsonl) if r["event"] == "timeline")
        assert summary["events"] == len(events) and summary["dropped"] == 0
        assert len(summary["clock_offsets_ms"]) == n


SKEW_SCRIPT = """
import json, sys
from mpi4py import MPI
from mpicnn.observe import timeline
from mpicnn.cluster.world import init_world
world = init_world()
recorder = timeline.start(world, sys.argv[1], "0:1")
recorder.wall0 += 1000.0 * world.rank        # every rank's clock is off by 1000 s per rank
timeline.step(0)
world.comm.Barrier()
with timeline.span("after barrier"):
    world.comm.Barrier()
summary = timeline.finish(world, sys.argv[1])
print(json.dumps(summary) if summary else "")
"""


@pytest.mark.mpi
def test_clock_skew_between_ranks_is_removed(tmp_path):
    script, trace_path = tmp_path / "skew.py", tmp_path / "skew.json"
    script.write_text(SKEW_SCRIPT)
    run = mpirun(3, [trace_path], script=script, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    summary = json.loads(next(line for line in run.stdout.splitlines() if line.strip()))
    assert summary["clock_offsets_ms"] == pytest.approx([0, 1e6, 2e6], abs=500)
    starts = [e["ts"] for e in json.loads(trace_path.read_text())["traceEvents"]
              if e["name"] == "after barrier"]
    assert len(starts) == 3
    # uncorrected they would lie 1000 s apart; corrected, within the barrier's spread
    assert max(starts) - min(starts) < 0.5e6


@pytest.mark.mpi
def test_bad_timeline_steps_stop_every_rank_with_one_line(digits, tmp_path):
    run = mpirun(2, ["--data", digits, "--timeline", tmp_path / "t.json",
                     "--timeline-steps", "9:3"], check=False, timeout=120)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("mpicnn: error:")]
    assert len(errors) == 1 and "--timeline-steps '9:3'" in errors[0]


def with_ps_fields(source, target) -> None:
    """A copy of a real run with the fields the parameter-server modes add."""
    with open(target, "w") as out:
        for record in read_jsonl(source):
            if record["event"] == "config":
                record["mode"] = "ps-async"
            if record["event"] in ("epoch", "end"):
                record["staleness_hist"] = {"0": 40, "1": 25, "3": 2}
                record["updates_per_server"] = [34, 33]
            if record["event"] == "interval":
                record["ps_push_ms"], record["ps_pull_ms"] = 1.5, 0.7
            assert check_record(record) == []
            out.write(json.dumps(record) + "\n")


@pytest.mark.mpi
def test_report_png_has_the_expected_panels(runs, tmp_path):
    from mpicnn.observe import report

    two, one = runs[2][1], runs[1][1]
    png = tmp_path / "report.png"
    run = run_command([sys.executable, "-m", "mpicnn.report", str(two), str(one),
                       "-o", str(png), "--labels", "two ranks,one rank"], timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Loss, Validation accuracy, Training throughput" in run.stdout
    assert png_size(png) == (1200, 900)

    ps = tmp_path / "ps.jsonl"
    with_ps_fields(two, ps)
    titles = report.render([report.load_run(str(p)) for p in (two, one, ps)],
                           str(tmp_path / "ps.png"))
    assert titles == ["Loss", "Validation accuracy", "Training throughput",
                      "Where a training step's time goes",
                      "Gradient staleness (parameter server)", "Updates applied per server"]
    assert png_size(tmp_path / "ps.png") == (1800, 900)
    split = report.load_run(str(ps)).split_ms()
    assert split["ps_push"] == pytest.approx(1.5) and set(PHASES) <= set(split)


def test_report_rejects_what_is_not_a_metrics_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    run = run_command([sys.executable, "-m", "mpicnn.report", str(bad), "-o",
                       str(tmp_path / "x.png")], timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("mpicnn: error: ") and "bad.jsonl:1" in run.stderr
    run = run_command([sys.executable, "-m", "mpicnn.report", str(tmp_path / "none.jsonl")],
                      timeout=60)
    assert run.returncode == 2 and "cannot read metrics file" in run.stderr
