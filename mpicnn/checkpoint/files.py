"""Checkpoints: atomic writes, safe loads (no arbitrary unpickling), finding the latest."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..cluster.errors import MpicnnError
from . import checksum as digest

FINAL = "final.pt"
PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")
LEFTOVER = re.compile(r"\.(checkpoint-\d+\.pt|final\.pt)\.tmp(\d+)$")   # an interrupted write


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def atomic_save(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` (with its checksum) to a temporary file, fsync it, rename over ``path``.

    A failed write raises the ``OSError`` behind it (``No space left on device``), and
    whatever ``path`` held before stays as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            sink = _Sink(fh)
            try:
                torch.save(digest.seal(state) if isinstance(state, dict) else state, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


class _Sink:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write.

    torch's writer turns that error into ``unexpected pos N vs M``, which says nothing of
    the disk; the error kept here does.
    """

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


class Unloadable(MpicnnError):
    """A checkpoint that cannot be resumed from: ``problem`` says why."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = problem


def load(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU, refusing anything but tensors and plain data.

    The checksum stored by :func:`atomic_save` is verified and removed.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MpicnnError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as exc:
        text = str(exc).strip()
        refused = re.search(r"GLOBAL ([\w.]+)", text)   # weights_only stopped an object
        if refused:
            problem = (f"it holds objects other than tensors and plain data "
                       f"({refused.group(1)}), and loading them could run code")
            raise Unloadable(f"refusing checkpoint {str(path)!r}: {problem}; resume from a "
                             f"checkpoint written by mpicnn", problem) from None
        why = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = _first_sentence(why.group(1) if why else text)
        raise Unloadable(f"cannot load checkpoint {str(path)!r} (damaged or not a checkpoint): "
                         f"{reason}; resume from another checkpoint or start without --resume",
                         f"damaged or not a checkpoint ({reason})") from None
    problem = digest.verify(state)
    if problem:
        raise Unloadable(f"refusing checkpoint {str(path)!r}: {problem}; resume from "
                         f"another checkpoint or start without --resume", problem)
    del state[digest.KEY]
    return state


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0]


def candidates(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``directory``, newest first: ``final.pt``, then by step, highest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = sorted(((int(m.group(1)), p) for p in directory.iterdir()
                    if (m := PATTERN.match(p.name))), reverse=True)
    final = [directory / FINAL] if (directory / FINAL).exists() else []
    return final + [p for _, p in steps]


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``directory``: ``final.pt`` if present, else the highest step."""
    found = candidates(directory)
    return found[0] if found else None


def load_newest(directory: str | os.PathLike, warn) -> tuple[Path | None, dict | None]:
    """Load the newest checkpoint that passes its checks, warning once about each one skipped
    (``--resume auto``; a checkpoint named by ``--resume PATH`` is refused instead)."""
    found = candidates(directory)
    for path in found:
        try:
            return path, load(path)
        except Unloadable as exc:
            warn(f"warning: resume: skipping {path}: {exc.problem}; trying the next older one")
    if found:
        raise MpicnnError(f"none of the {len(found)} checkpoint(s) in {str(directory)!r} can "
                          f"be loaded; move them away to start fresh")
    return None, None


def prune(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints, and leftovers of interrupted writes."""
    directory = Path(directory)
    doomed = [p for p in directory.iterdir()
              if (m := LEFTOVER.match(p.name)) and int(m.group(2)) != os.getpid()]
    if keep > 0:
        doomed += [p for p in candidates(directory) if p.name != FINAL][keep:]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def resolve_resume(resume: str, directory: str) -> Path | None:
    """The checkpoint ``--resume`` names (``auto``: the latest one, or none to start fresh)."""
    if not resume:
        return None
    if resume == "auto":
        return latest(directory) if directory else None
    if not os.path.exists(resume):
        raise MpicnnError(f"--resume {resume!r}: no such checkpoint; give an existing file, "
                          f"or 'auto' to continue from the newest one in --checkpoint-dir")
    return Path(resume)


def ensure_writable(directory: str) -> None:
    """Create ``directory`` and prove a file can be written there."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = Path(directory) / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise MpicnnError(f"checkpoint directory {directory!r} is not writable: "
                          f"{exc.strerror or exc}; choose another --checkpoint-dir") from None
