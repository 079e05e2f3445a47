"""Scalar validators shared by the SAM family: one message shape, ``Invalid rho: -0.1 (...)``.

They are cheap (a few ``isinstance`` checks and comparisons), so the optimizers run them on every
param group each step: a scheduler that sets ``rho`` to ``-0.5`` or NaN fails at the step that
would use it, naming the value, instead of silently descending or turning the weights into NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "GroupCheck",
    "check_bool",
    "check_fraction",
    "check_int",
    "check_nonneg",
    "check_p",
    "check_positive_int",
    "check_real",
]

#: ``check(name, value)``: raises ``TypeError`` / ``ValueError`` naming the value.
GroupCheck = Callable[[str, Any], Any]


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """Return ``value`` as a float after checking its type, finiteness and range.

    Raises:
        TypeError: ``value`` is not an ``int`` / ``float`` (``bool`` is rejected).
        ValueError: NaN, infinite (unless ``allow_inf``) or outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r} (expected a float)")
    v = float(value)
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if math.isnan(v) or (math.isinf(v) and not allow_inf) or too_low or too_high:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        bound = " and ".join(parts)
        finite = "" if allow_inf else "a finite value"
        expected = " ".join(s for s in (finite, bound) if s) or "a number"
        raise ValueError(f"Invalid {name}: {value} (expected {expected})")
    return v


def check_int(name: str, value: Any, *, low: int = 0) -> int:
    """Return ``value`` after checking that it is an ``int >= low`` (``bool`` is rejected).

    Raises:
        TypeError: Not an ``int``.
        ValueError: Smaller than ``low``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: {value!r} (expected an int >= {low})")
    if value < low:
        raise ValueError(f"Invalid {name}: {value} (expected an int >= {low})")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` after checking that it is a ``bool``.

    Raises:
        TypeError: Not a ``bool``.
    """
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r} (expected a bool)")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """``check_int(name, value, low=1)``: a count such as ``k`` or ``steps``."""
    return check_int(name, value, low=1)


def check_fraction(name: str, value: Any) -> float:
    """A float in ``(0, 1]``: a probability or a fraction of a batch."""
    return check_real(name, value, low=0.0, high=1.0, low_open=True)


def check_nonneg(name: str, value: Any) -> float:
    """A finite float ``>= 0`` (``rho``, ``eta``, ``alpha``, ...)."""
    return check_real(name, value, low=0.0)


def check_p(name: str, value: Any) -> float:
    """The ℓp exponent: a float ``> 1`` or ``math.inf``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r} (expected a float > 1 or math.inf)")
    if math.isnan(value) or value <= 1:
        raise ValueError(f"Invalid {name}: {value} (expected p > 1, or math.inf)")
    return float(value)
