"""One validation of method hyper-parameters, shared by every method in this package.

A NaN or infinite weight passes ``x >= 0``-style checks in one direction or the other and then
poisons every loss or aggregation weight it touches, so every number is checked for being a
real, finite number first and for its range second. Errors name the method and the parameter.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def check_number(method: str, name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False) -> float:
    """``value`` as a float if it is a finite number (an int when ``integer``) in the range
    [low, high] (open ends with ``low_open`` / ``high_open``); else ValueError naming it."""
    kind = "an integer" if integer else "a finite number"
    allowed = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed) or not math.isfinite(value):
        raise ValueError(f"{method}: {name} must be {kind}{_range(low, high, low_open, high_open)}, "
                         f"got {value!r}")
    if ((low is not None and (value < low or (low_open and value == low)))
            or (high is not None and (value > high or (high_open and value == high)))):
        raise ValueError(f"{method}: {name} must be {kind}{_range(low, high, low_open, high_open)}, "
                         f"got {value!r}")
    return float(value)


def check_choice(method: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``; else ValueError naming the parameter."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{method}: {name} must be one of {choices}, got {value!r}")
    return value


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return (" " + " and ".join(parts)) if parts else ""
