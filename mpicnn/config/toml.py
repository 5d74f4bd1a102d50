"""Settings as TOML: reading a ``--config`` file, writing one that reads back the same."""
from __future__ import annotations

import math
import textwrap
import tomllib

from ..cluster.errors import MpicnnError

# characters a TOML basic string must escape (besides \ and "): controls other than tab
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def load_toml(path: str) -> dict:
    """Read a TOML file of settings (parsed as data, never evaluated) as one flat table."""
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


def dump_toml(sections: dict[str, list[tuple[str, object, str]]], title: str) -> str:
    """``{section: [(key, value, comment)]}`` as TOML, each key under its comment."""
    out = [f"# {line}" for line in title.splitlines()]
    for section, settings in sections.items():
        out += ["", f"[{section}]"]
        for key, value, comment in settings:
            out += textwrap.wrap(comment, 88, initial_indent="# ", subsequent_indent="# ")
            out.append(f"{key} = {toml_value(value)}")
    return "\n".join(out) + "\n"


def toml_value(value) -> str:
    """One value as TOML that ``tomllib`` reads back equal (floats exactly, inf and nan too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or
                                                 ord(c) == 0x7F else c) for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")
