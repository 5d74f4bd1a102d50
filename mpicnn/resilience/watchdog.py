"""Stall and partition detection: rank 0 names the ranks that keep the others waiting.

Every rank's main thread marks when it starts waiting at an exchange and when it goes
on computing. A daemon thread on each rank sends that status to rank 0 every few
seconds on its own ``Dup()``'d communicator, so heartbeats never match the training
collectives and keep flowing while the main thread is blocked (or asleep). Rank 0's
thread compares the statuses: when ranks have waited at one exchange for
``--stall-warn`` seconds it logs which ranks are missing and where they are; after
``--stall-abort`` seconds it ends the job. Ranks only send their own elapsed times,
so clocks need not agree.

A network partition shows as silence rather than as a wait: rank 0 answers each
heartbeat, and when a rank's heartbeats have been missing for ``--unreachable-abort``
seconds, rank 0 names it and its node and aborts the job. A rank cut off from rank 0
cannot be ended through the launcher (its node is unreachable), so when it has heard
no answer for 1.5 times as long it ends itself: no process spins on after the job.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..cluster.errors import print_error
from ..cluster.world import spans

COMPUTE, WAIT, SERVE, DONE, PEER = range(5)   # what a rank's main thread is doing
# PEER: within a step, waiting for a neighbouring rank's message (a pipeline stage's
# activations or their gradients); WAIT: at the step's gradient exchange
TAG = 17
ANSWER_TAG = 18                           # rank 0's answer to a heartbeat
STALL_EXIT = 3
MAX_LISTED = 8                            # missing ranks described one by one
CUT_OFF_FACTOR = 1.5                      # a cut-off rank waits longer than rank 0's verdict
FAREWELL = 1                              # rank 0's last answer to a rank (others are 0)
FAREWELL_WAIT = 10.0                      # seconds a finished rank waits for it


@dataclass
class Seen:
    """One rank's status as rank 0 knows it (rank 0's monotonic clock)."""

    state: int = COMPUTE
    step: int = 1
    since: float = 0.0                    # when it entered ``state``
    heard: float = 0.0                    # when its last heartbeat arrived


def _describe(seen: Seen, now: float) -> str:
    if seen.state == COMPUTE:
        return f"computing step {seen.step} for {now - seen.since:.0f} s"
    if seen.state == WAIT:
        return f"waiting at step {seen.step}"
    if seen.state == PEER:
        return f"waiting for a neighbouring stage at step {seen.step}"
    return "finished" if seen.state == DONE else "serving"


def diagnose(seen: list[Seen], now: float, silent_after: float, labels=None):
    """(seconds waited, key, text) for the longest wait at one exchange, or None.

    ``labels`` (one per rank, e.g. its pipeline stage) are named beside the ranks.
    """
    waiting = [r for r, s in enumerate(seen) if s.state in (WAIT, PEER, DONE)]
    if not waiting:
        return None
    first = min(waiting, key=lambda r: seen[r].since)
    point = (seen[first].state, seen[first].step)
    waited = now - seen[first].since
    there = [r for r in waiting if (seen[r].state, seen[r].step) == point]
    missing = [r for r, s in enumerate(seen) if r not in there and s.state != SERVE]
    where = {WAIT: f"the gradient exchange of step {point[1]}",
             PEER: f"the pipeline exchange of step {point[1]} (a neighbouring stage's "
                   f"activations or gradients)"}.get(point[0], "the end of the run")
    if not missing:
        return waited, point, (f"all ranks have waited {waited:.0f} s at {where} and none "
                               f"is missing (a server or the network may be stuck)")
    notes = []
    for r in missing[:MAX_LISTED]:
        quiet = now - seen[r].heard
        note = (f"{labels[r]}; " if labels else "") + _describe(seen[r], now)
        notes.append(f"rank {r} ({note})" if quiet < silent_after else
                     f"rank {r} (silent for {quiet:.0f} s; last {note})")
    if len(missing) > MAX_LISTED:
        notes.append(f"ranks {spans(missing[MAX_LISTED:])}")
    who = f"rank {spans(there)} has" if len(there) == 1 else f"ranks {spans(there)} have"
    if labels and len(there) == 1:
        who = f"rank {there[0]} ({labels[there[0]]}) has"
    return waited, point, (f"{who} waited {waited:.0f} s at {where}; missing: "
                           f"{', '.join(notes)}")


def heartbeat_interval(*limits: float) -> float:
    """Seconds between heartbeats: a quarter of the shortest threshold, within [0.05, 5]."""
    shortest = min(t for t in limits if t > 0)
    return min(5.0, max(0.05, shortest / 4))


def silent_ranks(seen: list[Seen], finished, now: float, limit: float) -> list[int]:
    """Ranks (not rank 0, not finished) whose last heartbeat is ``limit`` seconds old."""
    return [r for r in range(1, len(seen))
            if r not in finished and now - seen[r].heard >= limit]


def describe_silent(ranks: list[int], hosts: list[str]) -> str:
    """``ranks 2-3 (node b, all its ranks)``; ranks grouped by node in rank order."""
    by_host = {}
    for r in ranks:
        by_host.setdefault(hosts[r], []).append(r)
    parts = []
    for host, group in by_host.items():
        whole = len(group) == hosts.count(host) and len(group) > 1
        who = f"rank {group[0]}" if len(group) == 1 else f"ranks {spans(group)}"
        parts.append(f"{who} (node {host}{', all its ranks' if whole else ''})")
    return ", ".join(parts)


class Watchdog:
    """Heartbeats to rank 0 and stall reports; created on every rank (it ``Dup()``s)."""

    def __init__(self, world, warn: float, abort: float = 0.0, unreachable: float = 0.0):
        from mpi4py import MPI

        self.world, self.warn, self.abort_after = world, warn, abort
        self.unreachable = unreachable
        self.interval = heartbeat_interval(warn, abort, unreachable)
        self.comm = world.comm.Dup()
        self.hosts = self.comm.allgather(world.hostname)
        self.status = (COMPUTE, 1, time.monotonic())   # replaced whole: atomic for the thread
        self.stop = threading.Event()
        self.abandon = False
        self.reported = None
        self.labels = None             # what each rank is (pipeline stages), for reports
        self.threaded = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        if not self.threaded:
            world.log.warning("stall detection is off: this MPI library does not offer "
                              "MPI_THREAD_MULTIPLE")
            return
        target = self._watch if world.is_root else self._beat
        self.thread = threading.Thread(target=target, name="mpicnn-watchdog", daemon=True)
        self.thread.start()

    def mark(self, state: int, step: int) -> None:
        """Record what this rank's main thread is doing from now on."""
        self.status = (state, step, time.monotonic())

    def close(self, orderly: bool) -> None:
        """Stop the thread; ``orderly`` (every rank closes) waits for all final statuses.

        After a failure on some ranks only, nothing waits: the job is about to abort.
        """
        if not self.threaded:
            return
        self.mark(DONE, self.status[1])
        self.abandon = not orderly
        self.stop.set()
        if orderly:
            self.thread.join()

    def _own(self) -> np.ndarray:
        state, step, since = self.status
        return np.array([state, step, int(1000 * (time.monotonic() - since))], np.int64)

    def _beat(self) -> None:
        """Non-root ranks: send this rank's status to rank 0 every interval.

        Also take rank 0's answers; with none for ``CUT_OFF_FACTOR`` times
        ``--unreachable-abort`` this rank is cut off from rank 0, and ends itself.
        """
        request, answered, answer = None, time.monotonic(), np.empty(1, np.int64)
        while True:
            stopping = self.stop.wait(self.interval)
            if self.abandon:
                return
            while (message := self.comm.Improbe(0, ANSWER_TAG)) is not None:
                message.Recv(answer)
                answered = time.monotonic()
            quiet = time.monotonic() - answered
            if not stopping and self.unreachable and quiet >= CUT_OFF_FACTOR * self.unreachable:
                self._cut_off(quiet)
            if request is not None and not stopping and not request.Test():
                continue                  # rank 0 is behind; skip a beat rather than queue
            if request is not None:
                request.Wait()
            buf = self._own()
            request = self.comm.Isend(buf, dest=0, tag=TAG)
            if stopping:
                request.Wait()
                self._take_farewell(answer)
                return

    def _take_farewell(self, answer: np.ndarray) -> None:
        """Receive rank 0's answers up to its farewell to our DONE status.

        An answer left unreceived at MPI_Finalize makes UCX print "unexpected tag-receive
        descriptor ... was not matched" on this rank's node. Rank 0 answers DONE with
        ``FAREWELL`` (after any earlier answer, same tag: they arrive in order); if it
        never comes (rank 0 is gone), give up after ``FAREWELL_WAIT`` seconds.
        """
        deadline = time.monotonic() + FAREWELL_WAIT
        while time.monotonic() < deadline and not self.abandon:
            message = self.comm.Improbe(0, ANSWER_TAG)
            if message is None:
                time.sleep(0.001)
                continue
            message.Recv(answer)
            if answer[0] == FAREWELL:
                return

    def _cut_off(self, quiet: float) -> None:
        """End this rank: rank 0 is unreachable, so no abort could reach us through it."""
        world = self.world
        print_error(f"unreachable: rank {world.rank} (node {world.hostname}) has heard "
                    f"nothing from rank 0 (node {self.hosts[0]}) for {quiet:.0f} s: "
                    f"the network between them is down; ending this rank (the last "
                    f"checkpoint is kept: continue with --resume auto)")
        os._exit(STALL_EXIT)

    def _watch(self) -> None:
        """Rank 0: collect statuses, warn about stalls, abort after ``--stall-abort``."""
        from mpi4py import MPI

        start = time.monotonic()
        seen = [Seen(since=start, heard=start) for _ in range(self.world.size)]
        finished, buf, probe = set(), np.empty(3, np.int64), MPI.Status()
        answers, token = {}, np.zeros(1, np.int64)      # rank -> its answer still in flight
        farewells, farewell = [], np.full(1, FAREWELL, np.int64)
        while not self.abandon:
            if self.stop.is_set():
                time.sleep(min(self.interval, 0.05))
            else:
                self.stop.wait(self.interval)
            now = time.monotonic()
            while (message := self.comm.Improbe(MPI.ANY_SOURCE, TAG, probe)) is not None:
                source = probe.Get_source()
                message.Recv(buf)       # matched probes: see PSServer.serve
                seen[source] = Seen(int(buf[0]), int(buf[1]), now - buf[2] / 1000, now)
                if buf[0] == DONE:
                    finished.add(source)
                    farewells.append(self.comm.Isend(farewell, dest=source, tag=ANSWER_TAG))
                elif source not in answers or answers[source].Test():
                    answers[source] = self.comm.Isend(token, dest=source, tag=ANSWER_TAG)
            state, step, since = self.status
            seen[0] = Seen(state, step, since, now)
            self._check(seen, finished, now)
            if self.stop.is_set() and len(finished) == self.world.size - 1:
                MPI.Request.Waitall(list(answers.values()) + farewells)
                return

    def _check(self, seen: list[Seen], finished, now: float) -> None:
        if self.unreachable:
            silent = silent_ranks(seen, finished, now, self.unreachable)
            if silent:
                print_error(f"unreachable: no heartbeat for {self.unreachable:g} s from "
                            f"{describe_silent(silent, self.hosts)}: its node is down or cut "
                            f"off from rank 0's ({self.hosts[0]}); aborting after "
                            f"--unreachable-abort {self.unreachable:g} s (the last checkpoint "
                            f"is kept: continue with --resume auto)")
                self.world.abort(STALL_EXIT)
                return
        found = diagnose(seen, now, silent_after=max(3 * self.interval, 2.0),
                         labels=self.labels)
        if found is None:
            self.reported = None
            return
        waited, point, text = found
        if self.abort_after and waited >= self.abort_after:
            print_error(f"stall: {text}; aborting after --stall-abort {self.abort_after:g} s "
                        f"(check the missing ranks' nodes)")
            self.world.abort(STALL_EXIT)
        elif self.warn and waited >= self.warn:
            level = (point, int(waited // self.warn))
            if level != self.reported:
                self.world.log.warning(f"stall: {text}")
                self.reported = level
