"""The benchmark runner: a resumable grid of tasks × methods × seeds.

Protocol (Kaddour et al. 2022, Sec. 4):

1. **Validation grid** (``tune=True``): for every task, each tuned hyper-parameter is chosen on
   the validation split from its owner's grid (SAM's ``rho``, ASAM's ``rho``, SWA's ``start``),
   one run per grid value at ``tune_seed`` (not an evaluation seed), the others at their defaults.
   The value with the best final validation accuracy wins (ties: the default, then the smaller).
   WASAM takes SAM's ``rho`` and SWA's ``start``. Without ``tune``, the defaults are used.
2. **Evaluation grid**: every (task, method, seed) with the selected hyper-parameters.

Every finished run is appended to ``<out>/results.jsonl`` (:mod:`flatmin.bench.store`) under
its configuration hash. Rerunning the same grid skips the hashes already recorded (status ``ok``
or ``failed``: a non-finite loss is deterministic); a run that was interrupted, or that raised
(status ``error``), is run again. ``jobs > 1`` runs independent runs in spawned worker processes,
each with ``threads`` torch threads; only the main process writes the file and the progress bars.
Execution, the lock on ``out`` and the handling of SIGINT/SIGTERM are in
:mod:`flatmin.bench.execute`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from flatmin._proc import interrupt_on_signals
from flatmin.bench.execute import exclusive_output, run_specs
from flatmin.bench.methods import Hyper, get_method
from flatmin.bench.store import latest_by_hash, read_records
from flatmin.bench.suites import Suite
from flatmin.bench.train import RunSpec
from flatmin.data import Dataset, load_dataset
from flatmin.tasks import BUDGETS, Task, get_task

__all__ = [
    "BenchConfig",
    "GridSummary",
    "RegistryResolver",
    "Resolver",
    "TuneChoice",
    "plan_runs",
    "plan_tuning",
    "run_grid",
    "select_hyper",
]

RESULTS = "results.jsonl"


class Resolver(Protocol):
    """Finds a task and its (cached) dataset by name; must be picklable for ``jobs > 1``."""

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
            self._datasets[task.dataset] = load_dataset(task.dataset)
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
        tune: choose rho / start on the validation split (see the module docstring).
        tune_seed: seed of the validation-grid runs.
        jobs: parallel worker processes.
        threads: torch threads per run.
        epochs: override every task's epoch budget (tests, smoke runs).
        progress: show tqdm progress bars (stderr).
        report: write the report after the grid.
        run: train the missing runs (``False``: only rewrite the report from what is recorded).
        suite: the suite's name, for the report.
    """

    out: Path
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    budget: str = "quick"
    task_budgets: Mapping[str, str] = field(default_factory=dict)
    tune: bool = False
    tune_seed: int = 100
    jobs: int = 1
    threads: int = 1
    epochs: int | None = None
    progress: bool = True
    report: bool = True
    run: bool = True
    suite: str | None = None

    @classmethod
    def from_suite(cls, suite: Suite, out: str | os.PathLike[str], **overrides: Any) -> BenchConfig:
        """The suite's grid with ``overrides`` (``None`` values are ignored)."""
        base = cls(
            out=Path(out), tasks=suite.tasks, methods=suite.methods,
            seeds=tuple(range(suite.seeds)), budget=suite.budget,
            task_budgets=dict(suite.task_budgets), tune=suite.tune,
            tune_seed=suite.tune_seed, jobs=suite.jobs, suite=suite.name,
        )  # fmt: skip
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def budget_of(self, task: str) -> str:
        """The budget of ``task``'s runs."""
        return self.task_budgets.get(task, self.budget)

    def validate(self, resolver: Resolver | None = None) -> None:
        """Check names and ranges.

        Raises:
            ValueError: an unknown task/method/budget (the message lists the valid names) or an
                out-of-range option.
        """
        look = resolver or RegistryResolver()
        for name in self.tasks:
            look.task(name)
        for name in self.methods:
            get_method(name)
        for budget in (self.budget, *self.task_budgets.values()):
            if budget not in BUDGETS:
                raise ValueError(f"Invalid budget: {budget!r} (expected one of {BUDGETS})")
        if not self.tasks or not self.methods or not self.seeds:
            raise ValueError(
                f"Invalid grid: {len(self.tasks)} tasks × {len(self.methods)} methods × "
                f"{len(self.seeds)} seeds (expected at least one of each)"
            )
        if self.jobs < 1 or self.threads < 1:
            raise ValueError(f"Invalid jobs/threads: {self.jobs}/{self.threads} (expected >= 1)")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"Invalid epochs: {self.epochs} (expected >= 1)")
        if self.tune_seed in self.seeds:
            raise ValueError(f"Invalid tune_seed: {self.tune_seed} (it is also an evaluation seed)")


@dataclass(frozen=True)
class TuneChoice:
    """The validation grid of one hyper-parameter of one task.

    Attributes:
        task, owner, param: e.g. ``("digits", "sam", "rho")``.
        values: the grid.
        val_acc: final validation accuracy per value (``None``: the run failed or is missing).
        chosen: the selected value.
    """

    task: str
    owner: str
    param: str
    values: tuple[float, ...]
    val_acc: tuple[float | None, ...]
    chosen: float


@dataclass
class GridSummary:
    """What :func:`run_grid` did.

    Attributes:
        planned: runs in the grid (tuning included).
        skipped: runs already in ``results.jsonl``.
        ran: runs trained now.
        failed: runs that ended ``failed`` or ``error`` (of all in the grid).
        wall_time: seconds.
        records: the grid's evaluation records (for the report).
        tuning: the validation-grid choices.
        out: output directory.
    """

    planned: int = 0
    skipped: int = 0
    ran: int = 0
    failed: int = 0
    wall_time: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    tune_records: list[dict[str, Any]] = field(default_factory=list)
    tuning: list[TuneChoice] = field(default_factory=list)
    out: Path = Path()


def _tuned_params(cfg: BenchConfig) -> list[tuple[str, str]]:
    """``(owner method, param)`` pairs that the grid's methods need tuned."""
    pairs: list[tuple[str, str]] = []
    for name in cfg.methods:
        for param, owner in get_method(name).tuned_by.items():
            if (owner, param) not in pairs:
                pairs.append((owner, param))
    return pairs


def plan_tuning(cfg: BenchConfig) -> list[RunSpec]:
    """The validation-grid runs (empty without ``cfg.tune``)."""
    if not cfg.tune:
        return []
    specs = []
    for task in cfg.tasks:
        for owner, param in _tuned_params(cfg):
            for value in get_method(owner).grids[param]:
                specs.append(
                    RunSpec(
                        task, owner, cfg.tune_seed, cfg.budget_of(task), Hyper(**{param: value}),
                        cfg.epochs, stage="tune",
                    )
                )  # fmt: skip
    return specs


def select_hyper(
    cfg: BenchConfig, records: dict[str, dict[str, Any]], resolver: Resolver | None = None
) -> tuple[dict[tuple[str, str], Hyper], list[TuneChoice]]:
    """Pick each task's hyper-parameters from the validation-grid records.

    Args:
        cfg: the grid.
        records: records by configuration hash.
        resolver: task lookup (for the hashes).

    Returns:
        ``{(task, method): Hyper}`` for every method of the grid, and the grid tables.
    """
    look = resolver or RegistryResolver()
    chosen: dict[tuple[str, str, str], float] = {}
    choices = []
    if cfg.tune:
        for task in cfg.tasks:
            t = look.task(task)
            for owner, param in _tuned_params(cfg):
                m = get_method(owner)
                values = m.grids[param]
                default = getattr(m.defaults, param)
                accs: list[float | None] = []
                for value in values:
                    spec = RunSpec(
                        task, owner, cfg.tune_seed, cfg.budget_of(task), Hyper(**{param: value}),
                        cfg.epochs, stage="tune",
                    )  # fmt: skip
                    rec = records.get(spec.config_hash(t))
                    ok = rec is not None and rec.get("status") == "ok"
                    accs.append(rec["final"]["val_acc"] if ok and rec else None)
                scored = [(a, v) for a, v in zip(accs, values, strict=True) if a is not None]
                best = default
                if scored:
                    top = max(a for a, _ in scored)
                    winners = [v for a, v in scored if a == top]
                    best = default if default in winners else min(winners)
                chosen[(task, owner, param)] = best
                choices.append(TuneChoice(task, owner, param, values, tuple(accs), best))
    hypers = {}
    for task in cfg.tasks:
        for name in cfg.methods:
            m = get_method(name)
            kw = {p: chosen.get((task, owner, p)) for p, owner in m.tuned_by.items()}
            hypers[(task, name)] = m.resolve(kw.get("rho"), kw.get("start"))
    return hypers, choices


def plan_runs(cfg: BenchConfig, hypers: dict[tuple[str, str], Hyper]) -> list[RunSpec]:
    """The evaluation runs, ordered task → seed → method (paired runs finish close together)."""
    return [
        RunSpec(task, method, seed, cfg.budget_of(task), hypers[(task, method)], cfg.epochs)
        for task in cfg.tasks
        for seed in cfg.seeds
        for method in cfg.methods
    ]


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
    with exclusive_output(cfg.out) if cfg.run else nullcontext(), interrupt_on_signals():
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
        for task in task_of.values():
            look.dataset(task)

    def todo(specs: list[RunSpec]) -> list[RunSpec]:
        done = latest_by_hash(read_records(results))
        left = []
        for spec in specs:
            rec = done.get(spec.config_hash(task_of[spec.task]))
            if rec is not None and rec.get("status") != "error":
                summary.skipped += 1
            elif cfg.run:
                left.append(spec)
        summary.planned += len(specs)
        summary.ran += len(left)
        return left

    tune_specs = plan_tuning(cfg)
    left = todo(tune_specs)
    if left:
        run_specs(left, cfg, look, results, "validation grid")
    records = latest_by_hash(read_records(results))
    hypers, summary.tuning = select_hyper(cfg, records, look)
    specs = plan_runs(cfg, hypers)
    left = todo(specs)
    if left:
        run_specs(left, cfg, look, results, "benchmark")

    records = latest_by_hash(read_records(results))
    summary.records = [
        records[s.config_hash(task_of[s.task])] for s in specs if _has(records, s, task_of)
    ]
    summary.tune_records = [
        records[s.config_hash(task_of[s.task])] for s in tune_specs if _has(records, s, task_of)
    ]
    summary.failed = sum(r.get("status") != "ok" for r in summary.records + summary.tune_records)
    summary.wall_time = time.perf_counter() - t0
    if cfg.report:
        from flatmin.bench.report import write_report

        write_report(
            cfg.out, summary.records, tuning=summary.tuning, tune_records=summary.tune_records,
            meta=_meta(cfg),
        )  # fmt: skip
    return summary


def _has(records: dict[str, dict[str, Any]], spec: RunSpec, task_of: dict[str, Task]) -> bool:
    return spec.config_hash(task_of[spec.task]) in records


def _meta(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "suite": cfg.suite,
        "budget": cfg.budget,
        "task_budgets": dict(cfg.task_budgets),
        "tasks": list(cfg.tasks),
        "methods": list(cfg.methods),
        "seeds": list(cfg.seeds),
        "tune": cfg.tune,
        "tune_seed": cfg.tune_seed,
        "epochs": cfg.epochs,
        "jobs": cfg.jobs,
        "threads": cfg.threads,
    }
