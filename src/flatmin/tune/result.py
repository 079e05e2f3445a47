"""What a search found: the stability score, one record per trial, and the best trial.

**Stability score.** Every trial trains its hyper-parameters on each of ``seeds`` and scores the
final validation values ``v_1 … v_K`` (one per seed) as

    score = mean(v) − spread_penalty · std(v)        (population std, ddof = 0)

With the default ``spread_penalty = 1`` and two seeds this is exactly the *worse* seed
(``mean − |v_1 − v_2| / 2 = min(v_1, v_2)``): a value can only win if every seed is good, never on
one lucky seed. ``spread_penalty = 0`` scores the plain mean. The best trial is the complete trial
with the highest score; ties go to the smaller spread, then to the earlier trial.

Example:
    >>> from flatmin.tune import stability_score
    >>> s = stability_score([0.97, 0.52])      # rho 1.0 on noisy digits: one lucky seed
    >>> round(s.mean, 3), round(s.value, 3)
    (0.745, 0.52)
    >>> stability_score([0.955, 0.955]).value  # a stable value beats it
    0.955
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from flatmin.tune.space import Param

__all__ = [
    "STATES",
    "Cost",
    "Score",
    "SeedRun",
    "TrialRecord",
    "TuneResult",
    "best_trial",
    "score_bound",
    "stability_score",
]

#: Trial states in a result: ``complete`` (every seed finished, scored), ``pruned`` (stopped
#: early by the pruner), ``failed`` (a seed diverged: non-finite value or ``TrialFailed``; a
#: result, not retried), ``interrupted`` (the process was killed or an exception escaped: not a
#: result; its hyper-parameters are tried again when the search resumes), ``running``.
STATES = ("complete", "pruned", "failed", "interrupted", "running")


@dataclass(frozen=True)
class Score:
    """A trial's stability score over its seeds (see the module docstring).

    Attributes:
        value: ``mean − spread_penalty · std``: what the search maximises.
        mean: mean of the per-seed values.
        std: population standard deviation (ddof = 0) of the per-seed values.
        min: the worst seed's value.
        max: the best seed's value.
        spread_penalty: the penalty the value was computed with.
    """

    value: float
    mean: float
    std: float
    min: float
    max: float
    spread_penalty: float

    def as_dict(self) -> dict[str, float]:
        """The score as plain JSON values."""
        return {
            "value": self.value,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "spread_penalty": self.spread_penalty,
        }


def check_spread_penalty(spread_penalty: float) -> float:
    """``spread_penalty`` as a float, or ``ValueError`` if it is negative or not finite."""
    if not (math.isfinite(spread_penalty) and spread_penalty >= 0):
        raise ValueError(f"Invalid spread_penalty: {spread_penalty} (expected finite >= 0)")
    return float(spread_penalty)


def stability_score(values: Sequence[float], spread_penalty: float = 1.0) -> Score:
    """Score per-seed values as ``mean − spread_penalty · std`` (population std).

    Raises:
        ValueError: no values, a non-finite value, or a negative / non-finite penalty.
    """
    penalty = check_spread_penalty(spread_penalty)
    if not values:
        raise ValueError("Invalid values: [] (expected at least one seed's value)")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"Invalid value: {bad[0]} (a seed's value must be finite)")
    mean = statistics.fmean(values)
    std = statistics.pstdev(values, mu=mean)
    return Score(mean - penalty * std, mean, std, min(values), max(values), penalty)


def score_bound(values: Sequence[float], n_seeds: int, spread_penalty: float = 1.0) -> float:
    """The highest score a trial can still reach after ``values`` of its ``n_seeds`` seeds.

    The score is concave in the missing values and symmetric in them, so its supremum has them
    all equal, ``x = m + d`` (``m`` the mean so far). With ``k`` known values (sum of squared
    deviations ``S``), ``r`` missing and ``K = k + r``::

        score(d) = m + (r/K)·d − λ·sqrt(S/K + k·r·d²/K²)

    For ``λ²·k > r`` this peaks at ``d* = (r/K)·sqrt(A / (B·(λ²·B − r²/K²)))`` with
    ``A = S/K``, ``B = k·r/K²``; for ``λ²·k = r`` it rises towards ``m``; for ``λ²·k < r`` it is
    unbounded (``inf``: nothing can be ruled out). Two seeds with ``λ = 1``: the first seed's
    value (the score is the worse seed).

    Raises:
        ValueError: no values, more values than seeds, a non-finite value or a bad penalty.
    """
    penalty = check_spread_penalty(spread_penalty)
    k = len(values)
    if not 1 <= k <= n_seeds:
        raise ValueError(f"Invalid values: {k} of {n_seeds} seeds (expected 1 to {n_seeds})")
    if k == n_seeds:
        return stability_score(values, penalty).value
    m = stability_score(values, 0.0).mean  # validates the values
    r, big_k = n_seeds - k, n_seeds
    a = sum((v - m) ** 2 for v in values) / big_k
    b, c = k * r / big_k**2, r / big_k
    lam2 = penalty**2
    if lam2 * k < r and not math.isclose(lam2 * k, r):
        return math.inf
    if math.isclose(lam2 * k, r):
        return m
    d = c * math.sqrt(a / (b * (lam2 * b - c**2)))
    return m + c * d - penalty * math.sqrt(a + b * d**2)


@dataclass(frozen=True)
class SeedRun:
    """One seed of one trial.

    Attributes:
        seed: the training seed.
        state: ``complete``, ``pruned``, ``failed`` or ``interrupted``.
        epochs: the epochs reported.
        values: the value reported at each of ``epochs``.
        final: the seed's value (what the training function returned, else the last reported
            value); ``None`` unless complete.
        seconds: wall time of the training function.
    """

    seed: int
    state: str
    epochs: tuple[int, ...]
    values: tuple[float, ...]
    final: float | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The run as plain JSON values."""
        return {
            "seed": self.seed,
            "state": self.state,
            "epochs": list(self.epochs),
            "values": list(self.values),
            "final": self.final,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeedRun:
        """The inverse of :meth:`as_dict` (JSON ``null`` values read back as NaN)."""
        return cls(
            int(d["seed"]),
            str(d["state"]),
            tuple(int(e) for e in d["epochs"]),
            tuple(math.nan if v is None else float(v) for v in d["values"]),
            None if d["final"] is None else float(d["final"]),
            float(d["seconds"]),
        )


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a search.

    Attributes:
        number: Optuna's trial number (0, 1, …).
        state: one of :data:`STATES`.
        params: the trial's hyper-parameters.
        runs: one :class:`SeedRun` per seed started, in order.
        score: the stability score (complete trials only).
        reason: why a trial failed or was interrupted.
        pruned_at: ``(seed, epoch)`` where the pruner stopped the trial.
        retry_of: the interrupted trial whose hyper-parameters this one runs again.
    """

    number: int
    state: str
    params: dict[str, float | int]
    runs: tuple[SeedRun, ...] = ()
    score: Score | None = None
    reason: str | None = None
    pruned_at: tuple[int, int] | None = None
    retry_of: int | None = None

    @property
    def seconds(self) -> float:
        """Wall time of the trial's training runs."""
        return sum(r.seconds for r in self.runs)

    @property
    def epochs(self) -> int:
        """Epochs trained over all seeds."""
        return sum(len(r.epochs) for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        """The trial as plain JSON values."""
        return {
            "number": self.number,
            "state": self.state,
            "params": dict(self.params),
            "score": None if self.score is None else self.score.as_dict(),
            "values": {str(r.seed): r.final for r in self.runs if r.final is not None},
            "reason": self.reason,
            "pruned_at": None
            if self.pruned_at is None
            else {"seed": self.pruned_at[0], "epoch": self.pruned_at[1]},
            "retry_of": self.retry_of,
            "seconds": self.seconds,
            "epochs": self.epochs,
            "runs": [r.as_dict() for r in self.runs],
        }


def best_trial(trials: Sequence[TrialRecord]) -> TrialRecord | None:
    """The complete trial with the highest score (ties: smaller spread, then earlier trial)."""
    scored = [t for t in trials if t.state == "complete" and t.score is not None]
    if not scored:
        return None

    def key(t: TrialRecord) -> tuple[float, float, int]:
        assert t.score is not None  # filtered above; narrows the type for mypy
        return (t.score.value, -t.score.std, -t.number)

    return max(scored, key=key)


@dataclass(frozen=True)
class Cost:
    """What a search trained.

    A grid of ``G`` values costs about ``G · len(seeds)`` full runs, i.e.
    ``G · len(seeds) · full_run_epochs`` epochs.

    Attributes:
        seconds: wall time of every training run.
        epochs: epochs trained over every trial and seed.
        runs: seed runs started.
        full_run_epochs: epochs of a run that trained its whole budget (``None``: none did).
        full_run_seconds: median wall time of such a run.
    """

    seconds: float
    epochs: int
    runs: int
    full_run_epochs: int | None
    full_run_seconds: float | None


@dataclass(frozen=True)
class TuneResult:
    """The state of a search: every trial so far and the best one.

    Attributes:
        trials: every started trial, by number.
        best: :func:`best_trial` of ``trials`` (``None`` before the first complete trial).
        space: the search space.
        seeds: the training seeds of every trial.
        spread_penalty: the stability score's penalty on the seeds' spread.
        n_trials: the number of finished trials the search aims for.
        pruner: the pruner's name.
        config: settings that identify the search (stored with the study).
    """

    trials: tuple[TrialRecord, ...]
    space: tuple[Param, ...]
    seeds: tuple[int, ...]
    spread_penalty: float
    n_trials: int
    pruner: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> TrialRecord | None:
        """The best complete trial (see :func:`best_trial`)."""
        return best_trial(self.trials)

    def count(self, state: str) -> int:
        """Number of trials in ``state``."""
        return sum(t.state == state for t in self.trials)

    @property
    def finished(self) -> int:
        """Trials that count towards ``n_trials``: complete, pruned or failed."""
        return sum(t.state in ("complete", "pruned", "failed") for t in self.trials)

    def cost(self) -> Cost:
        """What the search trained, and what one full training run costs."""
        full = [r for t in self.trials for r in t.runs if r.state == "complete"]
        return Cost(
            seconds=sum(t.seconds for t in self.trials),
            epochs=sum(t.epochs for t in self.trials),
            runs=sum(len(t.runs) for t in self.trials),
            full_run_epochs=max((len(r.epochs) for r in full), default=None),
            full_run_seconds=statistics.median(r.seconds for r in full) if full else None,
        )

    def as_dict(self) -> dict[str, Any]:
        """The result as plain JSON values (what ``tune.json`` holds)."""
        best = self.best
        return {
            "schema": 1,
            "objective": (
                f"mean - {self.spread_penalty:g} x std (ddof=0) over seeds {list(self.seeds)} of "
                "each seed's final value; ties: smaller std, then earlier trial"
            ),
            "config": self.config,
            "space": [p.as_dict() for p in self.space],
            "seeds": list(self.seeds),
            "spread_penalty": self.spread_penalty,
            "pruner": self.pruner,
            "n_trials": self.n_trials,
            "counts": {s: self.count(s) for s in STATES},
            "best": None if best is None else best.as_dict(),
            "cost": asdict(self.cost()),
            "trials": [t.as_dict() for t in self.trials],
        }
