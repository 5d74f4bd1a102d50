"""Writing checkpoints in the background: a host copy at the step boundary, then one write.

Every checkpoint holds CPU tensors, whatever the device, so it loads on any machine
(``torch.load(path, weights_only=True)`` without ``map_location``).

``--checkpoint-async``: rank 0 copies the training state to host memory where the loop
stands (the only time training waits for a checkpoint), then a thread writes the copy
atomically (temporary file, fsync, rename; checksum included) while training goes on.
GPU tensors are copied into pinned memory without waiting; the thread waits for the
copies (one CUDA event) before it writes, so training waits only to queue them. At most
one write is in flight: a new one first waits for the previous. A crash during a write
leaves the older checkpoints whole, as a synchronous write does; a write that fails
(disk full) is one ``WriteFailed`` naming the file, the cause and the last good
checkpoint, raised at once or, from the thread, at the next ``wait()``.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from ..cluster.errors import MpicnnError
from ..resilience.write_failure import WriteFailed
from . import files


def host_copy(obj, clone: bool = True):
    """``obj`` with every tensor in host memory: CUDA tensors copied into pinned memory
    without waiting (see ``copies_queued``), CPU tensors cloned if ``clone`` (then nothing
    is shared with the live state), other devices' copied now."""
    if isinstance(obj, torch.Tensor):
        return _to_host(obj.detach(), clone)
    if isinstance(obj, dict):
        return {key: host_copy(value, clone) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(item, clone) for item in obj)
    return obj


def _to_host(tensor: torch.Tensor, clone: bool) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor.clone() if clone else tensor
    if tensor.device.type == "cuda":
        host = torch.empty_like(tensor, device="cpu", pin_memory=True)
        return host.copy_(tensor, non_blocking=True)
    return tensor.to("cpu")


def copies_queued():
    """A CUDA event after every copy queued so far on this thread's stream (None without
    CUDA): waiting on it makes the pinned copies of ``host_copy`` complete."""
    if not torch.cuda.is_initialized():
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class Writer:
    """Writes checkpoints now (``background=False``) or on a thread, one at a time."""

    def __init__(self, background: bool = False):
        self.background = background
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.written: Path | None = None        # the newest checkpoint written whole
        self.stall_s: list[float] = []          # seconds the caller waited, per checkpoint
        self.write_s: list[float] = []          # seconds each write took

    def save(self, state: dict, path: Path, after=None) -> None:
        """Write ``state`` to ``path``, then call ``after()`` (e.g. prune older ones)."""
        start = time.perf_counter()
        self.wait()
        copy = host_copy(state, clone=self.background)     # written now: nothing to keep
        copied = copies_queued()
        if not self.background:
            self._write(copy, copied, path, after)
        else:
            self.thread = threading.Thread(target=self._guarded,
                                           args=(copy, copied, path, after),
                                           name="checkpoint-writer", daemon=True)
            self.thread.start()
        self.stall_s.append(time.perf_counter() - start)

    def _write(self, state: dict, copied, path: Path, after) -> None:
        start = time.perf_counter()
        if copied is not None:
            copied.synchronize()
        try:
            files.atomic_save(state, path)
        except OSError as exc:
            raise WriteFailed("checkpoint", path, exc, self.last_good(path.parent)) from exc
        self.written = path
        if after is not None:
            after()
        self.write_s.append(time.perf_counter() - start)

    def _guarded(self, state: dict, copied, path: Path, after) -> None:
        try:
            self._write(state, copied, path, after)
        except Exception as exc:          # noqa: BLE001 - raised again by wait()
            self.error = exc

    def last_good(self, directory: Path) -> Path | None:
        """The newest whole checkpoint: this run's last write, else an earlier run's."""
        return self.written or files.latest(directory)

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> None:
        """Wait for the write in flight, if any; raise its error."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            if isinstance(error, MpicnnError):
                raise error
            raise MpicnnError(f"writing a checkpoint in the background failed: "
                              f"{type(error).__name__}: {error}") from error
