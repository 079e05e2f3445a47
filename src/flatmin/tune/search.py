"""The search: Optuna's TPE over a :class:`~flatmin.tune.Param` space, pruned, resumable.

Protocol::

    for each trial (the first ones spread by a Halton sequence, then TPE):
        params = one value per Param
        for seed in seeds:                          # 100, 101, … (not evaluation seeds)
            v[seed] = train_fn(params, seed, report)   # report(epoch, value) once per epoch
        score = mean(v) − spread_penalty · std(v)   # see flatmin.tune.result

``report(epoch, value)`` passes the value to Optuna at step ``offset(seed) + epoch`` (the seeds'
epochs follow each other, so every trial is compared with the others on the same seed and
epoch) and raises ``optuna.TrialPruned`` when the pruner says the trial is clearly worse than the
finished ones; never during the first ``warmup`` epochs of a seed. Between seeds, a trial that
can no longer win is stopped too: when even the best values of its remaining seeds would leave
its score below the best complete trial's (:func:`~flatmin.tune.result.score_bound`; with two
seeds and ``spread_penalty = 1``: its first seed is below the best score). This stop is exact,
it never drops a trial that could have won; ``pruner="none"`` turns both off.

Resume: with ``out``, the study lives in ``out/study.db`` (SQLite, study name
:data:`STUDY_NAME`). ``n_trials`` counts the finished trials of the study (complete, pruned,
failed), so a rerun with the same arguments only runs what is missing; a trial the killed
process left running is marked ``interrupted`` and its hyper-parameters are tried again first.
One search process per directory (a lock file, ``out/study.lock``, refuses a second). The
result is rewritten atomically to ``out/tune.json`` after every trial.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatmin._io import finite_json
from flatmin.tune._study import STUDY_NAME, StudyConflictError, best_score, collect, open_study
from flatmin.tune.result import (
    SeedRun,
    TuneResult,
    check_spread_penalty,
    score_bound,
    stability_score,
)
from flatmin.tune.space import Param, startup_points

if TYPE_CHECKING:  # Optuna is optional: imported when a search starts
    import optuna

__all__ = [
    "INSTALL_HINT",
    "PRUNERS",
    "RESULT_FILE",
    "STUDY_NAME",
    "Reporter",
    "StudyConflictError",
    "TrainFn",
    "TrialFailed",
    "resolve_seeds",
    "search",
]

PRUNERS = ("median", "halving", "none")
RESULT_FILE = "tune.json"
#: First tuning seed: the benchmark evaluates on seeds 0, 1, …, so tuning never sees them.
FIRST_SEED = 100
INSTALL_HINT = "pip install 'flatmin[tune]'"


class TrialFailed(RuntimeError):
    """Raise from a training function to record its trial as failed (e.g. the loss diverged).

    A failed trial is a result (the hyper-parameters do not train), not retried on resume.
    """


def import_optuna() -> Any:
    """Import Optuna, or raise ``ImportError`` with the install command."""
    try:
        import optuna
    except ImportError as exc:
        raise ImportError(f"flatmin.tune needs Optuna: {INSTALL_HINT}") from exc
    return optuna


class Reporter:
    """What a training function calls once per epoch: ``report(epoch, value)``.

    Attributes:
        number: the trial's number.
        seed: the seed being trained.
        params: the trial's hyper-parameters.
        epochs: the epochs reported so far (this seed).
        values: the values reported so far (this seed).
    """

    def __init__(
        self,
        trial: optuna.Trial,
        seed: int,
        params: Mapping[str, float | int],
        offset: int,
        warmup: int,
        on_report: Callable[[Reporter], None] | None = None,
    ) -> None:
        self._trial, self._offset, self._warmup, self._on_report = trial, offset, warmup, on_report
        self.number: int = trial.number
        self.seed = seed
        self.params = dict(params)
        self.epochs: list[int] = []
        self.values: list[float] = []

    @property
    def next_offset(self) -> int:
        """Where the next seed's steps start (after this seed's last step)."""
        return self._offset + (self.epochs[-1] + 1 if self.epochs else 0)

    def __call__(self, epoch: int, value: float) -> None:
        """Report ``value`` (to maximise, e.g. validation accuracy) after ``epoch``.

        Raises:
            optuna.TrialPruned: the pruner stops the trial (let it propagate).
            TrialFailed: ``value`` is NaN or infinite.
            ValueError: ``epoch`` is negative or not after the previous one.
        """
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise ValueError(f"Invalid epoch: {epoch!r} (expected an integer >= 0)")
        if self.epochs and epoch <= self.epochs[-1]:
            raise ValueError(f"Invalid epoch: {epoch} (expected > {self.epochs[-1]})")
        value = float(value)
        self.epochs.append(int(epoch))
        self.values.append(value)
        if not math.isfinite(value):
            raise TrialFailed(f"seed {self.seed}: non-finite value {value} at epoch {epoch}")
        self._trial.report(value, self._offset + int(epoch))
        if self._on_report is not None:
            self._on_report(self)
        if len(self.epochs) > self._warmup and self._trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"seed {self.seed}, epoch {epoch}: {value:.4g}")


#: ``train_fn(params, seed, report)``: train one seed with ``params``, call
#: ``report(epoch, value)`` per epoch, return the final value (``None``: the last reported one).
TrainFn = Callable[[dict[str, float | int], int, Reporter], float | None]


def resolve_seeds(seeds: int | Sequence[int]) -> tuple[int, ...]:
    """``K`` → ``(100, …, 100 + K − 1)``; a sequence is kept (distinct integers).

    Raises:
        ValueError: ``K < 1``, an empty sequence or repeated seeds.
        TypeError: not an integer or a sequence of integers.
    """
    if isinstance(seeds, bool):
        raise TypeError(f"Invalid seeds: {seeds!r} (expected an int or a sequence of ints)")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"Invalid seeds: {seeds} (expected >= 1)")
        return tuple(range(FIRST_SEED, FIRST_SEED + seeds))
    out = tuple(seeds)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"Invalid seeds: {list(out)} (expected distinct seeds, at least one)")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in out):
        raise TypeError(f"Invalid seeds: {list(out)} (expected integers)")
    return out


def _check_space(space: Sequence[Param]) -> tuple[Param, ...]:
    space = tuple(space)
    if not space:
        raise ValueError("Invalid space: () (expected at least one Param)")
    for p in space:
        if not isinstance(p, Param):
            raise TypeError(f"Invalid space entry: {p!r} (expected a flatmin.tune.Param)")
    names = [p.name for p in space]
    if len(set(names)) != len(names):
        raise ValueError(f"Invalid space: repeated names {names}")
    return space


def _check_initial(
    initial: Sequence[Mapping[str, float]], space: tuple[Param, ...]
) -> list[dict[str, float]]:
    by_name = {p.name: p for p in space}
    points = []
    for point in initial:
        for name, value in point.items():
            if name not in by_name:
                raise ValueError(f"Invalid initial point: unknown parameter {name!r} in {point}")
            if not by_name[name].contains(value):
                p = by_name[name]
                raise ValueError(
                    f"Invalid initial point: {name}={value} (outside [{p.low}, {p.high}])"
                )
        points.append(dict(point))
    return points


def search(
    train_fn: TrainFn,
    space: Sequence[Param],
    *,
    n_trials: int = 12,
    seeds: int | Sequence[int] = 2,
    out: str | os.PathLike[str] | None = None,
    pruner: str | optuna.pruners.BasePruner = "median",
    warmup: int = 0,
    timeout: float | None = None,
    spread_penalty: float = 1.0,
    initial: Sequence[Mapping[str, float]] = (),
    n_startup: int | None = None,
    sampler_seed: int = 0,
    config: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> TuneResult:
    """Search ``space`` for the hyper-parameters that ``train_fn`` trains best on every seed.

    Args:
        train_fn: ``train_fn(params, seed, report) -> value | None``: trains with ``params`` (a
            dict, one entry per :class:`Param`) from ``seed``, calls ``report(epoch, value)``
            once per epoch with the validation value to maximise, and returns the seed's final
            value (``None``: the last reported one). Let ``optuna.TrialPruned`` from ``report``
            propagate; raise :class:`TrialFailed` when training diverges.
        space: the hyper-parameters (e.g. :func:`flatmin.tune.family_space`).
        n_trials: finished trials (complete, pruned or failed) the study should hold; a resumed
            search runs only the missing ones.
        seeds: ``K`` (seeds 100 … 100 + K − 1, disjoint from evaluation seeds) or the seeds.
        out: directory of the resumable study (``study.db``) and of ``tune.json``; ``None``:
            in memory, nothing written.
        pruner: ``"median"``, ``"halving"``, ``"none"`` or an Optuna pruner.
        warmup: epochs of every seed before the pruner is asked.
        timeout: seconds after which no new trial starts (the running one finishes).
        spread_penalty: the score is ``mean − spread_penalty · std`` over the seeds.
        initial: points to try first (e.g. the literature's default rho).
        n_startup: trials spread over the space before TPE models it (default: a third of
            ``n_trials``, between 3 and 10).
        sampler_seed: seed of the TPE sampler.
        config: settings that identify the search (a resume with other settings is refused).
        progress: a tqdm progress bar on stderr.

    Returns:
        The :class:`TuneResult`, with ``best`` the highest-scoring complete trial.

    Raises:
        ValueError: bad arguments.
        StudyConflictError: ``out`` holds a search with other settings, or another search is
            running there (a ``ValueError``).
        ImportError: Optuna is not installed.
    """
    optuna = import_optuna()
    space = _check_space(space)
    seed_list = resolve_seeds(seeds)
    penalty = check_spread_penalty(spread_penalty)
    _check_counts(n_trials, warmup, timeout)
    points = _check_initial(initial, space)
    n_startup = _startup_count(n_startup, n_trials, len(points))
    pruner_obj = _pruner(pruner, warmup)
    identity = {
        "space": [p.as_dict() for p in space],
        "seeds": list(seed_list),
        "spread_penalty": penalty,
        **(config or {}),
    }
    result_args = {
        "space": space,
        "seeds": seed_list,
        "spread_penalty": penalty,
        "n_trials": n_trials,
        "pruner": pruner if isinstance(pruner, str) else type(pruner).__name__,
        "config": dict(config or {}),
    }
    out_dir = None if out is None else _make_out(Path(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=n_startup, seed=sampler_seed, multivariate=len(space) > 1
        )
    startup = points + startup_points(space, n_startup - len(points))
    with open_study(out_dir, sampler, pruner_obj, identity, startup) as study:
        objective = _Objective(
            study, train_fn, space, seed_list, penalty, warmup,
            stop_hopeless=not isinstance(pruner_obj, optuna.pruners.NopPruner),
        )  # fmt: skip
        return _run(study, objective, n_trials, timeout, out_dir, result_args, progress)


def _startup_count(n_startup: int | None, n_trials: int, n_points: int) -> int:
    """Trials spread over the space before TPE (default: a third of ``n_trials``, 3 to 10)."""
    if n_startup is None:
        return max(n_points, min(n_trials, max(3, min(10, n_trials // 3))))
    if n_startup < n_points:
        raise ValueError(f"Invalid n_startup: {n_startup} (< {n_points} initial points)")
    return n_startup


def _make_out(out: Path) -> Path:
    """``out``, created if missing (``StudyConflictError``: a file is there)."""
    if out.exists() and not out.is_dir():
        raise StudyConflictError(f"Invalid out: {str(out)!r} (not a directory)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_counts(n_trials: int, warmup: int, timeout: float | None) -> None:
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"Invalid n_trials: {n_trials!r} (expected an integer >= 1)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"Invalid warmup: {warmup!r} (expected an integer >= 0)")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"Invalid timeout: {timeout} (expected > 0 seconds)")


def _pruner(pruner: str | optuna.pruners.BasePruner, warmup: int) -> optuna.pruners.BasePruner:
    """The pruner named ``pruner`` (one of :data:`PRUNERS`), or ``pruner`` itself."""
    import optuna

    if isinstance(pruner, str):
        if pruner not in PRUNERS:
            raise ValueError(f"Invalid pruner: {pruner!r} (expected one of {', '.join(PRUNERS)})")
        from flatmin.tune._pruners import make_pruner  # imports Optuna

        return make_pruner(pruner, warmup)
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise TypeError(f"Invalid pruner: {pruner!r} (expected a name or an Optuna pruner)")
    return pruner


def _finish(
    trial: Any, runs: list[dict[str, Any]], rep: Reporter, state: str, final: float | None,
    t0: float,
) -> None:  # fmt: skip
    """Record seed ``rep.seed``'s run (``state``, ``final`` value) in the trial's attributes."""
    run = SeedRun(rep.seed, state, tuple(rep.epochs), tuple(rep.values), final,
                  time.perf_counter() - t0)  # fmt: skip
    # Strict JSON (NaN → null): Optuna stores user attributes as JSON.
    runs.append(finite_json(run.as_dict())[0])
    trial.set_user_attr("runs", runs)
    trial.set_user_attr("outcome", state)


class _Objective:
    """Optuna's objective: a trial trains every seed in turn and returns its stability score.

    ``on_report`` (set by :func:`_run`) sees every :class:`Reporter` call.
    """

    def __init__(
        self, study: Any, train_fn: TrainFn, space: tuple[Param, ...], seeds: tuple[int, ...],
        penalty: float, warmup: int, *, stop_hopeless: bool,
    ) -> None:  # fmt: skip
        self.study, self.train_fn, self.space, self.seeds = study, train_fn, space, seeds
        self.penalty, self.warmup, self.stop_hopeless = penalty, warmup, stop_hopeless
        self.on_report: Callable[[Reporter], None] | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        params = {p.name: p.suggest(trial) for p in self.space}
        runs: list[dict[str, Any]] = []
        offset = 0
        for seed in self.seeds:
            if runs and self.stop_hopeless:
                self._stop_if_hopeless(trial, runs)
            rep = Reporter(trial, seed, params, offset, self.warmup, self.on_report)
            if not self._train_seed(trial, rep, params, runs):
                return math.nan  # Optuna records a NaN objective as a failed trial
            offset = rep.next_offset
        score = stability_score([r["final"] for r in runs], self.penalty)
        trial.set_user_attr("score", score.as_dict())
        return score.value

    def _stop_if_hopeless(self, trial: optuna.Trial, runs: list[dict[str, Any]]) -> None:
        """Prune the trial when its best possible score is below the best complete trial's."""
        import optuna

        finals = [r["final"] for r in runs]
        bound, best = score_bound(finals, len(self.seeds), self.penalty), best_score(self.study)
        if best is not None and bound < best:
            last = runs[-1]
            trial.set_user_attr("pruned_at", [last["seed"], last["epochs"][-1]])
            trial.set_user_attr("outcome", "pruned")
            trial.set_user_attr(
                "reason",
                f"cannot win: after {len(finals)} of {len(self.seeds)} seeds the score can "
                f"reach at most {bound:.4g} < best {best:.4g}",
            )
            raise optuna.TrialPruned(f"score at most {bound:.4g} < best {best:.4g}")

    def _train_seed(
        self, trial: optuna.Trial, rep: Reporter, params: dict[str, Any],
        runs: list[dict[str, Any]],
    ) -> bool:  # fmt: skip
        """Train seed ``rep.seed`` and record its run; ``False``: the trial failed."""
        import optuna

        seed, t0 = rep.seed, time.perf_counter()
        try:
            returned = self.train_fn(dict(params), seed, rep)
        except optuna.TrialPruned:
            _finish(trial, runs, rep, "pruned", None, t0)
            trial.set_user_attr("pruned_at", [seed, rep.epochs[-1] if rep.epochs else 0])
            raise
        except TrialFailed as exc:
            _finish(trial, runs, rep, "failed", None, t0)
            trial.set_user_attr("reason", str(exc))
            return False
        except BaseException as exc:  # killed, interrupted or a bug: not a result
            _finish(trial, runs, rep, "interrupted", None, t0)
            trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}")
            raise
        if returned is None and not rep.values:
            raise ValueError(f"train_fn returned None for seed {seed} and reported no value")
        final = rep.values[-1] if returned is None else float(returned)
        if not math.isfinite(final):
            _finish(trial, runs, rep, "failed", None, t0)
            trial.set_user_attr("reason", f"seed {seed}: non-finite final value {final}")
            return False
        _finish(trial, runs, rep, "complete", final, t0)
        return True


def _run(
    study: Any,
    objective: _Objective,
    n_trials: int,
    timeout: float | None,
    out: Path | None,
    result_args: dict[str, Any],
    progress: bool,
) -> TuneResult:
    """Run the missing trials of ``study``; write the result after each one."""
    from flatmin.tune.report import write_result

    result = collect(study, result_args)
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_trials, initial=min(n_trials, result.finished), unit="trial",
                   desc="tune", dynamic_ncols=True)  # fmt: skip

        def show(rep: Reporter) -> None:
            bar.set_postfix_str(
                f"#{rep.number} seed {rep.seed} epoch {rep.epochs[-1]}: {rep.values[-1]:.4f}"
            )

        objective.on_report = show

    def after_trial(study: Any, _: Any) -> None:
        res = collect(study, result_args)
        if out is not None:
            write_result(out / RESULT_FILE, res)
        if bar is not None:
            bar.n = min(n_trials, res.finished)
            best = res.best
            if best is not None and best.score is not None:
                bar.set_postfix_str(
                    f"best #{best.number} {_fmt_params(best.params)}: {best.score.value:.4f}"
                )
            bar.refresh()

    remaining = n_trials - result.finished
    try:
        if remaining > 0:
            study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=[after_trial])
    finally:
        if bar is not None:
            bar.close()
        result = collect(study, result_args)
        if out is not None:
            write_result(out / RESULT_FILE, result)
    return result


def _fmt_params(params: Mapping[str, float | int]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in params.items())
