"""Search spaces: one :class:`Param` per hyper-parameter, and presets for the SAM family.

A search space is a tuple of :class:`Param`. The presets (:data:`SPACES`, :func:`family_space`)
cover what each method of the family has: the radius ``rho`` on a log scale (SAM's literature
default 0.05 and ASAM's 0.5–2 were tuned for CIFAR ResNets; under label noise the best SAM rho can
be 0.5), ASAM's ``eta``, LookSAM's ``alpha`` and ``k``, and the averaging ``start`` (a fraction of
the epoch budget).

The first trials of a search are spread over the space by a Halton sequence
(:func:`startup_points`) instead of drawn at random: with a dozen trials, four random draws of
rho can land in one decade and leave the other unexplored.

Example:
    >>> from flatmin.tune import Param, family_space
    >>> [p.name for p in family_space("looksam")]
    ['rho', 'alpha', 'k']
    >>> Param("rho", 0.01, 2.0, log=True).value_at(0.5)  # the geometric middle
    0.1414...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SPACES", "Param", "family_space", "startup_points"]


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a search: a range, on a log or linear scale, real or integer.

    Attributes:
        name: the keyword the training function receives.
        low: smallest value (inclusive).
        high: largest value (inclusive).
        log: sample ``log(value)`` uniformly (``rho``, ``eta``); needs ``low > 0``.
        integer: an integer parameter (LookSAM's ``k``).

    Raises:
        ValueError: an empty or non-finite range, or ``log`` with ``low <= 0``.
    """

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"Invalid parameter name: {self.name!r} (expected an identifier)")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(
                f"Invalid range for {self.name}: [{self.low}, {self.high}] (expected finite "
                "low < high)"
            )
        if self.log and self.low <= 0:
            raise ValueError(f"Invalid range for {self.name}: low {self.low} (log scale: > 0)")
        if self.integer and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(
                f"Invalid range for {self.name}: [{self.low}, {self.high}] (integer parameter)"
            )

    def suggest(self, trial: Any) -> float | int:
        """Draw this parameter in an Optuna trial (``suggest_float`` / ``suggest_int``)."""
        if self.integer:
            return int(trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log))
        return float(trial.suggest_float(self.name, self.low, self.high, log=self.log))

    def value_at(self, u: float) -> float | int:
        """The value at quantile ``u`` in [0, 1] of the range (on its scale)."""
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        if self.integer:
            return int(min(self.high, max(self.low, round(value))))
        return min(self.high, max(self.low, value))

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the range (and is whole for an integer parameter)."""
        if self.integer and value != int(value):
            return False
        return self.low <= value <= self.high

    def widened(self, values: Sequence[float]) -> Param:
        """This parameter with its range stretched to include ``values`` (e.g. a grid)."""
        if not values:
            return self
        return Param(
            self.name, min(self.low, *values), max(self.high, *values), self.log, self.integer
        )

    def as_dict(self) -> dict[str, Any]:
        """The parameter as plain JSON values."""
        return {
            "name": self.name,
            "low": self.low,
            "high": self.high,
            "log": self.log,
            "integer": self.integer,
        }


_RHO = Param("rho", 0.01, 2.0, log=True)
_ASAM_RHO = Param("rho", 0.05, 5.0, log=True)
_ETA = Param("eta", 1e-3, 0.1, log=True)
_START = Param("start", 0.5, 0.9)
_ALPHA = Param("alpha", 0.1, 0.9)
_K = Param("k", 2, 10, integer=True)

#: Preset spaces of the SAM family, by method name.
SPACES: Mapping[str, tuple[Param, ...]] = {
    "sam": (_RHO,),
    "asam": (_ASAM_RHO, _ETA),
    "esam": (_RHO,),
    "samk": (_RHO, _K),
    "looksam": (_RHO, _ALPHA, _K),
    "swa": (_START,),
    "wasam": (_RHO, _START),
}


def family_space(method: str) -> tuple[Param, ...]:
    """The preset search space of ``method`` (a key of :data:`SPACES`).

    Raises:
        ValueError: unknown method (the message lists the presets).
    """
    try:
        return SPACES[method]
    except KeyError:
        raise ValueError(f"Unknown method: {method!r} (presets: {', '.join(SPACES)})") from None


_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)


def _radical_inverse(i: int, base: int) -> float:
    """The van der Corput radical inverse of ``i`` in ``base`` (1 → 1/2, 2 → 1/4, 3 → 3/4 …)."""
    u, f = 0.0, 1.0 / base
    while i > 0:
        i, digit = divmod(i, base)
        u += digit * f
        f /= base
    return u


def startup_points(space: Sequence[Param], n: int) -> list[dict[str, float | int]]:
    """``n`` points spread over ``space`` by a Halton sequence (one prime base per parameter).

    In one dimension the quantiles are 1/2, 1/4, 3/4, 1/8, …: each new point halves the largest
    gap left, so a handful of startup trials cover the whole log range of rho.

    Raises:
        ValueError: more than 10 parameters (the Halton bases run out) or ``n < 0``.
    """
    if len(space) > len(_PRIMES):
        raise ValueError(f"Invalid space: {len(space)} parameters (at most {len(_PRIMES)})")
    if n < 0:
        raise ValueError(f"Invalid number of startup points: {n} (expected >= 0)")
    return [
        {p.name: p.value_at(_radical_inverse(i, b)) for p, b in zip(space, _PRIMES)}
        for i in range(1, n + 1)
    ]
