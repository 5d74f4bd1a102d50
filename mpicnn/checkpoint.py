"""Checkpoints: atomic writes, safe loads (no arbitrary unpickling), finding the latest."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import MpicnnError

FINAL = "final.pt"
PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def atomic_save(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to a temporary file, fsync it, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
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


def load(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU, refusing anything but tensors and plain data."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MpicnnError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MpicnnError(f"cannot load checkpoint {str(path)!r} (damaged, or it holds "
                          f"objects other than tensors and plain data): {first}") from None


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``directory``: ``final.pt`` if present, else the highest step."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    if (directory / FINAL).exists():
        return directory / FINAL
    steps = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.match(p.name))]
    return max(steps)[1] if steps else None


def resolve_resume(resume: str, directory: str) -> Path | None:
    """The checkpoint ``--resume`` names (``auto``: the latest one, or none to start fresh)."""
    if not resume:
        return None
    if resume == "auto":
        return latest(directory) if directory else None
    if not os.path.exists(resume):
        raise MpicnnError(f"--resume {resume!r}: no such checkpoint")
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
                          f"{exc.strerror or exc}") from None
