"""Run configuration in sections, each owned and validated by its file; flags and TOML on top.

- ``fields``: what a setting is (help, group, choices, its off value, former names) and
  how a value is checked.
- ``data``, ``training``, ``sync``, ``output``, ``failure``: one section each, with its
  defaults and its own ``validate()``.
- ``toml``: reading a ``--config`` file, writing one that reads back the same.
- this module: ``Config`` (the sections together), ``--key value`` flags, ``--print-config``.

Every setting keeps one flat name: ``--batch-size``, ``batch_size = 32`` in TOML (where
``[sections]`` are only for readability), ``cfg.training.batch_size`` in code. Precedence:
defaults < ``--config run.toml`` < command-line flags. Unknown keys and wrong types are
rejected with the valid choices named. Conventions: a setting that can be turned off
takes ``off`` (``none``, ``''`` and its old number, ``0`` or ``-1``, still work); a
switch ``--x`` has ``--no-x``; names or metavars carry units (``--checkpoint-every-epochs``,
``--log-every STEPS``); a renamed setting keeps its old name as an alias.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field

from .. import __version__
from ..cluster.errors import MpicnnError
from .data import SHIPPED_DATA, DataConfig
from .failure import FailureConfig
from .fields import OFF, can_be_off, coerce, flag, shown
from .output import OutputConfig
from .sync import SyncConfig, check_overlap_forward, check_powersgd
from .toml import dump_toml, load_toml
from .training import TrainingConfig, check_compile

__all__ = ["Config", "FIELDS", "SHIPPED_DATA", "build_parser", "load_toml", "parse_config"]

SECTIONS = {"data": DataConfig, "training": TrainingConfig, "sync": SyncConfig,
            "output": OutputConfig, "failure": FailureConfig}
# setting name -> (section name, its dataclass field)
FIELDS = {f.name: (section, f) for section, kind in SECTIONS.items()
          for f in dataclasses.fields(kind)}
ALIASES = {alias: name for name, (_, f) in FIELDS.items() for alias in f.metadata["aliases"]}
GROUP_TITLES = {"data": "data", "model": "model", "training": "training",
                "distributed": "distribution", "output": "output and control",
                "failure": "failure handling"}


@dataclass
class Config:
    """The effective settings of a run, one section per component."""

    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)

    def validate(self) -> None:
        """Reject values that cannot work, before anything starts (each section its own)."""
        for section in SECTIONS:
            getattr(self, section).validate()
        check_overlap_forward(self)
        check_compile(self)
        check_powersgd(self)

    def to_dict(self) -> dict:
        """Every setting under its flat name (the metrics record, checkpoints, config.toml)."""
        return {name: list(v) if isinstance(v := getattr(getattr(self, section), name), tuple)
                else v for name, (section, _) in FIELDS.items()}

    def dump(self) -> str:
        """The effective config as TOML, each setting under its help; ``--config`` reads it."""
        values = self.to_dict()
        for name, (section, f) in FIELDS.items():
            if can_be_off(f) and getattr(getattr(self, section), name) == f.metadata["off"]:
                values[name] = OFF
        return dump_toml({section: [(name, values[name], f.metadata["help"])
                                    for name, (where, f) in FIELDS.items() if where == section]
                          for section in SECTIONS},
                         "mpicnn.train settings (python -m mpicnn.train --print-config); "
                         "train with them:\nmpirun -n N python -m mpicnn.train --config FILE")

    def summary(self) -> str:
        """One line of ``key=value`` for the startup log."""
        return " ".join(f"{k}={json.dumps(v)}" for k, v in self.to_dict().items())


def coerce_setting(name: str, value):
    """``value`` as the type of setting ``name``; raise MpicnnError for unknown names."""
    name = ALIASES.get(name, name)
    if name not in FIELDS:
        raise MpicnnError(unknown_setting_message(name), collective=True)
    return coerce(FIELDS[name][1], value)


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


class _Switch(argparse.Action):
    """``--x [BOOL]`` and ``--no-x``: one on/off setting under both names."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value (it means "
                             f"{self.option_strings[0]} false)")
            value = "false"
        setattr(namespace, self.dest, "true" if value is None else value)


class _Help(argparse.HelpFormatter):
    """Shows a switch as ``--x [BOOL], --no-x``."""

    def _format_action_invocation(self, action):
        if isinstance(action, _Switch):
            on, off = action.option_strings
            return f"{on} [{action.metavar}], {off}"
        return super()._format_action_invocation(action)


def metavar(f) -> str:
    """What ``--help`` shows a setting takes: its choices, or a unit or kind (``|off``)."""
    if f.metadata["choices"]:
        return "{" + ",".join(shown(f, c) for c in f.metadata["choices"]) + "}"
    word = f.metadata["metavar"] or f.name.upper()
    return f"{word}|{OFF}" if can_be_off(f) else word


def build_parser(prog: str = "python -m mpicnn.train") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, argument_default=argparse.SUPPRESS, allow_abbrev=False,
                     formatter_class=_Help,
                     description="Train a CNN data-parallel over MPI. Launch with "
                                 "`mpirun -n N python -m mpicnn.train [options]`. A setting "
                                 "that can be turned off takes `off`.")
    parser.add_argument("--version", action="version", version=f"mpicnn {__version__}")
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    for name, (_, f) in FIELDS.items():
        meta, group = f.metadata, groups[f.metadata["group"]]
        default = meta["default_text"] or shown(f, f.default) or "none"
        help_text = f"{meta['help']} (default: {default})"
        if type(f.default) is bool:
            group.add_argument(flag(name), "--no-" + flag(name)[2:], dest=name, action=_Switch,
                               help=help_text)
        else:
            group.add_argument(flag(name), dest=name, help=help_text, metavar=metavar(f))
        for alias in meta["aliases"]:          # still accepted, no longer shown
            group.add_argument(flag(alias), dest=name, help=argparse.SUPPRESS)
    groups["output"].add_argument("--print-config", action="store_true",
                                  help="print the effective settings as TOML (read back by "
                                       "--config) and exit; run it without mpirun")
    return parser


def parse_config(argv: list[str] | None = None, defaults: dict | None = None) -> Config:
    """Build the effective Config from defaults (``defaults`` first), ``--config`` and flags.

    With ``--print-config`` print it as TOML and exit (``SystemExit``, as ``--help`` does).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    given = vars(build_parser().parse_args(argv))
    print_config = given.pop("print_config", False)
    config_file = coerce_setting("config", given.get("config", ""))
    values = dict(defaults or {})
    values.update({ALIASES.get(k, k): v for k, v in
                   (load_toml(config_file) if config_file else {}).items()})
    values.update(given)
    sections = {section: {} for section in SECTIONS}
    for name, value in values.items():
        value = coerce_setting(name, value)
        sections[FIELDS[name][0]][name] = value
    cfg = Config(**{section: SECTIONS[section](**settings)
                    for section, settings in sections.items()})
    cfg.validate()
    if print_config:
        print(cfg.dump(), end="")
        raise SystemExit(0)
    return cfg
