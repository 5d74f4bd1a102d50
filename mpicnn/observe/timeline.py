"""Where the time goes: spans charged to the phase split and recorded as a Chrome trace.

Any code calls ``with timeline.span("name", key=value):`` (or ``timeline.event``) without
plumbing; when no trace is being written and no phase timer is listening, a span costs
one attribute lookup. ``start()`` begins recording (``--timeline``), ``step()`` moves the
recording window (``--timeline-steps a:b``), and ``finish()`` gathers every rank's events
to rank 0, corrects the ranks' clock offsets and writes one Chrome-trace/Perfetto JSON
file: one process track per rank, one thread track per thread (main, communication...).

Spans on a thread where a :class:`~mpicnn.observe.steps.PhaseTimer` is listening are also
charged to it as exclusive time: a ``ps_push`` span inside the loop's ``comm`` phase is
counted as ``ps_push`` and taken out of ``comm``, so the split always adds up.
"""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from ..cluster.errors import MpicnnError

PINGS = 8                    # ping-pong rounds per rank; the fastest round wins
MAX_EVENTS = 200_000         # per rank, so a long window cannot exhaust memory
_local = threading.local()   # per thread: the listening phase timer and its open spans
_recorder = None             # the Recorder while --timeline is on, else None


class _Null:
    """The span handed out when nobody listens: does nothing, allocates nothing."""

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _Null()


class _Span:
    __slots__ = ("name", "args", "sink", "start", "child")

    def __init__(self, name, args, sink):
        self.name, self.args, self.sink = name, args, sink
        self.child = 0.0

    def __enter__(self):
        if self.sink is not None:
            _local.frames.append(self)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        end = time.perf_counter()
        if self.sink is not None:
            frames = _local.frames
            frames.pop()
            elapsed = end - self.start
            self.sink.add(self.name, elapsed - self.child)
            if frames:
                frames[-1].child += elapsed
        recorder = _recorder
        if recorder is not None and recorder.recording:
            recorder.complete(self.name, self.start, end, self.args)
        return False


def span(name: str, **args):
    """Time the ``with`` block as ``name`` (trace event, and phase time when listened to)."""
    sink = getattr(_local, "sink", None)
    if sink is not None and not sink.tracks(name):
        sink = None
    if sink is None and (_recorder is None or not _recorder.recording):
        return _NULL
    return _Span(name, args, sink)


def event(name: str, **args) -> None:
    """Mark an instant (e.g. a parameter version arriving) on this thread's track."""
    recorder = _recorder
    if recorder is not None and recorder.recording:
        recorder.instant(name, time.perf_counter(), args)


def listen(sink):
    """Charge spans on this thread to ``sink`` (or nobody, for None); returns the previous one."""
    previous = getattr(_local, "sink", None)
    _local.sink = sink
    if not hasattr(_local, "frames"):
        _local.frames = []
    return previous


def step(global_step: int) -> None:
    """Tell the recorder which optimizer step starts now (opens/closes the window)."""
    if _recorder is not None:
        _recorder.at_step(global_step)


def parse_steps(text: str, flag: str = "--timeline-steps") -> tuple[int, int]:
    """``"a:b"`` -> (a, b): record global steps a <= step < b (``flag`` names it in errors)."""
    try:
        first, last = (int(v) for v in text.split(":"))
    except ValueError:
        first = last = -1
    if not 0 <= first < last:
        raise MpicnnError(f"{flag} {text!r}: expected a:b with 0 <= a < b, "
                          f"e.g. 10:30 (steps a to b-1 are recorded)", collective=True)
    return first, last


class Recorder:
    """This rank's events, stamped on a clock shared by all its threads."""

    def __init__(self, rank: int, window: tuple[int, int], max_events: int = MAX_EVENTS):
        self.rank, self.window, self.max_events = rank, window, max_events
        self.perf0 = time.perf_counter()
        self.wall0 = time.time()           # the clock compared across ranks
        self.events: list = []
        self.dropped = 0
        self.threads: dict[int, str] = {}
        self.recording = False
        self.step = -1

    def now(self) -> float:
        """Seconds on this rank's wall clock, at perf_counter resolution."""
        return self.wall0 + (time.perf_counter() - self.perf0)

    def at_step(self, global_step: int) -> None:
        self.step = global_step
        self.recording = self.window[0] <= global_step < self.window[1]

    def _tid(self) -> int:
        thread = threading.current_thread()
        ident = thread.ident
        if ident not in self.threads:
            self.threads[ident] = "main" if thread is threading.main_thread() else thread.name
        return ident

    def _add(self, record: dict) -> None:
        if len(self.events) >= self.max_events:
            self.dropped += 1
            return
        self.events.append(record)

    def complete(self, name: str, start: float, end: float, args: dict) -> None:
        self._add({"name": name, "ph": "X", "ts": self._us(start), "dur": (end - start) * 1e6,
                   "tid": self._tid(), "args": {"step": self.step, **args}})

    def instant(self, name: str, at: float, args: dict) -> None:
        self._add({"name": name, "ph": "i", "s": "t", "ts": self._us(at), "tid": self._tid(),
                   "args": {"step": self.step, **args}})

    def _us(self, perf: float) -> float:
        """Microseconds since this recorder started (``wall0`` on this rank's clock)."""
        return (perf - self.perf0) * 1e6


def start(world, path: str, steps: str) -> Recorder | None:
    """Begin recording when ``path`` is set (collective: every rank calls it)."""
    global _recorder
    window = parse_steps(steps)
    if not path:
        return None
    _recorder = Recorder(world.rank, window)
    return _recorder


def best_offset(samples) -> tuple[float, float]:
    """(offset, round trip) from ping-pongs ``(t0, t_peer, t1)``: peer clock minus ours.

    The round with the shortest round trip bounds the error best (Cristian's method):
    the peer read its clock somewhere in [t0, t1], so the error is at most half of it.
    """
    t0, peer, t1 = min(samples, key=lambda s: s[2] - s[0])
    return peer - (t0 + t1) / 2, t1 - t0


def estimate_offsets(comm, clock, rounds: int = PINGS) -> np.ndarray:
    """On rank 0: each rank's clock offset to rank 0 in seconds (elsewhere: zeros)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    offsets = np.zeros(size)
    buf = np.zeros(1)
    for peer in range(1, size):
        samples = []
        for _ in range(rounds):
            if rank == 0:
                t0 = clock()
                comm.Send(buf, dest=peer)
                comm.Recv(buf, source=peer)
                samples.append((t0, float(buf[0]), clock()))
            elif rank == peer:
                comm.Recv(buf, source=0)
                buf[0] = clock()
                comm.Send(buf, dest=0)
        if rank == 0:
            offsets[peer] = best_offset(samples)[0]
    return offsets


def _gather_bytes(comm, payload: bytes) -> list[bytes] | None:
    """Every rank's bytes on rank 0 (buffer-based Gatherv; None on other ranks)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = np.frombuffer(payload, dtype=np.uint8)
    counts = np.zeros(size, dtype=np.int64)
    comm.Gather(np.array([mine.size], dtype=np.int64), counts, root=0)
    if rank != 0:
        comm.Gatherv(mine, None, root=0)
        return None
    received = np.empty(int(counts.sum()), dtype=np.uint8)
    comm.Gatherv(mine, (received, counts), root=0)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [received[bounds[i]:bounds[i + 1]].tobytes() for i in range(size)]


def merge(per_rank: list[dict], offsets_s) -> list[dict]:
    """One Chrome-trace event list: clocks corrected to rank 0's, time 0 at the first event."""
    events, origin = [], None
    for part, offset in zip(per_rank, offsets_s):
        shift = (part["wall0"] - offset - per_rank[0]["wall0"]) * 1e6
        for e in part["events"]:
            e["ts"] += shift
            origin = e["ts"] if origin is None else min(origin, e["ts"])
    for rank, part in enumerate(per_rank):
        events.append({"name": "process_name", "ph": "M", "pid": rank,
                       "args": {"name": f"rank {rank} ({part['host']})"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank,
                       "args": {"sort_index": rank}})
        tids = {}
        for ident, name in part["threads"].items():
            tids[int(ident)] = len(tids)
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tids[int(ident)],
                           "args": {"name": name}})
        for e in part["events"]:
            e["ts"] = round(e["ts"] - origin, 3)
            if "dur" in e:
                e["dur"] = round(e["dur"], 3)
            e["pid"], e["tid"] = rank, tids[e["tid"]]
            events.append(e)
    return events


def finish(world, path: str) -> dict | None:
    """Gather all ranks' events to rank 0 and write ``path`` (collective); returns a summary."""
    global _recorder
    recorder, _recorder = _recorder, None
    if recorder is None:
        return None
    comm = world.comm.Dup()        # private: no stray message can match ours
    try:
        offsets = estimate_offsets(comm, recorder.now)
        mine = {"host": world.hostname, "wall0": recorder.wall0, "threads": recorder.threads,
                "events": recorder.events, "dropped": recorder.dropped}
        parts = _gather_bytes(comm, json.dumps(mine).encode())
    finally:
        comm.Free()
    if parts is None:
        return None
    per_rank = [json.loads(p) for p in parts]
    events = merge(per_rank, offsets)
    summary = {"path": path, "events": sum(len(p["events"]) for p in per_rank),
               "dropped": sum(p["dropped"] for p in per_rank), "steps": list(recorder.window),
               "clock_offsets_ms": [round(o * 1e3, 3) for o in offsets]}
    trace = {"traceEvents": events, "displayTimeUnit": "ms", "otherData": summary}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(trace, fh)
    os.replace(tmp, path)
    return summary
