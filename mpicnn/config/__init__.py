"""Run configuration in sections, each owned and validated by its file; flags and TOML on top.

- ``fields``: what a setting is (help, group, choices) and how a value is checked.
- ``data``, ``training``, ``sync``, ``output``, ``failure``: one section each, with its
  defaults and its own ``validate()``.
- this module: ``Config`` (the sections together), ``--key value`` flags and TOML files.

Every setting keeps one flat name: ``--batch-size``, ``batch_size = 32`` in TOML (where
``[sections]`` are only for readability), ``cfg.training.batch_size`` in code. Precedence:
defaults < ``--config run.toml`` < command-line flags. Unknown keys and wrong types are
rejected with the valid choices named.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import tomllib
from dataclasses import dataclass, field

from .. import __version__
from ..cluster.errors import MpicnnError
from .data import SHIPPED_DATA, DataConfig
from .failure import FailureConfig
from .fields import coerce, flag
from .output import OutputConfig
from .sync import SyncConfig, check_overlap_forward, check_powersgd
from .training import TrainingConfig, check_compile

__all__ = ["Config", "FIELDS", "SHIPPED_DATA", "build_parser", "load_toml", "parse_config"]

SECTIONS = {"data": DataConfig, "training": TrainingConfig, "sync": SyncConfig,
            "output": OutputConfig, "failure": FailureConfig}
# setting name -> (section name, its dataclass field)
FIELDS = {f.name: (section, f) for section, kind in SECTIONS.items()
          for f in dataclasses.fields(kind)}
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
        """The effective config as TOML, readable back with ``--config``."""
        return "\n".join(f"{k} = {json.dumps(v)}" for k, v in self.to_dict().items()) + "\n"

    def summary(self) -> str:
        """One line of ``key=value`` for the startup log."""
        return " ".join(f"{k}={json.dumps(v)}" for k, v in self.to_dict().items())


def coerce_setting(name: str, value):
    """``value`` as the type of setting ``name``; raise MpicnnError for unknown names."""
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


def build_parser(prog: str = "python -m mpicnn.train") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, argument_default=argparse.SUPPRESS, allow_abbrev=False,
                     description="Train a CNN data-parallel over MPI. Launch with "
                                 "`mpirun -n N python -m mpicnn.train [options]`.")
    parser.add_argument("--version", action="version", version=f"mpicnn {__version__}")
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    for name, (_, f) in FIELDS.items():
        meta = f.metadata
        option = flag(name)
        default = meta.get("shown") or (f.default if not isinstance(f.default, tuple) else
                                         ",".join(map(str, f.default)))
        help_text = f"{meta['help']} (default: {default if default != '' else 'none'})"
        if type(f.default) is bool:
            groups[meta["group"]].add_argument(option, dest=name, nargs="?", const="true",
                                               metavar="BOOL", help=help_text)
            groups[meta["group"]].add_argument("--no-" + name.replace("_", "-"), dest=name,
                                               action="store_const", const="false",
                                               help=argparse.SUPPRESS)
        else:
            groups[meta["group"]].add_argument(option, dest=name, help=help_text,
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
    sections = {section: {} for section in SECTIONS}
    for name, value in values.items():
        value = coerce_setting(name, value)
        sections[FIELDS[name][0]][name] = value
    cfg = Config(**{section: SECTIONS[section](**settings)
                    for section, settings in sections.items()})
    cfg.validate()
    return cfg
