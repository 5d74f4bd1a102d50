"""Metrics records: the JSON-lines schema, its checker, and the writer.

The record schema (``SCHEMA``, version ``SCHEMA_VERSION``) is documented in the README
section "Metrics, timeline and reports"; ``check_record`` validates one record.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, suppress

import numpy as np

from ..resilience.write_failure import WriteFailed
from .steps import PHASES, WAIT_PHASES

SCHEMA_VERSION = 2

NUMBER, INT, TEXT = (int, float), int, str
_SPLIT = {f"{p}_ms": NUMBER for p in PHASES}
SCHEMA = {     # event -> required fields and their types (more fields may follow)
    "config": {"world_size": INT, "mode": TEXT, "batch_size": INT, "log_every": INT,
               "steps_per_epoch": INT},
    "interval": {"epoch": NUMBER, "step": INT, "steps": INT, "loss": NUMBER, "lr": NUMBER,
                 "images_per_s": NUMBER, **_SPLIT},
    "epoch": {"epoch": INT, "step": INT, "train_loss": NUMBER, "val_loss": NUMBER,
              "val_acc": NUMBER, "lr": NUMBER, "images_per_s": NUMBER, **_SPLIT},
    "end": {"val_acc": NUMBER, "val_loss": NUMBER, "train_loss": NUMBER,
            "images_per_s": NUMBER, "steps": INT, "epochs": INT, "world_size": INT,
            "mode": TEXT, "wall_s": NUMBER},
    "timeline": {"path": TEXT, "events": INT, "dropped": INT, "steps": list,
                 "clock_offsets_ms": list},
    # a stop signal ended the run early (mpicnn/resilience/preemption.py); "end" does not follow
    "stopped": {"signal": TEXT, "step": INT, "epoch": INT, "step_in_epoch": INT,
                "checkpoint": TEXT, "exit_code": INT},
    # the restart supervisor (mpicnn/resilience/supervisor.py) relaunches after a crash;
    # rank -1, node "" and signal 0 when the launcher's output did not tell
    "restart": {"restart": INT, "exit_code": INT, "cause": TEXT, "rank": INT, "node": TEXT,
                "signal": INT, "backoff_s": NUMBER},
}
OPTIONAL = {   # written when the run has them (parameter-server modes, PS waits)
    "staleness_hist": dict,        # {"staleness": updates}, keys are decimal strings
    "updates_per_server": list,    # updates applied by each server rank, in server order
    **{f"{p}_ms": NUMBER for p in WAIT_PHASES},
    "amp_scale": NUMBER,           # --amp fp16: the loss scale at the epoch's end
    "amp_overflows": INT,          # --amp fp16: steps skipped for an overflow, in all
}


def check_record(record: dict) -> list[str]:
    """What is wrong with one metrics record (empty when it follows ``SCHEMA``)."""
    event = record.get("event")
    if event not in SCHEMA:
        return [f"unknown event {event!r}"]
    problems = []
    if record.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema {record.get('schema')!r}, expected {SCHEMA_VERSION}")
    required = {"time": NUMBER, **SCHEMA[event]}
    for name, kind in required.items():
        if name not in record:
            problems.append(f"{event}: missing {name}")
        elif isinstance(record[name], bool) or not isinstance(record[name], kind):
            problems.append(f"{event}: {name}={record[name]!r} is not {kind}")
    for name, kind in OPTIONAL.items():
        if name in record and not isinstance(record[name], kind):
            problems.append(f"{event}: {name}={record[name]!r} is not {kind}")
    return problems


class MetricsWriter:
    """Appends one JSON object per line and hands each record to ``sinks`` (TensorBoard).

    With no ``path`` and no sinks it does nothing. A failed write raises ``WriteFailed``
    naming the file, the cause and ``last_checkpoint()``, the newest whole checkpoint.
    """

    def __init__(self, path: str = "", run_start: float | None = None, sinks=(),
                 last_checkpoint=lambda: None):
        self.fh, self.sinks, self.path = None, list(sinks), path
        self.start = run_start or time.time()
        self.last_checkpoint = last_checkpoint
        if path:
            with self._failing():
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                self.fh = open(path, "a", buffering=1)

    def write(self, event: str, **fields) -> None:
        if self.fh is None and not self.sinks:
            return
        # sinks see the record as the file holds it (numpy values made plain)
        record = json.loads(json.dumps(
            {"event": event, "schema": SCHEMA_VERSION,
             "time": round(time.time() - self.start, 3), **fields}, default=_plain))
        if self.fh is not None:
            with self._failing():
                self.fh.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink(record)

    @contextmanager
    def _failing(self):
        """Turn an ``OSError`` of the file into ``WriteFailed``, dropping the file."""
        try:
            yield
        except OSError as exc:
            if self.fh is not None:
                with suppress(OSError):      # its buffer cannot be written either
                    self.fh.close()
                self.fh = None
            raise WriteFailed("metrics file", self.path, exc, self.last_checkpoint()) from exc

    def close(self) -> None:
        if self.fh is not None:
            with self._failing():
                self.fh.close()
            self.fh = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _plain(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
