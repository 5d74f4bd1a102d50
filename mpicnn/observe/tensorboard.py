"""``--tensorboard DIR``: rank 0 writes the metrics records' numbers as TensorBoard scalars.

Each ``interval`` and ``epoch`` record becomes scalars ``<event>/<field>`` at its global
step (loss, accuracy, lr, images/s, the time split, PS counters), with the staleness
histogram as its mean and maximum, so TensorBoard shows what the JSON lines hold.
"""
from __future__ import annotations

from ..cluster.errors import MpicnnError

EVENTS = ("interval", "epoch")       # records that carry a global step
SKIPPED = ("step", "time", "schema")


def scalars(record: dict) -> dict:
    """The scalars of one metrics record, ``{tag: value}``; empty for other events."""
    event = record.get("event")
    if event not in EVENTS:
        return {}
    out = {}
    for name, value in record.items():
        if name in SKIPPED or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{event}/{name}"] = value
        elif name == "staleness_hist" and value:
            counts = {int(k): v for k, v in value.items()}
            total = sum(counts.values())
            out[f"{event}/staleness_mean"] = sum(k * v for k, v in counts.items()) / total
            out[f"{event}/staleness_max"] = max(counts)
    return out


class TensorBoardSink:
    """Receives every metrics record and writes its scalars to an event file in ``logdir``."""

    def __init__(self, logdir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MpicnnError("--tensorboard needs the tensorboard package: pip install "
                              "tensorboard (or the 'tensorboard' extra)") from None
        self.writer = SummaryWriter(log_dir=logdir)

    def __call__(self, record: dict) -> None:
        step = record.get("step")
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()
