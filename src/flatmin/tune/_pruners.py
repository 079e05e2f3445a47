"""Optuna pruners of :func:`flatmin.tune.search` (this module imports Optuna).

``median`` compares a trial's *current* value with the median of the finished trials' values at
the same step. Optuna's own ``MedianPruner`` compares the trial's *best value so far*, which never
prunes under label noise: validation accuracy peaks early and falls as the network memorises the
noisy labels (digits-noisy40, SAM rho 0.02: 0.87 at epoch 6, 0.70 at epoch 80), so every trial's
early peak stays above the median of the final values. ``halving`` is Optuna's
``SuccessiveHalvingPruner`` (reduction factor 3, first rung at the warm-up). Neither is asked
before a seed's first ``warmup`` epochs (:class:`flatmin.tune.Reporter`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["CurrentMedianPruner", "make_pruner"]


class CurrentMedianPruner(optuna.pruners.BasePruner):
    """Prune a trial whose value at this step is below the other trials' median there.

    The other trials are the finished ones (complete or pruned) that reported this step. Pruned
    trials count: a trial stopped between seeds because it could not win has a whole seed's
    curve, and leaving it out would starve the pruner of comparisons (with few complete trials
    nothing would be pruned). Past a pruning point only the survivors report, so the median
    rises as a trial goes on, as in successive halving.

    Args:
        n_min_trials: values needed at a step before anything is pruned there.
    """

    def __init__(self, n_min_trials: int = 3) -> None:
        if n_min_trials < 1:
            raise ValueError(f"Invalid n_min_trials: {n_min_trials} (expected >= 1)")
        self.n_min_trials = n_min_trials

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Whether ``trial`` is below the median at its last reported step."""
        step = trial.last_step
        if step is None:
            return False
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        others = [t.intermediate_values[step] for t in finished if step in t.intermediate_values]
        if len(others) < self.n_min_trials:
            return False
        return trial.intermediate_values[step] < statistics.median(others)


#: The pruner of each name of :data:`flatmin.tune.search.PRUNERS`, built from the warm-up.
FACTORIES: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "median": lambda warmup: CurrentMedianPruner(),
    "halving": lambda warmup: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=max(1, warmup), reduction_factor=3
    ),
    "none": lambda warmup: optuna.pruners.NopPruner(),
}


def make_pruner(name: str, warmup: int) -> optuna.pruners.BasePruner:
    """The pruner ``name``; ``warmup`` epochs set halving's first rung.

    Raises:
        ValueError: unknown name.
    """
    if name not in FACTORIES:
        raise ValueError(f"Invalid pruner: {name!r} (expected one of {', '.join(FACTORIES)})")
    return FACTORIES[name](warmup)
