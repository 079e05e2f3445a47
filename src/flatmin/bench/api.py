"""``flatmin.bench.run``: the benchmark from Python, on built-in tasks or your own.

Example:
    >>> import flatmin.bench
    >>> result = flatmin.bench.run(  # doctest: +SKIP
    ...     tasks=["examples.own_task:my_task"], methods=["baseline", "sam"], seeds=3,
    ...     out="runs/own", rho=None)
    >>> r = result.get("examples.own_task:my_task", "sam")  # doctest: +SKIP
    >>> r.accuracy.mean, r.vs_baseline.mean, r.vs_baseline.ci, r.hyper.rho  # doctest: +SKIP

The numbers are those of :func:`~flatmin.bench.run_grid` and
:func:`~flatmin.bench.report.summarize` (the report's table): nothing is computed twice.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatmin.bench.methods import Hyper
from flatmin.bench.report import TaskRow, fold_hypers, summarize
from flatmin.bench.runner import BenchConfig, GridSummary, RegistryResolver, run_grid
from flatmin.bench.stats import Cell
from flatmin.tasks import Task

__all__ = ["BenchResult", "MethodSummary", "run"]

DEFAULT_METHODS = ("baseline", "swa", "sam", "wasam")
_FIXED = ("out", "tasks", "methods", "seeds")


@dataclass(frozen=True)
class MethodSummary:
    """One method on one task, over the evaluation seeds.

    Attributes:
        task, method: e.g. ``("examples.own_task:my_task", "sam")``.
        seeds: the evaluation seeds with a finished run.
        test_acc: test accuracy (a fraction) of each seed, in ``seeds`` order.
        accuracy: mean test accuracy in percent with its 95 % confidence interval.
        vs_baseline: the paired difference to the baseline in points, with its 95 % CI, paired
            t-test and Holm-corrected p-value (``None`` for the baseline itself, or without
            paired seeds).
        hyper: the hyper-parameters used (chosen on validation data with ``tune=True``); for a
            cross-validated task those every outer fold chose alike.
        fold_hypers: a cross-validated task's hyper-parameters per outer fold (each chosen on
            that fold's inner validation split; ``()`` for a task with fixed splits).
    """

    task: str
    method: str
    seeds: tuple[int, ...]
    test_acc: tuple[float, ...]
    accuracy: Cell
    vs_baseline: Cell | None
    hyper: Hyper
    fold_hypers: tuple[Hyper, ...] = ()


@dataclass(frozen=True)
class BenchResult:
    """What :func:`run` found: per task × method results, the report's rows and the grid.

    Attributes:
        out: the output directory (``results.jsonl``, ``report.md``).
        results: one :class:`MethodSummary` per task × method.
        rows: the report's rows (:class:`~flatmin.bench.report.TaskRow`).
        summary: the grid's :class:`~flatmin.bench.GridSummary` (runs, tuning choices, records).
    """

    out: Path
    results: tuple[MethodSummary, ...]
    rows: tuple[TaskRow, ...]
    summary: GridSummary

    def get(self, task: str, method: str) -> MethodSummary:
        """The result of ``method`` on ``task`` (``KeyError`` naming the known pairs)."""
        for r in self.results:
            if (r.task, r.method) == (task, method):
                return r
        known = [(r.task, r.method) for r in self.results]
        raise KeyError(f"No result for {(task, method)} (have {known})")


class _GivenTasks(RegistryResolver):
    """The registry, plus the :class:`Task` objects given to :func:`run` by value."""

    def __init__(self, tasks: dict[str, Task]) -> None:
        super().__init__()
        self._given = tasks

    def task(self, name: str) -> Task:
        """A given task by name, else the registry's (or an import path)."""
        return self._given[name] if name in self._given else super().task(name)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_given": self._given}  # empty for workers: see run()


TaskSpecs = Sequence[str | Task] | str | Task


def _task_names(tasks: TaskSpecs) -> tuple[tuple[str, ...], dict[str, Task]]:
    items = [tasks] if isinstance(tasks, (str, Task)) else list(tasks)
    names, given = [], {}
    for t in items:
        if isinstance(t, Task):
            given[t.name] = t
            names.append(t.name)
        elif isinstance(t, str):
            names.append(t)
        else:
            raise TypeError(f"Invalid task: {t!r} (expected a name, an import path or a Task)")
    return tuple(names), given


def _config(
    names: tuple[str, ...], methods: Sequence[str], seeds: int | Sequence[int],
    out: str | os.PathLike[str], options: dict[str, Any],
) -> BenchConfig:  # fmt: skip
    fields = {f.name for f in dataclasses.fields(BenchConfig)} - set(_FIXED)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"Invalid options: {unknown} (expected some of {sorted(fields)})")
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)):
        raise TypeError(f"Invalid seeds: {seeds!r} (expected a count or a list of seeds)")
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    options = {"progress": False, **options}
    for key in ("task_budgets", "hypers", "extra_methods"):
        options.setdefault(key, {})
    for key in ("tune_seeds", "variants", "ablation_factors"):
        if key in options:
            options[key] = tuple(options[key])
    return BenchConfig(
        out=Path(out), tasks=names, methods=tuple(methods), seeds=seed_list, **options
    )


def _test_accuracies(summary: GridSummary, task: str, method: str) -> list[tuple[int, float]]:
    """``(seed, test accuracy)`` of every finished evaluation run of ``method`` on ``task``."""
    return sorted(
        (r.seed, r.final.test_acc) for r in summary.records
        if (r.task, r.method, r.ok) == (task, method, True) and r.final.test_acc is not None
    )  # fmt: skip


def _results(
    summary: GridSummary, rows: list[TaskRow], methods: Sequence[str]
) -> list[MethodSummary]:
    out = []
    for row in rows:
        for m in methods:
            if m not in row.absolute:
                continue
            per_seed = _test_accuracies(summary, row.task, m)
            folds = fold_hypers(summary.hypers, row.task, m)
            hyper = summary.hypers.get((row.task, m), Hyper())
            if folds:  # the values all folds share
                shared = [dataclasses.asdict(hp).items() for hp in folds]
                hyper = Hyper(**{k: v for k, v in shared[0] if all((k, v) in s for s in shared)})
            out.append(MethodSummary(
                task=row.task, method=m, seeds=tuple(s for s, _ in per_seed),
                test_acc=tuple(a for _, a in per_seed), accuracy=row.absolute[m],
                vs_baseline=row.diffs.get(m), hyper=hyper, fold_hypers=folds,
            ))  # fmt: skip
    return out


def run(
    tasks: TaskSpecs,
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: int | Sequence[int] = 3,
    out: str | os.PathLike[str] = "runs/bench",
    **options: Any,
) -> BenchResult:
    """Run (or resume) a benchmark grid and return its results.

    The protocol is :func:`~flatmin.bench.run_grid`'s, unchanged: every finished run is
    appended to ``out/results.jsonl`` (a rerun trains only what is missing) and ``report.md``
    is written. A user's task goes through all of it: tuning on validation data
    (``tune=True``), nested k-fold cross-validation (``Task.folds``: tuned per outer fold,
    the folds pooled into one result), memorisation (clean labels),
    the budget ablation (``ablation_task=``), the flatness study (``analysis_task=``), worker
    processes (``jobs=``) and Ray (``executor="ray"``).

    Args:
        tasks: built-in names, import paths ``"package.module:attr"`` (what worker processes
            and Ray workers resolve), or :class:`~flatmin.tasks.Task` objects (in-process only:
            ``jobs=1`` and the local executor).
        methods: method names; ``"baseline"`` is the reference of the differences.
        seeds: the number of evaluation seeds (``0 .. seeds - 1``) or the seeds.
        out: output directory.
        **options: any other :class:`~flatmin.bench.BenchConfig` field (``budget``, ``tune``,
            ``tune_seeds``, ``hypers``, ``epochs``, ``jobs``, ``executor``, ``device``,
            ``precision``, ``ablation_task``, ``analysis_task``, ``progress`` (default
            ``False``), ``report``...).

    Returns:
        A :class:`BenchResult`.

    Raises:
        TypeError: an unknown option, or a task that is neither a name nor a ``Task``.
        ValueError: an unknown task or method, a bad option (before anything runs), or ``Task``
            objects with worker processes.
    """
    names, given = _task_names(tasks)
    cfg = _config(names, methods, seeds, out, options)
    if given and (cfg.jobs > 1 or cfg.executor != "local"):
        raise ValueError(
            f"Invalid tasks: {sorted(given)} were given as Task objects, which worker processes "
            "cannot import; pass them by import path ('package.module:attr') with jobs > 1 or Ray"
        )
    summary = run_grid(cfg, resolver=_GivenTasks(given))
    all_methods = list(dict.fromkeys(m for t in cfg.tasks for m in cfg.methods_of(t)))
    rows = summarize(summary.records, all_methods)
    return BenchResult(cfg.out, tuple(_results(summary, rows, all_methods)), tuple(rows), summary)
