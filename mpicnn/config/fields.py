"""What a setting is (a dataclass field with help, group and choices) and checks of its value."""
from __future__ import annotations

from dataclasses import Field, field
from typing import Any

from ..cluster.errors import MpicnnError

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def opt(default, help, group, choices=None, metavar=None, shown=None):
    """A setting with its help text, ``--help`` group and allowed values; ``shown``: the
    default as ``--help`` names it, where the value itself says little (a path)."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices,
                                            "metavar": metavar, "shown": shown})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def coerce(f: Field, value: Any):
    """Convert ``value`` to the type of setting ``f``; raise MpicnnError on mismatch."""
    kind = type(f.default)
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
        raise MpicnnError(f"{flag(f.name)}: expected {kind.__name__}, got {value!r}",
                          collective=True) from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise MpicnnError(f"{flag(f.name)}: invalid choice {value!r}; choose from "
                          f"{', '.join(choices)}", collective=True)
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
