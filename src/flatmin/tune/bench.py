"""The benchmark's tasks as a search: what ``flatmin tune`` and ``flatmin bench`` call.

Everything that knows the benchmark's training API is in :func:`_train_run`, :func:`_hyper`
and :func:`check_scale` (``RunSpec``, ``Hyper``, ``train``, the device checks); the space comes
from the method's ``tuned_by`` / ``grids`` (:func:`bench_space`). Update those when the
benchmark's API changes. :class:`OptunaTuner` is the benchmark's ``--tuner optuna``: it plugs
into the benchmark through its tuner seam (:mod:`flatmin.bench.tuning`), so its trials are
ordinary bench runs (bench never imports this package).

Each seed is one benchmark run at ``stage="tune"`` on seeds 100, 101, … (the benchmark evaluates
on 0, 1, …), on the search's device and precision (like the validation grid's runs); its
per-epoch ``val_acc`` is reported, and its value is the final epoch's validation accuracy (the
benchmark reports final-epoch results). A run that ends with a non-finite loss is a failed
trial.

Example:
    >>> from flatmin.tune.bench import bench_space
    >>> bench_space("wasam")  # rho from SAM's preset and grid, start from SWA's
    (Param(name='rho', low=0.01, high=2.0, log=True, integer=False), Param(name='start', ...))
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flatmin.bench.device import check_precision, check_support, resolve_device
from flatmin.bench.loggers import RunLogger, chain, run_name, run_params
from flatmin.bench.methods import METHODS, Hyper, get_method
from flatmin.bench.plan import Grid as BenchGrid
from flatmin.bench.plan import tuned_methods
from flatmin.bench.records import Record, RunRecord
from flatmin.bench.train import RunSpec, train
from flatmin.bench.tuning import SearchSummary, TuningOutcome
from flatmin.tasks import Task, get_task
from flatmin.tune.result import TuneResult, stability_score
from flatmin.tune.search import Reporter, TrainFn, TrialFailed, import_optuna, search
from flatmin.tune.space import SPACES, Param

__all__ = [
    "NoTrialCompleted",
    "OptunaTuner",
    "bench_epochs",
    "bench_space",
    "bench_train_fn",
    "check_scale",
    "check_warmup",
    "grid_size",
    "suggest_hyper",
]


class NoTrialCompleted(RuntimeError):
    """A search ended without a complete trial (every trial pruned, failed or interrupted)."""


# --- the adapter: the only code that builds benchmark runs --------------------------------------


def _hyper(params: Mapping[str, float | int]) -> Hyper:
    return Hyper(**params)


def _train_run(
    task: str,
    method: str,
    seed: int,
    budget: str,
    params: Mapping[str, float | int],
    epochs: int | None,
    on_epoch: Callable[[int, int, dict[str, float]], None],
    device: str = "cpu",
    precision: str = "fp32",
    logger: RunLogger | None = None,
) -> dict[str, Any]:
    """Train one tuning run of the benchmark on ``device`` at ``precision``; return its record.

    With ``logger`` the run is one logger run, live per epoch (a pruned trial ends ``killed``).
    """
    spec = RunSpec(
        task, method, seed, budget, _hyper(params), epochs, stage="tune", device=device,
        precision=precision,
    )  # fmt: skip
    if logger is None:
        # Validate every epoch: the pruner reads the per-epoch validation accuracy.
        return train(spec, on_epoch=on_epoch, eval_val=True).record
    config = {**spec.config(), "hash": spec.config_hash()}
    logger.start_run(run_name(config), run_params(config))
    try:
        record = train(spec, on_epoch=chain(on_epoch, logger), eval_val=True).record
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, import_optuna().TrialPruned))
        logger.end_run("killed" if stopped else "failed")
        raise
    logger.finish(record)
    return record


def check_scale(task: str, method: str, device: str, precision: str) -> str:
    """``device`` resolved (``auto`` → what is there), after checking it and ``precision``.

    Raises:
        ValueError: an unknown or unavailable device (``DeviceUnavailableError``), an unknown
            precision, or one the method cannot train at (fp16 for the SAM variants).
    """
    resolved = str(resolve_device(device))
    check_precision(precision)
    check_support(RunSpec(task, method, 0, precision=precision))
    return resolved


# ------------------------------------------------------------------------------------------------


def bench_train_fn(
    task: str,
    method: str,
    budget: str,
    epochs: int | None = None,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    logger: RunLogger | None = None,
) -> TrainFn:
    """A training function for :func:`flatmin.tune.search` that trains a benchmark run.

    It reports ``val_acc`` after every epoch (the pruner may stop the run there: the
    ``TrialPruned`` raised in the epoch callback ends ``train``) and returns the final one.

    Args:
        task: task registry name.
        method: method registry name.
        budget: ``"quick"`` or ``"full"``.
        epochs: override the recipe's epochs.
        device: where each run trains (``"cpu"``, ``"cuda:0"``, ``"mps"``; not ``"auto"``:
            resolve it with :func:`flatmin.bench.device.resolve_device` first).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        logger: live curves (``flatmin tune --log``): each seed's run is one logger run.
    """

    def train_fn(params: dict[str, float | int], seed: int, report: Reporter) -> float:
        record = _train_run(
            task, method, seed, budget, params, epochs,
            lambda epoch, _epochs, metrics: report(epoch, metrics["val_acc"]),
            device=device, precision=precision, logger=logger,
        )  # fmt: skip
        if record["status"] != "ok":
            raise TrialFailed(f"seed {seed}: {record.get('reason')}")
        return float(record["final"]["val_acc"])

    return train_fn


def bench_space(
    method: str, ranges: Mapping[str, tuple[float, float]] | None = None
) -> tuple[Param, ...]:
    """The search space of a benchmark method: the hyper-parameters it is tuned on.

    Each parameter in the method's ``tuned_by`` takes the preset range of its owner
    (:data:`flatmin.tune.SPACES`) stretched to cover the owner's validation grid; a parameter
    without a preset spans its grid (log scale when the grid spans a decade). ``ranges``
    overrides the range of a parameter (``{"rho": (0.01, 2.0)}``).

    Raises:
        ValueError: unknown method, a method with nothing to tune, or a bad ``ranges`` entry.
    """
    space = []
    for name, (owner, values) in _tunable(method).items():
        grid = tuple(float(v) for v in values)
        preset = next((p for p in SPACES.get(owner, ()) if p.name == name), None)
        if preset is None:
            if len(grid) < 2:
                raise ValueError(f"Invalid parameter {name!r} of {method!r}: no preset, no grid")
            log = min(grid) > 0 and max(grid) >= 10 * min(grid)
            integer = all(v.is_integer() for v in grid)
            preset = Param(name, min(grid), max(grid), log=log, integer=integer)
        space.append(preset.widened(grid))
    if not space:
        tunable = ", ".join(n for n in _methods() if _tunable(n))
        raise ValueError(
            f"Invalid method: {method!r} has no hyper-parameters to tune (tunable: {tunable})"
        )
    for name, (low, high) in (ranges or {}).items():
        i = next((i for i, p in enumerate(space) if p.name == name), None)
        if i is None:
            names = ", ".join(p.name for p in space)
            raise ValueError(f"Invalid range: {name!r} is not tuned for {method!r} ({names})")
        space[i] = Param(name, low, high, log=space[i].log, integer=space[i].integer)
    return tuple(space)


def _methods() -> Mapping[str, Any]:
    return METHODS


def _tunable(method: str) -> dict[str, tuple[str, tuple[float, ...]]]:
    """Searchable hyper-parameter → (the method whose preset and grid it takes, grid values).

    A method's own grids (SAM's rho, SWA's start, LookSAM's alpha, ...) and the ones it takes
    from another method in the benchmark (a variant's rho from SAM's grid).
    """
    m = get_method(method)
    out = {name: (method, grid.values) for name, grid in m.grids.items()}
    for name, owner in m.tuned_by.items():
        grid = get_method(owner).grids.get(name)
        out.setdefault(name, (owner, grid.values if grid is not None else ()))
    return out


def grid_size(method: str) -> int:
    """Values in the benchmark's validation grid of ``method`` (product over its parameters)."""
    return math.prod(len(values) or 1 for _, values in _tunable(method).values())


def bench_epochs(task: str, budget: str, epochs: int | None = None) -> int:
    """Epochs of one run: ``epochs``, else the task's recipe for ``budget``.

    Raises:
        ValueError: unknown task, budget, or ``epochs < 1``.
    """
    recipe = get_task(task).recipe(budget)
    if epochs is None:
        return recipe.epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Invalid epochs: {epochs!r} (expected an integer >= 1)")
    return epochs


def check_warmup(warmup: float) -> float:
    """``warmup`` (a fraction of each seed's epochs), or ``ValueError`` unless in [0, 1)."""
    if not (math.isfinite(warmup) and 0.0 <= warmup < 1.0):
        raise ValueError(f"Invalid warmup: {warmup} (expected a fraction in [0, 1))")
    return float(warmup)


def suggest_hyper(
    task: str,
    method: str,
    budget: str = "quick",
    seeds: int | Sequence[int] = 2,
    n_trials: int = 12,
    *,
    pruner: str = "median",
    warmup: float = 0.5,
    epochs: int | None = None,
    out: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    spread_penalty: float = 1.0,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    progress: bool = False,
    device: str = "cpu",
    precision: str = "fp32",
    logger: RunLogger | None = None,
) -> tuple[Hyper, TuneResult]:
    """Choose ``method``'s hyper-parameters on ``task``'s validation split with a search.

    What the benchmark's ``--tuner optuna`` calls in place of the validation grid.

    Args:
        task: task registry name.
        method: method registry name (its ``tuned_by`` parameters are searched).
        budget: ``"quick"`` or ``"full"``.
        seeds: tuning seeds (``K`` → 100 … 100 + K − 1).
        n_trials: finished trials (see :func:`flatmin.tune.search`).
        pruner: ``"median"``, ``"halving"`` or ``"none"``.
        warmup: fraction of each seed's epochs before pruning may stop a trial.
        epochs: override the recipe's epochs.
        out: resumable study directory (``None``: in memory).
        timeout: seconds after which no new trial starts.
        spread_penalty: score = mean − spread_penalty · std over the seeds.
        ranges: range overrides (:func:`bench_space`).
        progress: a progress bar on stderr.
        device: where the runs train (``"auto"``: an accelerator when present). A study's
            settings include the device type and the precision unless they are ``cpu`` and
            ``fp32``: a search resumes on another GPU, not on another kind of device.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast, loss scaling).
        logger: live curves of every trial's runs (:mod:`flatmin.bench.loggers`).

    Returns:
        ``(hyper, result)``: the best trial's hyper-parameters as a ``Hyper``, and the result.

    Raises:
        ValueError: bad arguments (an unavailable device included).
        NoTrialCompleted: no trial completed (all pruned or failed); a ``RuntimeError``.
    """
    warmup = check_warmup(warmup)
    space = bench_space(method, ranges)
    n_epochs = bench_epochs(task, budget, epochs)
    device = check_scale(task, method, device, precision)
    config: dict[str, Any] = {"task": task, "method": method, "budget": budget, "epochs": n_epochs}
    # Only off the defaults, so that the studies started before these settings keep their identity.
    device_type = device.partition(":")[0]
    if device_type != "cpu":
        config["device"] = device_type
    if precision != "fp32":
        config["precision"] = precision
    result = search(
        bench_train_fn(
            task, method, budget, epochs, device=device, precision=precision, logger=logger
        ), space,
        n_trials=n_trials, seeds=seeds, out=out, pruner=pruner, warmup=int(warmup * n_epochs),
        timeout=timeout, spread_penalty=spread_penalty, progress=progress, config=config,
    )  # fmt: skip
    best = result.best
    if best is None:
        raise NoTrialCompleted(
            f"No trial completed for {task} {method} ({result.count('pruned')} pruned, "
            f"{result.count('failed')} failed): nothing to suggest"
        )
    return _hyper(best.params), result


# --- the benchmark's tuner: Optuna's trials through the benchmark's executor ------------------


@dataclass(frozen=True)
class OptunaTuner:
    """``flatmin bench --tuner optuna``: a search per task and method, its trials as bench runs.

    A :class:`flatmin.bench.tuning.Tuner`. For every tuned method with a grid of its own, a TPE
    search (seeded: the same records give the same proposals) over :func:`bench_space` asks
    ``batch`` trials at a time; each trial is one tuning run (``stage="tune"``) per tuning seed,
    trained by the grid's executor (``--jobs``, ``--executor ray``) and recorded in
    ``results.jsonl`` like any run. A trial's score is ``mean − spread_penalty · std`` of its
    final validation accuracies; a run that fails or errors fails the trial. A resumed grid
    replays the search on the recorded runs, so a finished trial is never trained again. Methods
    without a grid of their own (a variant taking SAM's rho) take the searched value.

    Attributes:
        trials: finished trials (complete or failed) per search.
        batch: trials proposed at once (``--jobs``: one per worker).
        spread_penalty: the score's penalty on the spread over the seeds.
        seed: the sampler's seed.
    """

    trials: int = 12
    batch: int = 1
    spread_penalty: float = 1.0
    seed: int = 0
    name: str = field(default="optuna", init=False)

    def check(self) -> None:
        """Raise ``ValueError`` for bad settings or without Optuna."""
        for label, value in (("tune_trials", self.trials), ("batch", self.batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {label}: {value!r} (expected an integer >= 1)")
        try:
            import_optuna()
        except ImportError:
            raise ValueError(
                "Invalid tuner: 'optuna' needs Optuna (pip install 'flatmin[tune]')"
            ) from None

    def describe(self, tune_seeds: Sequence[int]) -> str:
        """The report's sentence."""
        return (
            "Hyper-parameters: chosen per task by an Optuna search on the validation split "
            f"(`--tuner optuna`, {self.trials} finished trials per method, scored over tuning "
            f"seeds {list(tune_seeds)} as mean − std; see 'Optuna searches'). The grid "
            "(`--tuner grid`) is the reference protocol."
        )

    def start(self, grid: BenchGrid, task_of: Mapping[str, Task]) -> _OptunaSession:
        """A session of searches for ``grid``."""
        return _OptunaSession(self, grid, task_of)


@dataclass
class _Trial:
    trial: Any  # optuna.Trial
    params: dict[str, float | int]
    specs: list[RunSpec]


@dataclass
class _Search:
    task: str
    method: str
    space: tuple[Param, ...]
    study: Any  # optuna.Study
    pending: list[_Trial] = field(default_factory=list)
    specs: list[RunSpec] = field(default_factory=list)
    finished: int = 0


def _val_acc(record: Record) -> float | None:
    """A tuning run's final validation accuracy (``None``: it failed or raised)."""
    return record.final.val_acc if isinstance(record, RunRecord) and record.ok else None


class _OptunaSession:
    """The searches of one grid, asked and told by the runner (:class:`TuningSession`)."""

    def __init__(self, tuner: OptunaTuner, grid: BenchGrid, task_of: Mapping[str, Task]) -> None:
        optuna = import_optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.tuner, self.grid, self.task_of = tuner, grid, task_of
        self.searches: list[_Search] = []
        self.stuck = False
        for task in grid.tasks:
            for name in tuned_methods(grid.methods_of(task)):
                if get_method(name).grids:
                    sampler = optuna.samplers.TPESampler(seed=tuner.seed)
                    study = optuna.create_study(direction="maximize", sampler=sampler)
                    self.searches.append(_Search(task, name, bench_space(name), study))

    @property
    def done(self) -> bool:
        return self.stuck or all(s.finished >= self.tuner.trials for s in self.searches)

    def _spec(self, srch: _Search, params: Mapping[str, float | int], seed: int) -> RunSpec:
        g = self.grid
        return RunSpec(
            srch.task, srch.method, seed, g.budget_of(srch.task), _hyper(params), g.epochs,
            stage="tune", device=g.device, precision=g.precision,
        )  # fmt: skip

    def ask(self, found: Mapping[str, Record]) -> Sequence[RunSpec]:
        specs: list[RunSpec] = []
        for srch in self.searches:
            left = self.tuner.trials - srch.finished
            while left > 0 and len(srch.pending) < min(self.tuner.batch, left):
                trial = srch.study.ask()
                params = {p.name: p.suggest(trial) for p in srch.space}
                runs = [self._spec(srch, params, seed) for seed in self.grid.tune_seeds]
                srch.pending.append(_Trial(trial, params, runs))
                srch.specs.extend(runs)
            specs += [s for t in srch.pending for s in t.specs]
        return specs

    def tell(self, found: Mapping[str, Record], trained: int) -> None:
        optuna = import_optuna()
        told = 0
        for srch in self.searches:
            for trial in list(srch.pending):
                hashes = [s.config_hash(self.task_of[s.task]) for s in trial.specs]
                if any(h not in found for h in hashes):
                    continue  # not trained (only without --run)
                recs = [found[h] for h in hashes]
                values = [_val_acc(r) for r in recs]
                if None in values:  # a failed run, or an error (retried once per invocation)
                    srch.study.tell(trial.trial, state=optuna.trial.TrialState.FAIL)
                else:
                    scores = [v for v in values if v is not None]
                    score = stability_score(scores, self.tuner.spread_penalty)
                    trial.trial.set_user_attr("mean", score.mean)
                    srch.study.tell(trial.trial, score.value)
                srch.pending.remove(trial)
                srch.finished += 1
                told += 1
        self.stuck = not told and not trained  # nothing can move on: the runs are missing

    def _best(self, srch: _Search) -> Any:
        optuna = import_optuna()
        complete = srch.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        return max(complete, key=lambda t: t.value, default=None)

    def outcome(self, found: Mapping[str, Record]) -> TuningOutcome:
        hypers: dict[tuple[str, str], Hyper] = {}
        summaries = []
        for srch in self.searches:
            best = self._best(srch)
            if best is None and not self.stuck:
                raise NoTrialCompleted(
                    f"No trial completed for {srch.task} {srch.method} "
                    f"({srch.finished} failed): nothing to suggest"
                )
            m = get_method(srch.method)
            hypers[(srch.task, srch.method)] = m.resolve(
                _hyper(best.params) if best is not None else None
            )
            states = [t.state.name.lower() for t in srch.study.get_trials()]
            summaries.append(SearchSummary(
                srch.task, srch.method, dict(best.params) if best is not None else None,
                best.value if best is not None else None,
                best.user_attrs.get("mean") if best is not None else None,
                {"complete": states.count("complete"), "failed": states.count("fail")},
            ))  # fmt: skip
        for task in self.grid.tasks:
            for name in tuned_methods(self.grid.methods_of(task)):
                m = get_method(name)
                if not m.grids:
                    taken = {p: getattr(hypers[(task, o)], p) for p, o in m.tuned_by.items()}
                    hypers[(task, name)] = m.resolve(None, **taken)
        specs = tuple(s for srch in self.searches for s in srch.specs)
        return TuningOutcome(hypers=hypers, specs=specs, searches=tuple(summaries))
