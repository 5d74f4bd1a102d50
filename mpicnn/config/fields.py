"""What a setting is (a dataclass field with help, group and choices) and checks of its value."""
from __future__ import annotations

from dataclasses import Field, field
from typing import Any

from ..cluster.errors import MpicnnError

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
OFF = "off"                      # the one word for "off" in flags, TOML and --help
OFF_WORDS = (OFF, "none", "")    # what a setting that can be off takes for it


def opt(default, help, group, choices=None, metavar=None, *, off=None, aliases=(),
        default_text=None):
    """A setting with its help text, ``--help`` group and allowed values.

    ``off``: the value that turns it off (``0``, ``-1``, ``""``, ``"none"``), which ``off``
    and the older spellings in ``OFF_WORDS`` also give. ``aliases``: former names, still
    read from flags and TOML. ``default_text``: the default as ``--help`` shows it.
    """
    return field(default=default, metadata={"help": help, "group": group, "choices": choices,
                                            "metavar": metavar, "off": off,
                                            "aliases": tuple(aliases),
                                            "default_text": default_text})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def can_be_off(f: Field) -> bool:
    return f.metadata.get("off") is not None


def shown(f: Field, value) -> str:
    """``value`` of setting ``f`` as ``--help`` and error messages spell it."""
    if can_be_off(f) and value == f.metadata["off"]:
        return OFF
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def coerce(f: Field, value: Any):
    """Convert ``value`` to the type of setting ``f``; raise MpicnnError on mismatch."""
    kind = type(f.default)
    if can_be_off(f) and isinstance(value, str) and value.strip().lower() in OFF_WORDS:
        return f.metadata["off"]
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in TRUE + FALSE:
                    raise ValueError
                value = lowered in TRUE
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
        elif kind is str and not isinstance(value, str):
            raise ValueError
    except (ValueError, TypeError):
        expected = kind.__name__ + (f" or {OFF}" if can_be_off(f) else "")
        raise MpicnnError(f"{flag(f.name)}: expected {expected}, got {value!r}",
                          collective=True) from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise MpicnnError(f"{flag(f.name)}: invalid choice {value!r}; choose from "
                          f"{', '.join(shown(f, c) for c in choices)}", collective=True)
    return value


def must(condition: bool, message: str) -> None:
    """Reject a setting (on every rank alike) unless ``condition`` holds."""
    if not condition:
        raise MpicnnError(message, collective=True)


def at_least(minimum: int, section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        must(value >= minimum, f"{flag(name)} must be at least {minimum}, got {value}")


def non_negative(section, *names: str, hint: str = "") -> None:
    for name in names:      # ">= 0" is False for NaN: rejected too
        must(getattr(section, name) >= 0,
             f"{flag(name)} must not be negative" + (f" ({hint})" if hint else ""))
