"""Optuna pruners of :func:`flatmin.tune.search` (this module imports Optuna).

``median`` compares a trial's *current* value with the median of the complete trials' values at
the same step. Optuna's own ``MedianPruner`` compares the trial's *best value so far*, which never
prunes under label noise: validation accuracy peaks early and falls as the network memorises the
noisy labels (digits-noisy40, SAM rho 0.02: 0.87 at epoch 6, 0.70 at epoch 80), so every trial's
early peak stays above the median of the final values. ``halving`` is Optuna's
``SuccessiveHalvingPruner`` (reduction factor 3, first rung at the warm-up). Neither is asked
before a seed's first ``warmup`` epochs (:class:`flatmin.tune.Reporter`).
"""

from __future__ import annotations

import statistics

import optuna
from optuna.trial import FrozenTrial, TrialState

from flatmin.tune.search import PRUNERS

__all__ = ["CurrentMedianPruner", "make_pruner"]


class CurrentMedianPruner(optuna.pruners.BasePruner):
    """Prune a trial whose value at this step is below the complete trials' median there.

    Args:
        n_startup_trials: complete trials needed before anything is pruned.
    """

    def __init__(self, n_startup_trials: int = 3) -> None:
        if n_startup_trials < 1:
            raise ValueError(f"Invalid n_startup_trials: {n_startup_trials} (expected >= 1)")
        self.n_startup_trials = n_startup_trials

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Whether ``trial`` is below the median at its last reported step."""
        step = trial.last_step
        if step is None:
            return False
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        others = [t.intermediate_values[step] for t in complete if step in t.intermediate_values]
        if len(others) < self.n_startup_trials:
            return False
        return trial.intermediate_values[step] < statistics.median(others)


def make_pruner(name: str, warmup: int) -> optuna.pruners.BasePruner:
    """The pruner ``name`` (one of :data:`PRUNERS`); ``warmup`` epochs set halving's first rung.

    Raises:
        ValueError: unknown name.
    """
    if name == "median":
        return CurrentMedianPruner()
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, warmup), reduction_factor=3
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"Invalid pruner: {name!r} (expected one of {', '.join(PRUNERS)})")
