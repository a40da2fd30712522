"""Argument checks shared by the public entry points; errors name the parameter and value."""

from __future__ import annotations

import math
import signal as _signal

__all__ = ["check_count", "check_seconds", "check_signal"]


def check_seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float of seconds, or raise naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number of seconds, got {value!r}")
    seconds = float(value)
    ok = math.isfinite(seconds) and (seconds >= 0 if allow_zero else seconds > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number of seconds {bound}, got {value!r}")
    return seconds


def check_count(
    name: str, value: object, *, minimum: int = 1, optional: bool = False
) -> int | None:
    """Return ``value`` as an int ``>= minimum`` (or ``None`` if ``optional``), else raise."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def check_signal(name: str, value: object) -> _signal.Signals:
    """Resolve a signal given as number, ``Signals`` or name (``"TERM"``, ``"SIGTERM"``)."""
    if isinstance(value, str):
        text = value.strip().upper()
        if text.isdigit():
            value = int(text)
        else:
            if not text.startswith("SIG"):
                text = "SIG" + text
            try:
                return _signal.Signals[text]
            except KeyError:
                raise ValueError(f"`{name}` must name a signal, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be a signal number or name, got {value!r}")
    try:
        return _signal.Signals(value)
    except ValueError:
        raise ValueError(f"`{name}` must be a valid signal number, got {value!r}") from None
