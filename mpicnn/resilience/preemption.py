"""Stop early on a signal: every rank stops after the same step, then rank 0 checkpoints.

SIGUSR1 (the warning SLURM sends before the time limit, ``sbatch --signal``), SIGTERM
(preemption, ``scancel``, the time limit itself) and SIGINT (Ctrl-C) only set a flag. The
training loop asks every ``check_every`` steps whether any rank saw one; the answer comes
from one tiny collective through the strategy's ``agree_stop`` hook, so ranks that got
the signal a moment apart still leave the loop after the same step. The run then writes
``checkpoint-<step>.pt`` and exits with ``PREEMPTED_EXIT``; the job script requeues it
and ``--resume auto`` continues where it stopped. A second Ctrl-C interrupts at once.
"""
from __future__ import annotations

import signal

from ..cluster.batchjob import STOP_SIGNALS

# sysexits' EX_TEMPFAIL: stopped early with a checkpoint written; run again to continue.
PREEMPTED_EXIT = 75


class StopSignals:
    """Remember the first stop signal while installed (a context manager)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self.previous: dict = {}

    def install(self) -> None:
        for signum in self.signals:
            self.previous[signum] = signal.signal(signum, self.handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def handle(self, signum, frame=None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt      # the user pressed Ctrl-C twice: do not wait
        if self.received is None:
            self.received = signum


class Preemption:
    """Whether training stops now: the same answer on every training rank."""

    def __init__(self, check_every: int = 1, agree=None, signals: StopSignals | None = None):
        self.check_every = check_every   # 0: signals are left alone, never stops
        # agree(wanted, global_step) -> whether any rank wants to stop; collective, e.g.
        # WorkPlan.agree_stop (assigned once the strategy exists)
        self.agree = agree
        self.signals = signals or StopSignals()
        self.stopped = False

    def install(self) -> None:
        """Catch the stop signals (unless checking is off)."""
        if self.check_every > 0:
            self.signals.install()

    def restore(self) -> None:
        """Give the signals back to their previous handlers."""
        self.signals.restore()

    def __enter__(self) -> "Preemption":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def should_stop(self, state) -> bool:
        """Call after every step on every training rank (collective on checked steps)."""
        if self.check_every <= 0 or state.global_step % self.check_every:
            return False
        self.stopped = self.agree(self.signals.received is not None, state.global_step)
        return self.stopped

    @property
    def reason(self) -> str:
        received = self.signals.received
        return signal.Signals(received).name if received else "a signal to another rank"

    def report(self, log, metrics, state, saved) -> int:
        """Log and record the early stop; returns the exit code for the job script."""
        where = f"checkpoint {saved}" if saved else "no --checkpoint-dir, nothing saved"
        log.info(f"stopped by {self.reason} after step {state.global_step} (epoch "
                 f"{state.epoch}, step {state.step_in_epoch} in it): {where}; exit "
                 f"{PREEMPTED_EXIT}, continue with --resume auto")
        metrics.write("stopped", signal=self.reason, step=state.global_step,
                      epoch=state.epoch, step_in_epoch=state.step_in_epoch,
                      checkpoint=str(saved or ""), exit_code=PREEMPTED_EXIT)
        return PREEMPTED_EXIT
