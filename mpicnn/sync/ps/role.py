"""What workers and servers share: the role layout, communicators, ranges and run statistics."""
from __future__ import annotations

from collections import Counter

import numpy as np

from ...cluster.errors import MpicnnError
from ...training.optim import LAYERWISE
from ..contract import Strategy
from ..replicas import broadcast_module
from .layout import Roles, partition, partition_tensors
from .policy import staleness_bound


class PSRole(Strategy):
    """One rank of a parameter-server job; :class:`PSWorker` and :class:`PSServer` specialise it."""

    def __init__(self, world, cfg, roles: Roles, train_comm, ps_comm):
        super().__init__(world, cfg)
        self.name = cfg.sync.mode
        self.roles, self.train_comm, self.ps_comm = roles, train_comm, ps_comm
        self.sync = cfg.sync.mode == "ps-sync"
        self.bound = 0 if self.sync else staleness_bound(cfg.sync.staleness)
        # Unbounded async hands batches out on demand so fast workers take more of them;
        # under a bound the slowest worker sets the pace anyway, so shards stay fixed.
        self.dispatched = self.bound is None
        self.params, self.ranges, self.stats = [], [], Counter()
        self.staleness, self._report, self.attached = Counter(), {}, False

    @property
    def lockstep(self) -> bool:
        return self.sync           # async workers run different steps at different times

    @property
    def comm(self):
        return self.train_comm

    @property
    def workers(self) -> int:
        return self.roles.workers

    @property
    def worker_index(self) -> int:
        return self.world.rank          # workers are ranks 0 .. workers-1

    def attach(self, model, optimizer, scheduler) -> None:
        super().attach(model, optimizer, scheduler)
        broadcast_module(self.world.comm, model)     # every rank starts from rank 0's weights
        self.params = [p for p in model.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise MpicnnError(f"--mode {self.cfg.sync.mode} needs all trainable parameters in one "
                              f"dtype, the model has {sorted(map(str, dtypes))}",
                              collective=True)
        sizes = [p.numel() for p in self.params]
        if self.cfg.training.optimizer in LAYERWISE:     # norms of whole tensors
            self.ranges = partition_tensors(sizes, self.roles.servers)
        else:
            self.ranges = partition(sum(sizes), self.roles.servers,
                                    self.params[0].element_size())
        self.attached = True

    def finish(self) -> None:
        """Gather every rank's counters to rank 0 for the end record, then free communicators."""
        rows = self.world.comm.gather((self.roles.is_server(self.world.rank), dict(self.stats),
                                       dict(self.staleness)), root=0)
        if rows is not None:
            self._report = summarize(rows, self.roles, final=True)
        for comm in (self.ps_comm, self.train_comm):
            comm.Free()

    def report(self) -> dict:
        """The latest PS counters: as of the last epoch's end, or of the whole run."""
        return self._report


COUNTERS = ("updates", "deferred", "max_lead")


def encode_stats(stats: dict, staleness: dict, workers: int) -> np.ndarray:
    """A server's counters as one int64 vector: counters, pushes per worker, histogram."""
    hist = np.zeros(max(staleness, default=-1) + 1, dtype=np.int64)
    for value, count in staleness.items():
        hist[value] = count
    return np.concatenate([[stats.get(k, 0) for k in COUNTERS],
                           stats.get("pushes", [0] * workers), hist]).astype(np.int64)


def decode_stats(vector: np.ndarray, workers: int) -> tuple[dict, dict]:
    """Inverse of :func:`encode_stats`: (counters, staleness histogram)."""
    stats = dict(zip(COUNTERS, map(int, vector[:len(COUNTERS)])))
    stats["pushes"] = [int(v) for v in vector[len(COUNTERS): len(COUNTERS) + workers]]
    hist = vector[len(COUNTERS) + workers:]
    return stats, {value: int(count) for value, count in enumerate(hist) if count}


def summarize(rows, roles: Roles, final: bool) -> dict:
    """Metrics fields from (is_server, counters, staleness histogram) of ranks.

    ``final``: all ranks' rows at the end of the run, which adds ``ps_unreceived``.
    """
    staleness = Counter()
    for _, _, hist in rows:
        staleness.update(hist)
    total = sum(staleness.values())
    fields = {
        "ps_workers": roles.workers, "ps_servers": roles.servers,
        "updates_per_server": [stats.get("updates", 0) for server, stats, _ in rows if server],
        "staleness_hist": {str(k): staleness[k] for k in sorted(staleness)},
        "ps_staleness_mean": sum(k * v for k, v in staleness.items()) / total if total else 0.0,
        "ps_staleness_max": max(staleness, default=0),
        "ps_pushes": next(stats.get("pushes") for server, stats, _ in rows if server),
        "ps_deferred": sum(stats.get("deferred", 0) for _, stats, _ in rows),
        "ps_max_lead": max(stats.get("max_lead", 0) for _, stats, _ in rows),
    }
    if final:
        fields["ps_unreceived"] = sum(stats.get("unreceived", 0) for _, stats, _ in rows)
    return fields
