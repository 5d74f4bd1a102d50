"""Rank 0's checkpoint writer: the training state into ``--checkpoint-dir``, pruned."""
from __future__ import annotations

from pathlib import Path

from . import files as checkpoint
from .state import RunState, training_state


def save(cfg, model, optimizer, scheduler, state: RunState, name: str) -> Path:
    """Write the training state atomically into ``cfg.checkpoint_dir`` (rank 0 only)."""
    path = Path(cfg.checkpoint_dir) / name
    checkpoint.atomic_save(training_state(cfg, model, optimizer, scheduler, state), path)
    checkpoint.prune(cfg.checkpoint_dir, cfg.keep_checkpoints)
    return path


def save_config(cfg) -> None:
    """Check the checkpoint directory is writable and keep the effective config there."""
    checkpoint.ensure_writable(cfg.checkpoint_dir)
    (Path(cfg.checkpoint_dir) / "config.toml").write_text(cfg.dump())
