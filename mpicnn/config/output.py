"""The output section: checkpoints and resume, metrics, logs, progress, timeline."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .fields import at_least, must, non_negative, opt


@dataclass
class OutputConfig:
    """What a run writes and where (``mpicnn.checkpoint``, ``mpicnn.observe``)."""

    # --- output ---------------------------------------------------------------
    checkpoint_dir: str = opt("", "directory for checkpoints (off: none written)", "output",
                              metavar="DIR", off="")
    checkpoint_every_epochs: int = opt(1, "write a checkpoint every this many epochs (and at "
                                       "the end)", "output", metavar="EPOCHS",
                                       aliases=["checkpoint_every"])
    checkpoint_async: bool = opt(False, "write checkpoints in the background: rank 0 copies "
                                 "the state to host memory, a thread writes it while "
                                 "training goes on", "output")
    resume: str = opt("", "resume: 'auto' (latest in --checkpoint-dir) or a checkpoint path",
                      "output", metavar="auto|FILE", off="")
    metrics: str = opt("", "write JSON-lines metrics to this file", "output", metavar="FILE",
                       off="")
    tensorboard: str = opt("", "rank 0 writes the metrics as TensorBoard scalars into this "
                           "directory (needs tensorboard)", "output", metavar="DIR", off="")
    log_every: int = opt(50, "optimizer steps between metric records / status lines", "output",
                         metavar="STEPS")
    progress: str = opt("auto", "progress bar on rank 0", "output", ["auto", "on", "off"],
                        off="off")
    debug: bool = opt(False, "show tracebacks on errors", "output")
    config: str = opt("", "TOML file of settings (flags override it; --print-config writes "
                      "one)", "output", metavar="FILE", off="")
    # --- timeline (see README "Metrics, timeline and reports") -------------------
    timeline: str = opt("", "write a Chrome-trace/Perfetto JSON of every rank's phases to "
                        "this file (open in ui.perfetto.dev)", "output", metavar="FILE",
                        off="")
    timeline_steps: str = opt("0:20", "global steps a:b (b excluded) recorded by --timeline",
                              "output", metavar="A:B")
    profile: str = opt("", "write torch.profiler traces and per-step host operator, kernel and "
                       "device-wait counts of each rank into this directory", "output",
                       metavar="DIR", off="")
    profile_steps: str = opt("10:20", "global steps a:b (b excluded) profiled by --profile",
                             "output", metavar="A:B")
    keep_checkpoints: int = opt(3, "keep only the newest K step checkpoints (off: all; "
                                "final.pt is always kept)", "output", metavar="K", off=0)

    def validate(self) -> None:
        at_least(1, self, "checkpoint_every_epochs", "log_every")
        non_negative(self, "keep_checkpoints", hint="off keeps them all")
        must(not (self.resume == "auto" and not self.checkpoint_dir),
             "--resume auto needs --checkpoint-dir")
        # checked on every rank alike, so the error is collective rather than rank 0's alone
        must(not self.tensorboard or importlib.util.find_spec("tensorboard") is not None,
             "--tensorboard needs the tensorboard package: pip install tensorboard (or the "
             "'tensorboard' extra)")
