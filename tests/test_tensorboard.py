"""``--tensorboard DIR``: rank 0's event file holds the numbers of the metrics records."""
import pytest
from conftest import mpirun, read_jsonl

from mpicnn.observe.tensorboard import TensorBoardSink, scalars

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install "
                                          "tensorboard, or the 'test' extra)")


def read_events(logdir) -> dict:
    """{tag: [(step, value)]} of every event file under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_scalars_of_a_record_and_the_staleness_histogram():
    record = {"event": "epoch", "schema": 2, "time": 1.5, "epoch": 1, "step": 44,
              "val_acc": 0.9, "lr": 0.01, "forward_ms": 3.0, "mode": "ps-sync",
              "staleness_hist": {"0": 6, "2": 2}, "updates_per_server": [44], "flag": True}
    assert scalars(record) == {"epoch/epoch": 1, "epoch/val_acc": 0.9, "epoch/lr": 0.01,
                               "epoch/forward_ms": 3.0, "epoch/staleness_mean": 0.5,
                               "epoch/staleness_max": 2}
    assert scalars({"event": "config", "lr": 0.1}) == {}


def test_sink_writes_an_event_file_read_back_by_tensorboard(tmp_path):
    sink = TensorBoardSink(str(tmp_path))
    for step in (10, 20):
        sink({"event": "interval", "step": step, "loss": 1.0 / step, "lr": 0.5})
    sink.close()
    events = read_events(tmp_path)
    assert events["interval/loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))]
    assert events["interval/lr"] == [(10, 0.5), (20, 0.5)]


@pytest.mark.mpi
def test_a_run_writes_the_metrics_records_as_scalars_from_rank_0(tmp_path):
    # ps-sync at 3 ranks: two workers (only rank 0 writes) and staleness in the records
    mpirun(3, ["--mode", "ps-sync", "--epochs", "2", "--max-steps", "60", "--log-every", "10",
               "--metrics", tmp_path / "m.jsonl", "--tensorboard", tmp_path / "tb",
               "--progress", "off"])
    files = list((tmp_path / "tb").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents")
    events = read_events(tmp_path / "tb")
    records = [r for r in read_jsonl(tmp_path / "m.jsonl") if r["event"] in ("interval",
                                                                               "epoch")]
    assert {r["event"] for r in records} == {"interval", "epoch"}
    for record in records:
        for tag, value in scalars(record).items():
            assert (record["step"], pytest.approx(value, rel=1e-6)) in events[tag], tag
    epoch_tags = {t for t in events if t.startswith("epoch/")}
    assert {"epoch/val_acc", "epoch/train_loss", "epoch/lr", "epoch/images_per_s",
            "epoch/forward_ms", "epoch/comm_ms", "epoch/staleness_mean"} <= epoch_tags
    assert [s for s, _ in events["epoch/val_acc"]] == [r["step"] for r in records
                                                       if r["event"] == "epoch"]
