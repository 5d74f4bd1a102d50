"""Read batches ahead of the training loop: inline, in a thread, or in a reader process.

A source maps a list of row arrays to ``finish(images, rows)``, in order; ``finish``
runs where the reading runs (inline, on the reader thread) or, for the process, in
the consumer. ``thread`` overlaps
reading with compute because h5py releases the GIL inside ``H5Dread`` (all h5py calls
still share one lock, so only the reader thread may use the file meanwhile).
``process`` runs the reader in a child process that writes into shared-memory slots;
the child imports no torch and exits when its parent goes away.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from ..cluster.batchjob import STOP_SIGNALS
from ..cluster.errors import MpicnnError
from .reader import ReaderSpec

MODES = ("thread", "process")
POLL_S = 1.0
SHM_DIR = "/dev/shm"


def keep(images, rows):
    return images


class InlineSource:
    """Read each batch when it is asked for."""

    def __init__(self, read):
        self.read = read

    def map(self, rows_list, finish=keep):
        for rows in rows_list:
            yield finish(self.read(rows), rows)

    def close(self) -> None:
        pass


class ThreadSource:
    """A reader thread keeps up to ``depth`` finished batches queued."""

    def __init__(self, read, depth: int):
        self.read, self.depth = read, depth
        self.active = None

    def map(self, rows_list, finish=keep):
        self.close()
        self.active = self._map(rows_list, finish)
        return self.active

    def _map(self, rows_list, finish):
        ready: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def work():
            try:
                for rows in rows_list:
                    if not put(("batch", finish(self.read(rows), rows))):
                        return
                put(("end", None))
            except BaseException as exc:      # noqa: B902 - re-raised in the consumer
                put(("error", exc))

        thread = threading.Thread(target=work, name="mpicnn-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = ready.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        if self.active is not None:
            self.active.close()
            self.active = None


class ProcessSource:
    """A child process reads batches into ``depth`` + 1 shared-memory slots."""

    def __init__(self, spec: ReaderSpec, depth: int, slot_rows: int, sample_shape: tuple,
                 dtype):
        self.slots = depth + 1
        self.shape = (self.slots, slot_rows) + tuple(sample_shape)
        shm_dir = SHM_DIR if os.path.isdir(SHM_DIR) else None
        fd, self.buffer_path = tempfile.mkstemp(prefix="mpicnn-prefetch-", dir=shm_dir)
        os.close(fd)
        self.buffer = np.memmap(self.buffer_path, dtype=dtype, mode="w+", shape=self.shape)
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "mpicnn.data.prefetch",
                                      str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                     env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send((spec, self.buffer_path, self.shape, np.dtype(dtype).str))
        self._expect("ready")
        os.unlink(self.buffer_path)          # both sides have it mapped; nothing to leak
        self.jobs = 0
        self.active = None

    def _recv(self):
        while not self.conn.poll(POLL_S):
            if self.proc.poll() is not None:
                break
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise MpicnnError(f"the prefetch reader process ended unexpectedly (exit code "
                              f"{self.proc.poll()}); rerun with --prefetch-mode thread"
                              ) from None

    def _expect(self, kind: str):
        msg = self._recv()
        if msg[0] == "error":
            raise MpicnnError(f"prefetch reader: {msg[1]}")
        if msg[0] != kind:
            raise RuntimeError(f"prefetch protocol: expected {kind}, got {msg[0]}")
        return msg

    def map(self, rows_list, finish=keep):
        self.close_job()
        self.active = self._map(list(rows_list), finish)
        return self.active

    def _map(self, rows_list, finish):
        self.jobs += 1
        job, done, msg_index = self.jobs, False, 0
        self.conn.send(("job", job, rows_list))
        try:
            while True:
                msg = self._recv()
                if msg[0] == "error":
                    done = True
                    raise MpicnnError(f"prefetch reader: {msg[1]}")
                if msg[1] != job:                 # left over from a cancelled job
                    if msg[0] == "batch":
                        self.conn.send(("free", msg[2]))
                    continue
                if msg[0] == "done":
                    done = True
                    return
                _, _, slot, n = msg
                images = np.array(self.buffer[slot, :n])
                self.conn.send(("free", slot))
                yield finish(images, rows_list[msg_index])
                msg_index += 1
        finally:
            if not done and self.proc.poll() is None:
                self.conn.send(("cancel", job))
                while True:          # return every slot still in flight, up to "done"
                    msg = self._recv()
                    if msg[0] == "batch":
                        self.conn.send(("free", msg[2]))
                    elif msg[0] == "error" or msg[1] == job:
                        break

    def close_job(self) -> None:
        if self.active is not None:
            self.active.close()
            self.active = None

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.close_job()
            self.conn.send(("stop",))
            self.proc.wait(timeout=10)
        except (OSError, MpicnnError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
        self.proc = None


def serve(conn: Connection) -> None:
    """The reader process: read the parent's jobs into free slots until told to stop."""
    spec, path, shape, dtype = conn.recv()
    try:
        reader = spec.open()
        buffer = np.memmap(path, dtype=np.dtype(dtype), mode="r+", shape=tuple(shape))
    except Exception as exc:               # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    free, jobs = list(range(shape[0])), []        # jobs: [id, rows_list, next step]
    while True:
        while conn.poll(0) or not (jobs and free):
            msg = conn.recv()                 # EOFError when the parent is gone
            if msg[0] == "stop":
                return
            if msg[0] == "job":
                jobs.append([msg[1], msg[2], 0])
            elif msg[0] == "free":
                free.append(msg[1])
            elif msg[0] == "cancel":
                jobs = [j for j in jobs if j[0] != msg[1]]
                conn.send(("done", msg[1]))
        job = jobs[0]
        if job[2] < len(job[1]):
            rows, slot = job[1][job[2]], free.pop()
            try:
                reader.read(rows, out=buffer[slot])
            except Exception as exc:           # noqa: BLE001 - reported to the parent
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                jobs.pop(0)
                continue
            job[2] += 1
            conn.send(("batch", job[0], slot, len(rows)))
        if job[2] == len(job[1]):
            jobs.pop(0)
            conn.send(("done", job[0]))


def main(argv) -> int:
    # SLURM and PBS signal every process of a job: stop signals are for the trainer
    # (mpicnn/resilience/preemption.py), which checkpoints and then stops this reader itself.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    conn = Connection(int(argv[0]))
    try:
        serve(conn)
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        pass                                  # the parent went away: nothing left to do
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
