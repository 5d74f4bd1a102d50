"""A checksum of a checkpoint's content (tensors and plain data), stored inside it.

torch.load does not notice flipped bytes inside tensor data, so every checkpoint
carries a SHA-256 of its own content, recomputed and compared on load. Hashing the
content rather than the file keeps the checkpoint a plain ``torch.save`` file.
"""
from __future__ import annotations

import hashlib

import torch

KEY = "checksum"
PREFIX = "sha256:"


def _feed(h, obj) -> None:
    # Type tags and lengths make the encoding unambiguous ({"a": [1]} != {"a": 1}).
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(f"K{key!r}".encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:                               # None, bool, int, float, str, bytes, torch.dtype
        h.update(f"V{type(obj).__name__}:{obj!r};".encode())


def content_digest(state) -> str:
    """SHA-256 over every tensor's bytes and every plain value of ``state``."""
    h = hashlib.sha256()
    _feed(h, state)
    return PREFIX + h.hexdigest()


def seal(state: dict) -> dict:
    """A copy of ``state`` carrying the checksum of its content."""
    body = {k: v for k, v in state.items() if k != KEY}
    return {**body, KEY: content_digest(body)}


def verify(state: dict) -> str | None:
    """None when ``state``'s stored checksum matches its content, else what is wrong."""
    if not isinstance(state, dict) or KEY not in state:
        return "it has no checksum (not written by mpicnn, or written by an old version)"
    body = {k: v for k, v in state.items() if k != KEY}
    if content_digest(body) != state[KEY]:
        return "its checksum does not match its content (the file is damaged)"
    return None
