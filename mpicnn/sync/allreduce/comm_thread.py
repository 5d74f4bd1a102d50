"""Where bucket reductions run: one communication thread, or inline after backward."""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager


class BusyTime:
    """Wall and CPU seconds spent in timed blocks (CPU: of the thread that ran each one).

    CPU close to wall means MPI polled while it waited; far below, it slept or yielded.
    """

    def __init__(self):
        self.wall = self.cpu = 0.0

    @contextmanager
    def timing(self):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.thread_time() - cpu


class CommThread:
    """Runs submitted jobs one at a time, in submission order, on a background thread.

    One thread keeps every rank's collectives in the same order (the order of
    submission) and lets MPI progress while the main thread computes. The
    handoff is two ``SimpleQueue``s: waiting blocks in C with the GIL released,
    so a waiting thread costs no CPU on a machine with no core to spare.
    """

    overlaps = True

    def __init__(self, name: str = "mpicnn-comm"):
        self._jobs, self._done = queue.SimpleQueue(), queue.SimpleQueue()
        self._outstanding = 0
        self.busy = BusyTime()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job) -> None:
        """Queue ``job()``; it starts as soon as the jobs before it are done."""
        self._outstanding += 1
        self._jobs.put(job)

    def wait(self) -> list:
        """Results of every job submitted since the last wait, in order; re-raise a failure."""
        results = [self._done.get() for _ in range(self._outstanding)]
        self._outstanding = 0
        return _unwrap(results)

    @property
    def idle(self) -> bool:
        return self._outstanding == 0

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self.busy.timing():
                try:
                    result = job()
                except BaseException as exc:   # noqa: B902 - handed to the waiting thread
                    result = _Failure(exc)
            self._done.put(result)


class InlineRunner:
    """The same interface without a thread: jobs run, in order, when ``wait()`` is called.

    This is the path for an MPI without ``MPI_THREAD_MULTIPLE``: the calling
    (main) thread makes every MPI call, after backward, with nothing overlapped.
    """

    overlaps = False

    def __init__(self):
        self._jobs = []
        self.busy = BusyTime()

    def submit(self, job) -> None:
        self._jobs.append(job)

    def wait(self) -> list:
        jobs, self._jobs = self._jobs, []
        with self.busy.timing():
            return [job() for job in jobs]

    @property
    def idle(self) -> bool:
        return not self._jobs

    def close(self) -> None:
        self._jobs = []


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _unwrap(results: list) -> list:
    for result in results:
        if isinstance(result, _Failure):
            raise result.exc
    return results


def make_runner(thread_level: int, thread_multiple: int):
    """A communication thread when MPI allows calls from any thread, else the inline path."""
    return CommThread() if thread_level >= thread_multiple else InlineRunner()
