"""Choose rho for the user: a pruned, resumable search over the SAM family's hyper-parameters.

Point :func:`search` at your own training function; it trains each trial's hyper-parameters on
several seeds, reports the validation value per epoch (Optuna stops clearly worse trials early)
and scores a trial by ``mean − spread_penalty · std`` over the seeds, so a value whose seeds
disagree never wins on one lucky seed. :func:`suggest_hyper` does the same on the benchmark's
tasks (``flatmin tune``). Needs the ``tune`` extra (``pip install 'flatmin[tune]'``: Optuna);
importing this package does not import Optuna.

Example:
    >>> import math
    >>> from flatmin.tune import Param, search
    >>> def train_fn(params, seed, report):  # yours: train, report validation accuracy
    ...     for epoch in range(1, 4):
    ...         report(epoch, 1 - math.log10(params["rho"] / 0.3) ** 2 * epoch / 3)
    >>> result = search(train_fn, [Param("rho", 0.01, 2.0, log=True)], n_trials=12)
    >>> round(result.best.params["rho"], 1), result.count("complete") + result.count("pruned")
    (0.3, 12)

See ``docs/tune.md``.
"""

from flatmin.tune.bench import NoTrialCompleted, bench_space, bench_train_fn, suggest_hyper
from flatmin.tune.report import plot_search, write_result
from flatmin.tune.result import Cost, Score, SeedRun, TrialRecord, TuneResult, stability_score
from flatmin.tune.search import (
    Reporter,
    StudyConflictError,
    TrainFn,
    TrialFailed,
    search,
)
from flatmin.tune.space import SPACES, Param, family_space, startup_points

__all__ = [
    "SPACES",
    "Cost",
    "NoTrialCompleted",
    "Param",
    "Reporter",
    "Score",
    "SeedRun",
    "StudyConflictError",
    "TrainFn",
    "TrialFailed",
    "TrialRecord",
    "TuneResult",
    "bench_space",
    "bench_train_fn",
    "family_space",
    "plot_search",
    "search",
    "stability_score",
    "startup_points",
    "suggest_hyper",
    "write_result",
]
