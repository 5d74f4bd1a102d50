"""The failure section: the NaN policy, stall warnings and abort, stop signals."""
from __future__ import annotations

from dataclasses import dataclass

from .fields import non_negative, opt


@dataclass
class FailureConfig:
    """What happens when something goes wrong (``mpicnn.resilience``)."""

    # --- failure handling -----------------------------------------------------
    nan_policy: str = opt("abort", "on a non-finite loss or gradient: abort the run, or skip "
                          "that update on every rank", "failure", ["abort", "skip"])
    stall_warn: float = opt(60.0, "seconds ranks may wait at a gradient exchange before rank 0 "
                            "names the missing ranks", "failure", metavar="SECONDS", off=0.0)
    stall_abort: float = opt(300.0, "abort the job after ranks have waited this many seconds "
                             "at one exchange (off: never)", "failure", metavar="SECONDS",
                             off=0.0)
    unreachable_abort: float = opt(120.0, "abort the job when no heartbeat has come from a "
                                   "rank for this many seconds (its node is down or cut off); "
                                   "ranks that hear nothing from rank 0 for 1.5 times as long "
                                   "end themselves (off: never)", "failure",
                                   metavar="SECONDS", off=0.0)
    stop_check_every: int = opt(1, "optimizer steps between the all-rank check for a stop "
                                "signal (SIGUSR1/SIGTERM/SIGINT: checkpoint, then exit 75); "
                                "off: leave signals alone", "failure", metavar="STEPS", off=0)

    def validate(self) -> None:
        non_negative(self, "stall_warn", "stall_abort", "unreachable_abort",
                     hint="off turns it off")
        non_negative(self, "stop_check_every", hint="off leaves signals alone")
