"""Rank 0's checkpoints: ``config.toml`` at start, the epoch cadence, the stop save, pruning.

Every rank holds a ``Checkpointer``; only rank 0 of a run with ``--checkpoint-dir``
writes, so callers need no rank checks. With ``--checkpoint-async`` the writes run in
the background (``writer``); a stop and the end of the run wait for them.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from ..resilience.write_failure import WriteFailed
from . import files, position
from .state import RunState, training_state
from .trained import INPUT, input_record
from .writer import Writer


class Checkpointer:
    """Writes the training state of ``model``/``optimizer``/``scheduler`` when it is due."""

    def __init__(self, cfg, world, model, optimizer, scheduler, layout=None, precision=None,
                 data=None):
        self.cfg, self.world, self.layout, self.precision = cfg, world, layout, precision
        self.parts = (model, optimizer, scheduler)
        # what the model takes (``data``: the Dataset), so the checkpoint alone can run it
        self.input = input_record(data) if data is not None else None
        self.writes = bool(cfg.output.checkpoint_dir) and world.is_root
        self.saved: Path | None = None          # the newest checkpoint this run wrote
        self.writer = Writer(background=cfg.output.checkpoint_async)

    def prepare(self) -> None:
        """Check the directory is writable and keep the effective config there (collective)."""
        if self.cfg.output.checkpoint_dir:
            self.world.agree(lambda: self.writes and self._write_config())

    def _write_config(self) -> None:
        files.ensure_writable(self.cfg.output.checkpoint_dir)
        path = Path(self.cfg.output.checkpoint_dir) / "config.toml"
        try:
            path.write_text(self.cfg.dump())
        except OSError as exc:
            raise WriteFailed("the config", path, exc, self.last_good()) from exc

    def last_good(self) -> Path | None:
        """The newest checkpoint that is whole (for the message of a failed write)."""
        directory = self.cfg.output.checkpoint_dir
        return self.writer.last_good(Path(directory)) if directory else None

    def epoch_done(self, state: RunState, finished: bool, last_epoch: int) -> None:
        """Save after an epoch: ``final.pt`` when training is over, else by the cadence."""
        every = self.cfg.output.checkpoint_every_epochs
        due = state.epoch % every == 0 or state.epoch == last_epoch
        if finished or due:
            self.save(state, files.FINAL if finished else files.checkpoint_name(state.global_step))

    def stopped(self, state: RunState) -> None:
        """Save where a stop signal ended the run (mid-epoch is fine: resume skips done steps)."""
        self.save(state, files.checkpoint_name(state.global_step))
        self.finish()

    def save(self, state: RunState, name: str) -> None:
        """Write the training state atomically as ``name``, then prune old ones (rank 0)."""
        if not self.writes:
            return
        path = Path(self.cfg.output.checkpoint_dir) / name
        saved = training_state(self.cfg, *self.parts, state, self.precision)
        if self.layout is not None:        # where the run stands in samples (resume anywhere)
            saved.update(position.record(state, self.layout))
        if self.input is not None:
            saved[INPUT] = self.input
        directory, keep = self.cfg.output.checkpoint_dir, self.cfg.output.keep_checkpoints
        self.writer.save(saved, path, after=lambda: files.prune(directory, keep))
        self.saved = path

    def finish(self) -> None:
        """Wait for a checkpoint still being written; say what background writes cost."""
        if not self.writes:
            return
        self.writer.wait()
        writer = self.writer
        if writer.background and writer.stall_s:
            self.world.log.info(
                f"checkpoints: {len(writer.stall_s)} written in the background; training "
                f"waited {1000 * statistics.median(writer.stall_s):.1f} ms (median) for the "
                f"host copy, the writes took {1000 * statistics.median(writer.write_s):.1f} ms")
