"""Argument checks shared by the public API: a TypeError or ValueError whose message
starts with `label` (how the caller names the argument, e.g. "`sparsity`")."""
from __future__ import annotations

import math
import numbers

import torch


def real(label: str, value, *, low=-math.inf, high=math.inf, low_open=False, high_open=False) -> float:
    """`value` as a finite float within the bounds. No argument of this library means
    anything at ±inf (an infinite lr or λ was accepted, then turned the first step's
    weights or multipliers into inf / NaN), and NaN is never within bounds."""
    value = finite(label, value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        if high == math.inf:  # one-sided: "[0, inf]" read as if inf were allowed
            bound = (">" if low_open else ">=") + f" {low:g}"
        elif low == -math.inf:
            bound = ("<" if high_open else "<=") + f" {high:g}"
        else:
            bound = "in " + ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
        raise ValueError(f"{label} must be {bound}, got {value}")
    return value


def finite(label: str, value) -> float:
    """`value` as a float; any finite real number. Under torch.compile the value may be a
    symbolic float (a dynamic float, e.g. an annealed β): returned unchecked, since
    math.isfinite on it broke the graph (fullgraph=True failed); eager calls check it."""
    if torch.compiler.is_compiling():
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{label} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{label} must be finite, got an int of {int(value).bit_length()} bits") from None
    if not math.isfinite(value):
        raise ValueError(f"{label} must be finite, got {value}")
    return value


def integer(label: str, value, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{label} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{label} must be >= {low}, got {value}")
    return int(value)


def boolean(label: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{label} must be a bool, got {type(value).__name__}")
    return value


def choice(label: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{label} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{label} must be one of {sorted(choices)}, got {value!r}")
    return value


def first_few(items: list[str], shown: int = 3) -> str:
    """The first `shown` items, comma-separated, then how many more (for error messages)."""
    text = ", ".join(items[:shown])
    return text if len(items) <= shown else f"{text} and {len(items) - shown} more"
