"""Run configuration: one dataclass of commented defaults, TOML files and ``--key value``.

Precedence: defaults < ``--config run.toml`` < command-line flags. Unknown keys and
wrong types are rejected with the valid choices named.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cluster.errors import MpicnnError

SHIPPED_DATA = Path(__file__).resolve().parents[2] / "data" / "digits.h5"


def opt(default, help, group, choices=None, metavar=None):
    """A config field with its help text, argparse group and allowed values."""
    return field(default=default, metadata={"help": help, "group": group,
                                            "choices": choices, "metavar": metavar})


@dataclass
class Config:
    # --- data -----------------------------------------------------------------
    data: str = opt(str(SHIPPED_DATA), "HDF5 dataset (default: the shipped digits)", "data")
    images_key: str = opt("images", "name of the images dataset in each split", "data")
    labels_key: str = opt("labels", "name of the labels dataset in each split", "data")
    layout: str = opt("auto", "image layout in the file", "data", ["auto", "nchw", "nhwc"])
    val_fraction: float = opt(0.1, "validation share carved from a flat file (no train/val "
                              "groups)", "data")
    shuffle: str = opt("global", "global: world-size-invariant global batches; local: each "
                       "rank keeps one contiguous shard and shuffles within it", "data",
                       ["global", "local"])
    # --- data pipeline: read order, prefetch, cache, augmentation (issue 7) -------
    shuffle_block: int = opt(0, "global order: blocks of this many consecutive rows are "
                             "shuffled (0: the file's chunk rows; 1: single samples)", "data")
    shuffle_window: int = opt(0, "then each window of this many rows is dealt into its "
                              "batches (0: 64 global batches, at most 64 MiB)", "data")
    prefetch: int = opt(2, "batches a background reader keeps ready (0: read in the loop)",
                        "data")
    prefetch_mode: str = opt("thread", "where the reader runs", "data", ["thread", "process"])
    cache: bool = opt(False, "keep rows in RAM once read (the rank's shard with --shuffle "
                      "local, else the split); checked against node memory", "data")
    augment: str = opt("", "comma-separated augmentations: crop (pad and random crop), flip "
                       "(horizontal); e.g. crop,flip", "data", metavar="LIST")
    # --- model ----------------------------------------------------------------
    model: str = opt("digitnet", "model name from the zoo, or package.module:Class", "model")
    # --- training -------------------------------------------------------------
    epochs: int = opt(20, "passes over the training split", "training")
    batch_size: int = opt(16, "samples per rank per step (global batch = this x workers)",
                          "training")
    max_steps: int = opt(0, "stop after this many optimizer steps in total (0: no limit)",
                         "training")
    stop_epoch: int = opt(0, "end this invocation after this epoch with a checkpoint, keeping "
                          "the schedule of --epochs (split a long run over several jobs; "
                          "continue with --resume auto)", "training")
    optimizer: str = opt("adamw", "optimizer", "training", ["sgd", "adamw"])
    lr: float = opt(0.002, "peak learning rate (after warmup, before scaling); for SGD try "
                    "0.05", "training")
    momentum: float = opt(0.9, "SGD momentum", "training")
    nesterov: bool = opt(True, "Nesterov momentum for SGD", "training")
    weight_decay: float = opt(0.01, "weight decay (decoupled for AdamW; for SGD try 5e-4)",
                              "training")
    betas: tuple = opt((0.9, 0.999), "AdamW betas", "training", metavar="B1,B2")
    schedule: str = opt("cosine", "learning-rate schedule after warmup", "training",
                        ["cosine", "step", "constant"])
    warmup_epochs: float = opt(1.0, "linear warmup length in epochs", "training")
    lr_milestones: tuple = opt((), "epochs at which the step schedule multiplies the lr by "
                               "--lr-gamma", "training", metavar="E1,E2,...")
    lr_gamma: float = opt(0.1, "step schedule factor", "training")
    min_lr_ratio: float = opt(0.0, "cosine floor as a fraction of the peak lr", "training")
    scale_lr: bool = opt(False, "linear lr scaling: lr x global batch / --base-batch",
                         "training")
    base_batch: int = opt(32, "global batch that --lr is tuned for (with --scale-lr)",
                          "training")
    seed: int = opt(0, "seed for initialisation and sample order", "training")
    deterministic: bool = opt(False, "bit-reproducible runs on CPU", "training")
    # --- distribution ---------------------------------------------------------
    mode: str = opt("allreduce", "how ranks combine gradients", "distributed",
                    ["allreduce", "ps-sync", "ps-async"])
    device: str = opt("auto", "compute device (GPU = node-local rank mod GPU count)",
                      "distributed", ["auto", "cpu", "cuda"])
    threads: int = opt(0, "torch CPU threads per rank (0: cores per node / ranks per node)",
                       "distributed")
    # --- gradient communication (the allreduce engine) ---
    bucket_mb: float = opt(25.0, "gradient bucket size in MB, reduced while backward goes on "
                           "(the first bucket is 1 MB); 0: one blocking Allreduce of all "
                           "gradients after backward", "distributed")
    accum_steps: int = opt(1, "micro-batches per optimizer step: each rank's --batch-size batch "
                           "runs as this many slices, gradients are summed locally and "
                           "communicated once", "distributed")
    compression: str = opt("none", "gradient precision on the wire (fp16/bf16 halve the bytes)",
                           "distributed", ["none", "fp16", "bf16"])
    cuda_aware: str = opt("auto", "CUDA buffers straight to MPI (on), staged through pinned "
                          "host memory (off), or probe the MPI library (auto)", "distributed",
                          ["auto", "on", "off"])
    hierarchical: bool = opt(False, "reduce within each node, allreduce across node leaders, "
                             "broadcast within the node", "distributed")
    shared_memory: str = opt("auto", "auto: ranks of one node average CPU buckets in MPI "
                             "shared-memory windows; off: always MPI Allreduce", "distributed",
                             ["auto", "off"])
    # parameter-server modes (ps-sync, ps-async) and straggler simulation
    servers: int = opt(1, "ps modes: ranks that hold the parameters (the last ones); the "
                       "others are workers", "distributed")
    staleness: str = opt("none", "ps-async: clocks the fastest worker may run ahead of the "
                         "slowest (SSP; 0 acts like ps-sync); none: unbounded (Downpour, "
                         "batches handed out on demand)", "distributed", metavar="S|none")
    staleness_lr: bool = opt(False, "ps-async: divide each update's lr by its staleness",
                             "distributed")
    slow_rank: int = opt(-1, "straggler simulation: this worker computes --slow-factor times "
                         "slower (-1: none)", "distributed")
    slow_factor: float = opt(2.0, "how many times slower --slow-rank computes", "distributed")
    # --- output ---------------------------------------------------------------
    checkpoint_dir: str = opt("", "directory for checkpoints (empty: none written)", "output")
    checkpoint_every: int = opt(1, "write a checkpoint every N epochs (and at the end)",
                                "output")
    resume: str = opt("", "resume: 'auto' (latest in --checkpoint-dir) or a checkpoint path",
                      "output")
    metrics: str = opt("", "write JSON-lines metrics to this file", "output")
    log_every: int = opt(50, "steps between metric records / status lines", "output")
    progress: str = opt("auto", "progress bar on rank 0", "output", ["auto", "on", "off"])
    debug: bool = opt(False, "show tracebacks on errors", "output")
    config: str = opt("", "TOML file of settings (flags override it)", "output")
    # --- timeline (see README "Metrics, timeline and reports") -------------------
    timeline: str = opt("", "write a Chrome-trace/Perfetto JSON of every rank's phases to "
                        "this file (open in ui.perfetto.dev)", "output")
    timeline_steps: str = opt("0:20", "global steps a:b (b excluded) recorded by --timeline",
                              "output", metavar="A:B")
    # --- failure handling -----------------------------------------------------
    nan_policy: str = opt("abort", "on a non-finite loss or gradient: abort the run, or skip "
                          "that update on every rank", "failure", ["abort", "skip"])
    stall_warn: float = opt(60.0, "seconds ranks may wait at a gradient exchange before rank 0 "
                            "names the missing ranks (0: off)", "failure")
    stall_abort: float = opt(0.0, "abort the job after ranks have waited this many seconds at "
                             "one exchange (0: never)", "failure")
    keep_checkpoints: int = opt(3, "keep only the newest K step checkpoints (0: all; final.pt "
                                "is always kept)", "failure")
    # --- preemption (mpicnn/resilience/preemption.py, jobs/) ---------------------------------
    stop_check_every: int = opt(1, "steps between the all-rank check for a stop signal "
                                "(SIGUSR1/SIGTERM/SIGINT: checkpoint, then exit 75); 0: "
                                "leave signals alone", "output")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def dump(self) -> str:
        """The effective config as TOML, readable back with ``--config``."""
        return "\n".join(f"{k} = {json.dumps(v)}" for k, v in self.to_dict().items()) + "\n"

    def summary(self) -> str:
        """One line of ``key=value`` for the startup log."""
        return " ".join(f"{k}={json.dumps(v)}" for k, v in self.to_dict().items())


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
GROUP_TITLES = {"data": "data", "model": "model", "training": "training",
                "distributed": "distribution", "output": "output and control",
                "failure": "failure handling"}


def _field_type(name: str):
    return type(FIELDS[name].default)


def coerce(name: str, value: Any):
    """Convert ``value`` to the type of field ``name``; raise MpicnnError on mismatch."""
    if name not in FIELDS:
        raise MpicnnError(unknown_setting_message(name), collective=True)
    kind, f = _field_type(name), FIELDS[name]
    flag = "--" + name.replace("_", "-")
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                value = lowered in ("true", "1", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError
        elif kind is tuple:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            element = type(f.default[0]) if f.default else float
            value = tuple(element(v) for v in value)
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif kind is str:
            if not isinstance(value, str):
                raise ValueError
    except (ValueError, TypeError):
        raise MpicnnError(f"{flag}: expected {kind.__name__}, got {value!r}",
                          collective=True) from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise MpicnnError(f"{flag}: invalid choice {value!r}; choose from "
                          f"{', '.join(choices)}", collective=True)
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage from every rank."""

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            unknown = [a for a in message.split(":", 1)[1].split() if a.startswith("--")]
            if unknown:
                message = unknown_setting_message(unknown[0].lstrip("-"), "option")
        raise MpicnnError(f"{message} (see --help)", collective=True)


def unknown_setting_message(name: str, what: str = "setting") -> str:
    """Name the unknown setting and the closest valid ones."""
    key = name.split("=", 1)[0].replace("-", "_")
    close = difflib.get_close_matches(key, FIELDS, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join("--" + c.replace("_", "-") for c in close) + "?"
    else:
        hint = "valid: " + ", ".join(sorted(FIELDS))
    return f"unknown {what} {name!r}; {hint}"


def build_parser(prog: str = "python -m mpicnn.train") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, argument_default=argparse.SUPPRESS, allow_abbrev=False,
                     description="Train a CNN data-parallel over MPI. Launch with "
                                 "`mpirun -n N python -m mpicnn.train [options]`.")
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    for name, f in FIELDS.items():
        meta = f.metadata
        flag = "--" + name.replace("_", "-")
        default = f.default if not isinstance(f.default, tuple) else \
            ",".join(map(str, f.default))
        help_text = f"{meta['help']} (default: {default if default != '' else 'none'})"
        if _field_type(name) is bool:
            groups[meta["group"]].add_argument(flag, dest=name, nargs="?", const="true",
                                               metavar="BOOL", help=help_text)
            groups[meta["group"]].add_argument("--no-" + name.replace("_", "-"), dest=name,
                                               action="store_const", const="false",
                                               help=argparse.SUPPRESS)
        else:
            groups[meta["group"]].add_argument(flag, dest=name, help=help_text,
                                               metavar=meta.get("metavar") or
                                               ("{" + ",".join(meta["choices"]) + "}"
                                                if meta.get("choices") else name.upper()))
    return parser


def load_toml(path: str) -> dict:
    """Read a TOML file of settings (parsed as data, never evaluated)."""
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise MpicnnError(f"config file {path!r} not found", collective=True) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MpicnnError(f"config file {path!r} is not valid TOML: {exc}",
                          collective=True) from None
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):   # [sections] are only for readability
            flat.update(value)
        else:
            flat[key] = value
    return {k.replace("-", "_"): v for k, v in flat.items()}


def parse_config(argv: list[str] | None = None, defaults: dict | None = None) -> Config:
    """Build the effective Config from defaults (``defaults`` first), ``--config`` and flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = vars(build_parser().parse_args(argv))
    values = dict(defaults or {})
    values.update(load_toml(given["config"]) if given.get("config") else {})
    values.update(given)
    cfg = Config(**{k: coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values that cannot work, before anything starts."""
    positive = ["epochs", "batch_size", "checkpoint_every", "log_every", "base_batch"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise MpicnnError(f"--{name.replace('_', '-')} must be at least 1, got "
                              f"{getattr(cfg, name)}", collective=True)
    for name in ["max_steps", "stop_epoch", "threads", "warmup_epochs", "weight_decay", "momentum",
                 "min_lr_ratio"]:
        if getattr(cfg, name) < 0:
            raise MpicnnError(f"--{name.replace('_', '-')} must not be negative",
                              collective=True)
    if not cfg.lr > 0:
        raise MpicnnError(f"--lr must be positive, got {cfg.lr}", collective=True)
    if not 0 <= cfg.val_fraction < 1:
        raise MpicnnError("--val-fraction must be in [0, 1)", collective=True)
    if cfg.resume and not cfg.checkpoint_dir and cfg.resume == "auto":
        raise MpicnnError("--resume auto needs --checkpoint-dir", collective=True)
    if len(cfg.betas) != 2:
        raise MpicnnError("--betas takes two numbers, e.g. 0.9,0.999", collective=True)
    if cfg.bucket_mb < 0:
        raise MpicnnError("--bucket-mb must not be negative (0: one flat Allreduce)",
                          collective=True)
    if cfg.accum_steps < 1 or cfg.batch_size % cfg.accum_steps:
        raise MpicnnError(f"--accum-steps {cfg.accum_steps} must be at least 1 and divide "
                          f"--batch-size {cfg.batch_size} (each micro-batch is batch-size / "
                          f"accum-steps samples)", collective=True)
    # data pipeline (issue 7)
    for name in ["shuffle_block", "shuffle_window", "prefetch"]:
        if getattr(cfg, name) < 0:
            raise MpicnnError(f"--{name.replace('_', '-')} must not be negative",
                              collective=True)
    from ..data.augment import parse_augment
    parse_augment(cfg.augment)
    for name in ["stall_warn", "stall_abort", "keep_checkpoints"]:
        if not getattr(cfg, name) >= 0:
            raise MpicnnError(f"--{name.replace('_', '-')} must not be negative (0 turns it "
                              f"off)", collective=True)
    # preemption
    if cfg.stop_check_every < 0:
        raise MpicnnError("--stop-check-every must not be negative (0 leaves signals alone)",
                          collective=True)
    if cfg.servers < 1:
        raise MpicnnError(f"--servers must be at least 1, got {cfg.servers}", collective=True)
    staleness_bound(cfg.staleness)
    if cfg.slow_rank < -1 or cfg.slow_factor < 1:
        raise MpicnnError("--slow-rank takes a worker rank (or -1) and --slow-factor a number "
                          ">= 1", collective=True)


def staleness_bound(text: str) -> int | None:
    """``--staleness`` as a whole number of clocks >= 0, or None for unbounded."""
    text = text.strip().lower()
    if text in ("none", "inf", "unbounded"):
        return None
    try:
        bound = int(text)
    except ValueError:
        bound = -1
    if bound < 0:
        raise MpicnnError(f"--staleness must be a whole number >= 0 or 'none' (unbounded), "
                          f"got {text!r}", collective=True)
    return bound
