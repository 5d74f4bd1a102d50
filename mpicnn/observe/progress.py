"""Rank 0's progress: a tqdm bar at a terminal, else a periodic status line."""
from __future__ import annotations

import sys


class Progress:
    """Rank 0's view of the run: a tqdm bar at a terminal, else a periodic status line.

    The bar shows epoch, step, loss, images/s and ETA; without a terminal (batch logs)
    or with ``--progress off`` a one-line status is logged at every interval instead.
    Ranks other than 0 show nothing.
    """

    def __init__(self, active: bool, mode: str = "auto", log=None, stream=None):
        self.stream = stream or sys.stderr
        tty = self.stream.isatty()
        self.active = active
        self.enabled = active and (mode == "on" or (mode == "auto" and tty))
        self.log = log
        self.bar = self._redirect = None
        self.total = self.epochs = self.global_batch = 0

    def start(self, total: int, done: int, epochs: int, global_batch: int) -> None:
        """Begin the run: ``total`` steps, ``done`` already taken (after a resume)."""
        self.total, self.epochs, self.global_batch = total, epochs, global_batch
        if self.enabled:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.close()
            self.bar = tqdm(total=total, initial=done, unit="step", file=self.stream,
                            dynamic_ncols=True, leave=False)
            if self.log is not None:   # log lines go above the bar, not through it
                self._redirect = logging_redirect_tqdm(loggers=[self.log])
                self._redirect.__enter__()

    def update(self, epoch: int, step: int, loss: float) -> None:
        """One step taken (bar only)."""
        if self.bar is None:
            return
        rate = self.bar.format_dict.get("rate") or 0.0
        self.bar.set_description(f"epoch {epoch}/{self.epochs}", refresh=False)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate * self.global_batch:.0f}",
                             refresh=False)
        self.bar.update(1)

    def status(self, epoch: int, step: int, loss: float, images_per_s: float) -> None:
        """One interval done: a status line when no bar is shown."""
        if self.active and self.bar is None and self.log is not None:
            self.log.info(status_line(epoch, self.epochs, step, self.total, loss,
                                      images_per_s, self.global_batch))

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def status_line(epoch, epochs, step, total, loss, images_per_s, global_batch) -> str:
    """``epoch 2/20 step 150/2000 loss 0.5321 1234 images/s ETA 0:05:12``."""
    if images_per_s > 0 and global_batch > 0:
        seconds = round((total - step) * global_batch / images_per_s)
        eta = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    else:
        eta = "?"
    return (f"epoch {epoch}/{epochs} step {step}/{total} loss {loss:.4f} "
            f"{images_per_s:.0f} images/s ETA {eta}")
