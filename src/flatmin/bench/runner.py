"""The benchmark runner: a resumable grid of tasks × methods × seeds.

Stages (the protocol is :mod:`flatmin.bench.plan`):

1. **Tuning** (``tune=True``): the validation grids at the tuning seeds, in rounds, until every
   method's choice is final (grids at an edge are extended); without ``tune`` the suite's fixed
   hyper-parameters (``hypers``) or the methods' defaults are used.
2. **Evaluation**: every (task, method, seed) at the chosen hyper-parameters; views of one
   trajectory share its run (baseline/swa, sam/wasam).
3. **Budget ablation** (``ablation_task``): baseline, SWA, SAM and WASAM of one task at other
   multiples of its epoch budget.
4. **Flatness** (``analysis_task``): the first evaluation seed's baseline and SAM runs are
   trained again (deterministically: the test accuracy must match the recorded one) with
   checkpoints, and their flatness is measured (:mod:`flatmin.bench.flatness`).

Every finished run is appended to ``<out>/results.jsonl`` (:mod:`flatmin.bench.store`) under
its configuration hash. Rerunning the same grid skips the hashes already recorded (status ``ok``
or ``failed``: a non-finite loss is deterministic); a run that was interrupted, or that raised
(status ``error``), is run again. ``jobs > 1`` runs independent runs in spawned worker processes,
each with ``threads`` torch threads (``executor="ray"``: as Ray tasks, on a cluster or a local
Ray instance); only the main process writes the file and the progress bars.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from flatmin._proc import interrupt_on_signals
from flatmin.bench.device import check_precision, check_support, resolve_device
from flatmin.bench.execute import check_executor, exclusive_output, executor_session, run_specs
from flatmin.bench.methods import ABLATION_METHODS, Hyper, get_method
from flatmin.bench.plan import (
    GridState,
    TuneChoice,
    eval_trajectory,
    method_result,
    plan_eval,
    plan_tuning,
)
from flatmin.bench.store import latest_by_hash, read_records
from flatmin.bench.suites import Suite
from flatmin.bench.train import RunSpec
from flatmin.data import Dataset
from flatmin.tasks import BUDGETS, Task, get_task

__all__ = [
    "BenchConfig",
    "GridSummary",
    "RegistryResolver",
    "Resolver",
    "method_result",
    "run_grid",
]

RESULTS = "results.jsonl"


class Resolver(Protocol):
    """Finds a task and its (cached) dataset by name; picklable (``jobs > 1``, Ray)."""

    def task(self, name: str) -> Task:
        """The task record."""
        ...

    def dataset(self, task: Task) -> Dataset | None:
        """The task's loaded dataset (``None``: let ``Task.load`` load it)."""
        ...


class RegistryResolver:
    """The task registry and the data cache; keeps each loaded dataset for the process."""

    def __init__(self) -> None:
        self._datasets: dict[str, Dataset] = {}

    def task(self, name: str) -> Task:
        """``flatmin.tasks.get_task(name)``."""
        return get_task(name)

    def dataset(self, task: Task) -> Dataset | None:
        """The task's dataset, loaded once per process."""
        if task.dataset not in self._datasets:
            self._datasets[task.dataset] = task.load_dataset()
        return self._datasets[task.dataset]

    def __getstate__(self) -> dict[str, Any]:
        return {"_datasets": {}}  # workers load their own copy


@dataclass(frozen=True)
class BenchConfig:
    """Options of one ``flatmin bench`` invocation.

    Attributes:
        out: output directory (``results.jsonl``, ``report.md``, ``results.csv``, figures).
        tasks, methods: grid axes (``baseline`` is the reference of the report).
        seeds: evaluation seeds.
        budget: the tasks' ``"quick"`` or ``"full"`` recipes.
        task_budgets: per-task exceptions to ``budget`` (``{"mutag": "full"}``).
        tune: choose the hyper-parameters on the validation split (:mod:`flatmin.bench.plan`).
        tune_seeds: seeds of the validation-grid runs (disjoint from ``seeds``).
        tuner: ``"grid"`` (the reference protocol, :mod:`flatmin.bench.plan`) or ``"optuna"``
            (:func:`flatmin.tune.suggest_hyper`: a pruned search per task and method with a
            grid, scored over the tuning seeds, ``tune_trials`` finished trials each; the study
            lives in ``OUT/tune/TASK-METHOD`` and resumes).
        tune_trials: finished trials of each Optuna search.
        hypers: fixed hyper-parameters by task and method (used without ``tune``; missing ones
            are the methods' defaults).
        hyper_source: where ``hypers`` come from (shown in the report).
        extra_methods: methods run on some tasks only, by task (e.g. the cheap SAM variants on
            the label-noise tasks).
        variants: the methods the report shows as cheap SAM variants (cost and the share of
            SAM's gain kept) instead of in the headline table.
        ablation_task: train baseline/SWA/SAM/WASAM of this task also at ``ablation_factors`` ×
            its epoch budget.
        ablation_factors: multiples of the epoch budget for the ablation (besides 1).
        analysis_task: measure the flatness of this task's first-seed models.
        jobs: parallel worker processes (``executor="ray"`` without a cluster address: the CPUs
            of the local Ray instance are ``jobs × cpus_per_run``).
        threads: torch threads per run.
        executor: ``"local"`` (worker processes on this machine) or ``"ray"`` (one Ray task per
            run, :mod:`flatmin.bench.ray_executor`).
        ray_address: the Ray cluster (default: ``$RAY_ADDRESS``, else a local Ray instance).
        cpus_per_run, gpus_per_run: resources a Ray task reserves (default: ``threads`` CPUs,
            no GPU).
        epochs: override every task's epoch budget (tests, smoke runs).
        progress: show tqdm progress bars (stderr).
        report: write the report after the grid.
        run: train the missing runs (``False``: only rewrite the report from what is recorded).
        suite: the suite's name, for the report.
        device: where every run computes (``"auto"``, ``"cpu"``, ``"cuda:0"``...); with
            ``jobs > 1`` the workers share it (each its own CUDA context).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` for every run.
    """

    out: Path
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    budget: str = "quick"
    task_budgets: Mapping[str, str] = field(default_factory=dict)
    tune: bool = False
    tune_seeds: tuple[int, ...] = (100, 101)
    tuner: str = "grid"
    tune_trials: int = 12
    hypers: Mapping[str, Mapping[str, Hyper]] = field(default_factory=dict)
    hyper_source: str | None = None
    extra_methods: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    variants: tuple[str, ...] = ()
    ablation_task: str | None = None
    ablation_factors: tuple[float, ...] = (0.5, 2.0)
    analysis_task: str | None = None
    jobs: int = 1
    threads: int = 1
    executor: str = "local"
    ray_address: str | None = None
    cpus_per_run: float | None = None
    gpus_per_run: float | None = None
    epochs: int | None = None
    progress: bool = True
    report: bool = True
    run: bool = True
    suite: str | None = None
    device: str = "cpu"
    precision: str = "fp32"

    @classmethod
    def from_suite(cls, suite: Suite, out: str | os.PathLike[str], **overrides: Any) -> BenchConfig:
        """The suite's grid with ``overrides`` (``None`` values are ignored)."""
        base = cls(
            out=Path(out), tasks=suite.tasks, methods=suite.methods,
            seeds=tuple(range(suite.seeds)), budget=suite.budget,
            task_budgets=dict(suite.task_budgets), tune=suite.tune,
            tune_seeds=suite.tune_seeds, hypers=suite.hypers, hyper_source=suite.hyper_source,
            extra_methods=dict(suite.extra_methods), variants=suite.variants,
            ablation_task=suite.ablation_task, analysis_task=suite.analysis_task,
            jobs=suite.jobs, suite=suite.name, device=suite.device, precision=suite.precision,
        )  # fmt: skip
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def budget_of(self, task: str) -> str:
        """The budget of ``task``'s runs."""
        return self.task_budgets.get(task, self.budget)

    def methods_of(self, task: str) -> tuple[str, ...]:
        """The methods run on ``task``: ``methods`` and its ``extra_methods``."""
        extra = self.extra_methods.get(task, ())
        return self.methods + tuple(m for m in extra if m not in self.methods)

    def validate(self, resolver: Resolver | None = None) -> None:
        """Raise ``ValueError`` for an unknown name or a bad option, before anything runs."""
        resolver = resolver or RegistryResolver()
        for name in self.tasks:
            resolver.task(name)  # raises with the list of known tasks
        extras = [m for ms in self.extra_methods.values() for m in ms]
        for name in (*self.methods, *extras, *self.variants):
            get_method(name)
        if "baseline" not in self.methods:
            raise ValueError(f"Invalid methods: {list(self.methods)} (the report needs 'baseline')")
        for name in (*self.task_budgets.values(), self.budget):
            if name not in BUDGETS:
                raise ValueError(f"Invalid budget: {name!r} (expected one of {BUDGETS})")
        for name in self.task_budgets:
            if name not in self.tasks:
                raise ValueError(f"Invalid task budget: {name!r} is not one of the tasks")
        for name in self.extra_methods:
            if name not in self.tasks:
                raise ValueError(f"Invalid extra-method task: {name!r} is not one of the tasks")
        for special in (self.ablation_task, self.analysis_task):
            if special is not None and special not in self.tasks:
                raise ValueError(
                    f"Invalid ablation/analysis task: {special!r} is not one of the tasks"
                )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Invalid seeds: {self.seeds} (expected distinct seeds)")
        if self.jobs < 1 or self.threads < 1:
            raise ValueError(f"Invalid jobs/threads: {self.jobs}/{self.threads} (expected >= 1)")
        check_executor(self)
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"Invalid epochs: {self.epochs} (expected >= 1)")
        if self.tuner not in ("grid", "optuna"):
            raise ValueError(f"Invalid tuner: {self.tuner!r} (expected 'grid' or 'optuna')")
        if self.tune and self.tuner == "optuna":
            import importlib.util

            if importlib.util.find_spec("optuna") is None:
                raise ValueError(
                    "Invalid tuner: 'optuna' needs Optuna (pip install 'flatmin[tune]')"
                )
        if self.tune_trials < 1:
            raise ValueError(f"Invalid tune_trials: {self.tune_trials} (expected >= 1)")
        if self.tune and not self.tune_seeds:
            raise ValueError("Invalid tune_seeds: () (tuning needs at least one seed)")
        if set(self.tune_seeds) & set(self.seeds):
            raise ValueError(
                f"Invalid tune_seeds: {self.tune_seeds} (they overlap the evaluation seeds "
                f"{self.seeds})"
            )
        if any(f <= 0 or f == 1 for f in self.ablation_factors):
            raise ValueError(
                f"Invalid ablation_factors: {self.ablation_factors} (expected > 0 and != 1)"
            )
        for table in self.hypers.values():
            for name, hyper in table.items():
                eval_trajectory(get_method(name), get_method(name).resolve(hyper))
        check_precision(self.precision)
        resolve_device(self.device)  # DeviceUnavailableError (a ValueError) if it is not there
        for name in self.tasks:
            for method in self.methods_of(name):
                check_support(RunSpec(name, method, 0, precision=self.precision))


@dataclass
class GridSummary:
    """What :func:`run_grid` did.

    Attributes:
        planned: runs in the grid (tuning and ablation included).
        skipped: runs already in ``results.jsonl``.
        ran: runs trained now.
        failed: runs that ended ``failed`` or ``error`` (of all in the grid).
        wall_time: seconds.
        records: one result per (task, method, seed) of the evaluation grid
            (:func:`method_result`).
        tune_records: the validation-grid trajectory records.
        ablation: results of the budget ablation (``record["budget_factor"]`` set).
        tuning: the validation-grid choices.
        searches: the Optuna searches by (task, method) (``tuner="optuna"``).
        hypers: the hyper-parameters used, by (task, method).
        flatness: the flatness study (``None`` without ``analysis_task``).
        out: output directory.
    """

    planned: int = 0
    skipped: int = 0
    ran: int = 0
    failed: int = 0
    wall_time: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    tune_records: list[dict[str, Any]] = field(default_factory=list)
    ablation: list[dict[str, Any]] = field(default_factory=list)
    tuning: list[TuneChoice] = field(default_factory=list)
    searches: dict[tuple[str, str], Any] = field(default_factory=dict)
    hypers: dict[tuple[str, str], Hyper] = field(default_factory=dict)
    flatness: dict[str, Any] | None = None
    out: Path = Path()


def run_grid(cfg: BenchConfig, *, resolver: Resolver | None = None) -> GridSummary:
    """Run (or resume) the grid and write the report.

    Args:
        cfg: the grid and its options.
        resolver: task and dataset lookup (default: the registry and the data cache).

    Returns:
        A :class:`GridSummary`.

    Raises:
        ValueError: an unknown name or a bad option (before anything runs).
        flatmin.bench.execute.OutputLockedError: another grid runs in ``cfg.out`` (before
            anything runs).
        flatmin.data.DataUnavailableError: a dataset cannot be fetched (before anything runs).
        flatmin._proc.Interrupted: SIGINT or SIGTERM; the finished runs are kept.
    """
    look = resolver or RegistryResolver()
    cfg.validate(look)
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))  # "auto" -> what it found
    lock = exclusive_output(cfg.out) if cfg.run else nullcontext()
    with lock, interrupt_on_signals(), executor_session(cfg):
        return _run_grid(cfg, look)


def _run_grid(cfg: BenchConfig, look: Resolver) -> GridSummary:
    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    results = cfg.out / RESULTS
    summary = GridSummary(out=cfg.out)
    task_of = {name: look.task(name) for name in cfg.tasks}
    if cfg.run:
        # Fetch and load every dataset once in this process before any worker starts: a missing
        # source fails here with one clear error, and workers never download concurrently.
        for task_obj in task_of.values():
            look.dataset(task_obj)
    counted: set[str] = set()
    attempted: set[str] = set()  # trained in this invocation: an error is retried next time

    def records() -> dict[str, dict[str, Any]]:
        return latest_by_hash(read_records(results))

    def hash_of(spec: RunSpec) -> str:
        return spec.config_hash(task_of[spec.task])

    def run(specs: Sequence[RunSpec], desc: str) -> int:
        """Train the specs without a finished record, each once per invocation; return how many."""
        done = records()
        left, hashes = [], set()
        for spec in specs:
            h = hash_of(spec)
            if h in hashes:
                continue
            hashes.add(h)
            rec = done.get(h)
            finished = rec is not None and rec.get("status") != "error"
            if h not in counted:
                counted.add(h)
                summary.planned += 1
                summary.skipped += finished
            if not finished and cfg.run and h not in attempted:
                attempted.add(h)
                left.append(spec)
        summary.ran += len(left)
        if left:
            run_specs(left, cfg, look, results, desc)
        return len(left)

    # -- 1. tuning ----------------------------------------------------------------------------
    hypers: dict[tuple[str, str], Hyper] = {}
    tune_hashes: list[str] = []
    if cfg.tune and cfg.tuner == "optuna":
        summary.searches = _optuna_tuning(cfg, hypers)
    elif cfg.tune:
        state: GridState = {}
        while True:
            found = records()
            plan = plan_tuning(cfg, state, found, task_of)
            if run(plan.specs, "validation grid"):
                continue  # plan again with the same grids, on the new records
            missing = any(hash_of(s) not in found for s in plan.specs)  # only without cfg.run
            if plan.state == state or missing:
                break
            state = plan.state
        tune_hashes = [hash_of(s) for s in plan.specs]
        summary.tuning = list(plan.choices.values())
        for (task, name), choice in plan.choices.items():
            hypers[(task, name)] = choice.hyper
    for task in cfg.tasks:
        for name in cfg.methods_of(task):
            if (task, name) not in hypers:
                fixed = cfg.hypers.get(task, {}).get(name)
                hypers[(task, name)] = get_method(name).resolve(fixed)
    summary.hypers = hypers

    # -- 2. evaluation ------------------------------------------------------------------------
    eval_specs: dict[tuple[str, str, int], RunSpec] = {}
    for task in cfg.tasks:
        planned = plan_eval(
            [task], cfg.methods_of(task), cfg.seeds, hypers, cfg.budget_of, cfg.epochs,
            device=cfg.device, precision=cfg.precision,
        )  # fmt: skip
        eval_specs.update(planned)
    run(list(eval_specs.values()), "benchmark")

    # -- 3. budget ablation -------------------------------------------------------------------
    ablation: dict[tuple[str, str, int, float], RunSpec] = {}
    if cfg.ablation_task is not None:
        at = cfg.ablation_task
        base_epochs = cfg.epochs or task_of[at].recipe(cfg.budget_of(at)).epochs
        methods = [m for m in ABLATION_METHODS if m in cfg.methods_of(at)]
        for factor in cfg.ablation_factors:
            epochs = max(1, round(factor * base_epochs))
            for (t, name, seed), spec in plan_eval(
                [at], methods, cfg.seeds, hypers, cfg.budget_of, epochs, device=cfg.device,
                precision=cfg.precision,
            ).items():  # fmt: skip
                ablation[(t, name, seed, factor)] = spec
        run(list(ablation.values()), "budget ablation")

    # -- results --------------------------------------------------------------------------------
    found = records()
    for (t, name, _), spec in eval_specs.items():
        rec = found.get(hash_of(spec))
        if rec is not None:
            summary.records.append(method_result(rec, name, hypers[(t, name)]))
    for (t, name, _, factor), spec in ablation.items():
        rec = found.get(hash_of(spec))
        if rec is not None:
            summary.ablation.append(
                {**method_result(rec, name, hypers[(t, name)]), "budget_factor": factor}
            )
    summary.tune_records = [found[h] for h in dict.fromkeys(tune_hashes) if h in found]
    all_runs = {hash_of(s) for s in (*eval_specs.values(), *ablation.values())}
    all_runs |= set(tune_hashes)
    summary.failed = sum(found[h].get("status") != "ok" for h in all_runs if h in found)

    # -- 4. flatness ----------------------------------------------------------------------------
    if cfg.analysis_task is not None and cfg.run:
        from flatmin.bench.flatness import flatness_study

        an = cfg.analysis_task
        seed = cfg.seeds[0]
        specs = {
            name: eval_specs[(an, name, seed)]
            for name in ABLATION_METHODS
            if (an, name, seed) in eval_specs
        }
        summary.flatness = flatness_study(
            cfg.out, task_of[an], specs, {n: hypers[(an, n)] for n in specs}, found,
            resolver=look, threads=cfg.threads,
        )  # fmt: skip
    elif cfg.analysis_task is not None:
        from flatmin.bench.flatness import load_flatness

        summary.flatness = load_flatness(cfg.out)
    summary.wall_time = time.perf_counter() - t0
    if cfg.report:
        from flatmin.bench.report import write_report

        write_report(cfg.out, summary, meta=_meta(cfg))
    return summary


def _optuna_tuning(
    cfg: BenchConfig, hypers: dict[tuple[str, str], Hyper]
) -> dict[tuple[str, str], Any]:
    """Fill ``hypers`` by one Optuna search per task and method with a grid (``--tuner optuna``).

    Each search covers every hyper-parameter the method is tuned on (its own grids and those it
    would take from another method); a method with nothing of its own to tune (a variant that
    takes SAM's rho) takes the searched value of that method, as with the grid.
    """
    import optuna

    from flatmin.bench.plan import tuned_methods
    from flatmin.tune import suggest_hyper

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searches = {}
    for task in cfg.tasks:
        for name in tuned_methods(cfg.methods_of(task)):
            m = get_method(name)
            if m.grids:
                hyper, result = suggest_hyper(
                    task, name, cfg.budget_of(task), seeds=cfg.tune_seeds,
                    n_trials=cfg.tune_trials, epochs=cfg.epochs,
                    out=cfg.out / "tune" / f"{task}-{name}", progress=cfg.progress,
                    device=cfg.device, precision=cfg.precision,
                )  # fmt: skip
                hypers[(task, name)] = m.resolve(hyper)
                searches[(task, name)] = result
            else:
                taken = {p: getattr(hypers[(task, o)], p) for p, o in m.tuned_by.items()}
                hypers[(task, name)] = m.resolve(None, **taken)
    return searches


def _meta(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "suite": cfg.suite,
        "budget": cfg.budget,
        "task_budgets": dict(cfg.task_budgets),
        "tasks": list(cfg.tasks),
        "methods": list(cfg.methods),
        "extra_methods": {t: list(ms) for t, ms in cfg.extra_methods.items()},
        "variants": list(cfg.variants),
        "seeds": list(cfg.seeds),
        "tune": cfg.tune,
        "tune_seeds": list(cfg.tune_seeds),
        "tuner": cfg.tuner,
        "tune_trials": cfg.tune_trials,
        "hyper_source": cfg.hyper_source,
        "ablation_task": cfg.ablation_task,
        "ablation_factors": list(cfg.ablation_factors),
        "analysis_task": cfg.analysis_task,
        "epochs": cfg.epochs,
        "jobs": cfg.jobs,
        "threads": cfg.threads,
        "device": cfg.device,
        "precision": cfg.precision,
    }
