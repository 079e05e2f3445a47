"""The benchmark runner: a resumable grid of tasks × methods × seeds.

Stages (the protocol is :mod:`flatmin.bench.plan`):

1. **Tuning** (``tune=True``): the validation grids at the tuning seeds, in rounds, until every
   method's choice is final (grids at an edge are extended); without ``tune`` the suite's fixed
   hyper-parameters (``hypers``) or the methods' defaults are used.
2. **Evaluation**: every (task, method, seed) at the chosen hyper-parameters; views of one
   trajectory share its run (baseline/swa, sam/wasam).
3. **Budget ablation** (``ablation_task``): baseline, SWA, SAM and WASAM of one task at other
   multiples of its epoch budget. With ``tune`` each budget is the task variant
   ``<task>-x<F>`` (:meth:`~flatmin.tasks.Task.with_budget`), tuned in stage 1 like every task
   (rho and start chosen again per budget), so that what the ablation shows is a budget's effect,
   not the 1× choices' mismatch; without ``tune`` the fixed hyper-parameters are used.
4. **Flatness** (``analysis_task``): the first evaluation seed's baseline and SAM runs are
   trained again (deterministically: the test accuracy must match the recorded one) with
   checkpoints, and their flatness is measured (:mod:`flatmin.bench.flatness`).

Nested cross-validation: a cross-validated task (``Task.folds = k``) enters the grid as its ``k``
fold tasks ``<task>@fold<f>`` (:meth:`~flatmin.tasks.Task.fold`), each a task with fixed splits
(outer fold ``f``'s inner training and validation splits, and test fold ``f``), so every stage
above runs per outer fold: ``rho`` and ``start`` are chosen on that fold's inner validation split
only. The results are then pooled per method and seed into one result of the task
(:func:`~flatmin.bench.records.pool_folds`: every sample tested once). The budget ablation and
the flatness study need a task with fixed splits (name one fold, ``mutag@fold0``).

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
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flatmin._proc import interrupt_on_signals
from flatmin.bench.device import check_precision, check_support, resolve_device
from flatmin.bench.execute import check_executor, exclusive_output, make_executor
from flatmin.bench.executors import Executor, Progress
from flatmin.bench.flatness import flatness_study, load_flatness
from flatmin.bench.methods import ABLATION_METHODS, Grid, Hyper, get_method
from flatmin.bench.plan import TuneChoice, eval_trajectory, method_result, plan_eval
from flatmin.bench.records import MethodResult, Record, pool_folds
from flatmin.bench.report import write_report
from flatmin.bench.resolver import RegistryResolver, Resolver
from flatmin.bench.store import append_record, latest_by_hash, read_records
from flatmin.bench.suites import Suite
from flatmin.bench.train import RunSpec
from flatmin.bench.tuning import GridTuner, SearchSummary, Tuner, TuningOutcome
from flatmin.data import Dataset
from flatmin.tasks import BUDGETS, Task, split_fold_name

__all__ = [
    "BenchConfig",
    "GridSummary",
    "RegistryResolver",
    "Resolver",
    "meta_of",
    "method_result",
    "run_grid",
]

RESULTS = "results.jsonl"


@dataclass(frozen=True)
class BenchConfig:
    """Options of one ``flatmin bench`` invocation.

    Attributes:
        out: output directory (``results.jsonl``, ``report.md``, ``results.csv``, figures).
        tasks, methods: grid axes (``baseline`` is the reference of the report).
        seeds: evaluation seeds.
        task_seeds: per-task exceptions to ``seeds`` (more seeds where a CI needs the power).
        budget: the tasks' ``"quick"`` or ``"full"`` recipes.
        task_budgets: per-task exceptions to ``budget`` (``{"mutag": "full"}``).
        tune: choose the hyper-parameters on the validation split (:mod:`flatmin.bench.plan`).
        tune_seeds: seeds of the validation-grid runs (disjoint from ``seeds``).
        grids: validation-grid values replacing the methods' own, by trajectory method and
            hyper-parameter (``{"sam": {"rho": (0.05, 0.2, 0.5)}}``: SAM's and WASAM's rho);
            extended at an edge like the methods' grids.
        tuner: how ``tune`` chooses (:class:`~flatmin.bench.tuning.Tuner`): the validation
            grid (:class:`~flatmin.bench.tuning.GridTuner`, the reference protocol) or another
            tuner the caller builds (``flatmin.tune.bench.OptunaTuner``); its runs go through
            the grid's executor and ``results.jsonl`` like every run.
        hypers: fixed hyper-parameters by task and method (used without ``tune``; missing ones
            are the methods' defaults).
        hyper_source: where ``hypers`` come from (shown in the report).
        extra_methods: methods run on some tasks only, by task (e.g. the cheap SAM variants on
            the label-noise tasks).
        task_methods: the methods of some tasks instead of ``methods`` and ``extra_methods``
            (the retuned budget ablation's tasks).
        variants: the methods the report shows as cheap SAM variants (cost and the share of
            SAM's gain kept) instead of in the headline table.
        ablation_task: train baseline/SWA/SAM/WASAM of this task also at ``ablation_factors`` ×
            its epoch budget (with ``tune``: tuned again per budget, as the tasks
            ``<task>-x<F>``).
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
    task_seeds: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    budget: str = "quick"
    task_budgets: Mapping[str, str] = field(default_factory=dict)
    tune: bool = False
    tune_seeds: tuple[int, ...] = (100, 101)
    grids: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)
    tuner: Tuner = field(default_factory=GridTuner)
    hypers: Mapping[str, Mapping[str, Hyper]] = field(default_factory=dict)
    hyper_source: str | None = None
    extra_methods: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    task_methods: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
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
        """The suite's grid with ``overrides`` (``None`` values are ignored).

        A ``seeds`` override applies to every task (the suite's per-task seed counts are
        dropped with it).
        """
        task_seeds = {t: tuple(range(n)) for t, n in suite.task_seeds.items()}
        if overrides.get("seeds") is not None:
            task_seeds = {}
        base = cls(
            out=Path(out), tasks=suite.tasks, methods=suite.methods,
            seeds=tuple(range(suite.seeds)), task_seeds=task_seeds, budget=suite.budget,
            task_budgets=dict(suite.task_budgets), tune=suite.tune, grids=dict(suite.grids),
            tune_seeds=suite.tune_seeds, hypers=suite.hypers, hyper_source=suite.hyper_source,
            extra_methods=dict(suite.extra_methods), variants=suite.variants,
            ablation_task=suite.ablation_task, analysis_task=suite.analysis_task,
            jobs=suite.jobs, suite=suite.name, device=suite.device, precision=suite.precision,
        )  # fmt: skip
        given = {k: v for k, v in overrides.items() if v is not None}
        cfg = replace(base, **given)
        if "tasks" not in given:
            return cfg
        # A subset of the suite's tasks: its per-task settings of the others do not apply.
        keep = set(cfg.tasks)

        def only(name: str, table: Mapping[str, Any]) -> Any:
            return table if name in given else {t: v for t, v in table.items() if t in keep}

        def special(name: str, task: str | None) -> str | None:
            return task if name in given or task in keep else None

        return replace(
            cfg, task_budgets=only("task_budgets", cfg.task_budgets),
            hypers=only("hypers", cfg.hypers),
            extra_methods=only("extra_methods", cfg.extra_methods),
            task_seeds=only("task_seeds", cfg.task_seeds),
            ablation_task=special("ablation_task", cfg.ablation_task),
            analysis_task=special("analysis_task", cfg.analysis_task),
        )  # fmt: skip

    def budget_of(self, task: str) -> str:
        """The budget of ``task``'s runs."""
        return self.task_budgets.get(task, self.budget)

    def seeds_of(self, task: str) -> tuple[int, ...]:
        """The evaluation seeds of ``task``."""
        return self.task_seeds.get(task, self.seeds)

    def methods_of(self, task: str) -> tuple[str, ...]:
        """The methods run on ``task``: its ``task_methods``, else ``methods`` and its extras."""
        if task in self.task_methods:
            return self.task_methods[task]
        extra = self.extra_methods.get(task, ())
        return self.methods + tuple(m for m in extra if m not in self.methods)

    def validate(self, resolver: Resolver | None = None) -> None:
        """Raise ``ValueError`` for an unknown name or a bad option, before anything runs."""
        resolver = resolver or RegistryResolver()
        for name in self.tasks:
            resolver.task(name)  # raises with the list of known tasks
            parent, fold = split_fold_name(name)
            if fold is not None and parent in self.tasks and resolver.task(parent).folds:
                raise ValueError(
                    f"Invalid tasks: {name!r} is a fold of {parent!r}, which runs all its folds"
                )
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
            if special is not None and (k := resolver.task(special).folds):
                raise ValueError(
                    f"Invalid ablation/analysis task: {special!r} is cross-validated ({k} folds; "
                    f"name one fold as a task instead, e.g. {special + '@fold0'!r})"
                )
        for seeds in (self.seeds, *self.task_seeds.values()):
            if not seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"Invalid seeds: {seeds} (expected distinct seeds)")
            if set(self.tune_seeds) & set(seeds):
                raise ValueError(
                    f"Invalid tune_seeds: {self.tune_seeds} (they overlap the evaluation seeds "
                    f"{seeds})"
                )
        for name in self.task_seeds:
            if name not in self.tasks:
                raise ValueError(f"Invalid task seeds: {name!r} is not one of the tasks")
        if self.jobs < 1 or self.threads < 1:
            raise ValueError(f"Invalid jobs/threads: {self.jobs}/{self.threads} (expected >= 1)")
        check_executor(self)
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"Invalid epochs: {self.epochs} (expected >= 1)")
        if self.tune:
            self.tuner.check()
        if self.tune and not self.tune_seeds:
            raise ValueError("Invalid tune_seeds: () (tuning needs at least one seed)")
        if any(f <= 0 or f == 1 for f in self.ablation_factors):
            raise ValueError(
                f"Invalid ablation_factors: {self.ablation_factors} (expected > 0 and != 1)"
            )
        for name, grid in self.grids.items():
            _check_grids(name, grid)
        for table in self.hypers.values():
            for name, hyper in table.items():
                eval_trajectory(get_method(name), get_method(name).resolve(hyper))
        check_precision(self.precision)
        resolve_device(self.device)  # DeviceUnavailableError (a ValueError) if it is not there
        for name in self.tasks:
            for method in self.methods_of(name):
                check_support(RunSpec(name, method, 0, precision=self.precision))


def _check_grids(method: str, table: Mapping[str, tuple[float, ...]]) -> None:
    """Refuse a grid of a hyper-parameter that ``method`` does not search, or bad values."""
    m = get_method(method)
    for param, values in table.items():
        if param not in m.grids or m.trajectory != method:
            raise ValueError(
                f"Invalid grid: {method}.{param} (the trajectory {method!r} searches "
                f"{list(m.grids) if m.trajectory == method else []})"
            )
        Grid(tuple(values), extend=m.grids[param].extend)  # ValueError on bad values


@dataclass
class GridSummary:
    """What :func:`run_grid` did.

    Attributes:
        planned: runs in the grid (tuning and ablation included).
        skipped: runs already in ``results.jsonl``.
        ran: runs trained now.
        failed: runs that ended ``failed`` or ``error`` (of all in the grid).
        wall_time: seconds.
        records: one result per (task, method, seed) of the evaluation grid (a cross-validated
            task's folds pooled into one result).
        fold_records: the results of the cross-validated tasks' fold tasks (``mutag@fold3``).
        tune_records: the tuning runs' records.
        ablation: results of the budget ablation (``budget_factor`` set).
        tuning: the validation-grid choices (:class:`~flatmin.bench.tuning.GridTuner`).
        searches: the searches of another tuner (``OptunaTuner``).
        hypers: the hyper-parameters used, by (task, method) (by fold task for a
            cross-validated task).
        flatness: the flatness study (``None`` without ``analysis_task``).
        out: output directory.
    """

    planned: int = 0
    skipped: int = 0
    ran: int = 0
    failed: int = 0
    wall_time: float = 0.0
    records: list[MethodResult] = field(default_factory=list)
    fold_records: list[MethodResult] = field(default_factory=list)
    tune_records: list[Record] = field(default_factory=list)
    ablation: list[MethodResult] = field(default_factory=list)
    tuning: list[TuneChoice] = field(default_factory=list)
    searches: list[SearchSummary] = field(default_factory=list)
    hypers: dict[tuple[str, str], Hyper] = field(default_factory=dict)
    flatness: dict[str, Any] | None = None
    out: Path = Path()


def run_grid(
    cfg: BenchConfig,
    *,
    resolver: Resolver | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> GridSummary:
    """Run (or resume) the grid and write the report.

    Args:
        cfg: the grid and its options.
        resolver: task and dataset lookup (default: the registry and the data cache).
        on_record: called in this process with each run's record as it is appended to
            ``results.jsonl``, whichever executor trained it (live curves: ``--log``).

    Returns:
        A :class:`GridSummary`.

    Raises:
        ValueError: an unknown name or a bad option (before anything runs); a Ray cluster that
            cannot be reached or cannot host a run
            (:class:`~flatmin.bench.ray_executor.RayUnavailableError`).
        flatmin.bench.execute.OutputLockedError: another grid runs in ``cfg.out`` (before
            anything runs).
        flatmin.data.DataUnavailableError: a dataset cannot be fetched (before anything runs).
        flatmin._proc.Interrupted: SIGINT or SIGTERM; the finished runs are kept.
    """
    look = _FoldResolver(resolver or RegistryResolver())
    cfg.validate(look)
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))  # "auto" -> what it found
    lock = exclusive_output(cfg.out) if cfg.run else nullcontext()
    with lock, interrupt_on_signals(), make_executor(cfg, look) as executor:
        return _Grid(cfg, look, executor, on_record).run()


class _FoldResolver:
    """A resolver that also resolves the fold tasks (``<task>@fold<f>``) of its tasks."""

    def __init__(self, inner: Resolver) -> None:
        self.inner = inner

    def task(self, name: str) -> Task:
        """The task ``name``, or outer fold ``f`` of the task it names (:meth:`Task.fold`)."""
        parent, fold = split_fold_name(name)
        return self.inner.task(name) if fold is None else self.inner.task(parent).fold(fold)

    def dataset(self, task: Task) -> Dataset | None:
        """The inner resolver's dataset (a fold task's is its task's: it cuts its own fold)."""
        return self.inner.dataset(task)


def _fold_grid(cfg: BenchConfig, look: Resolver) -> tuple[BenchConfig, dict[str, tuple[str, ...]]]:
    """``cfg`` with each cross-validated task replaced by its fold tasks, and those by task.

    The per-task settings (budget, fixed hyper-parameters, extra methods) of a cross-validated
    task apply to each of its folds.
    """
    folds = {}
    for name in cfg.tasks:
        k = look.task(name).folds
        if k:
            folds[name] = tuple(f"{name}@fold{f}" for f in range(k))

    def per_fold(table: Mapping[str, Any]) -> dict[str, Any]:
        return {n: v for t, v in table.items() for n in folds.get(t, (t,))}

    return replace(
        cfg, tasks=tuple(n for t in cfg.tasks for n in folds.get(t, (t,))),
        task_budgets=per_fold(cfg.task_budgets), hypers=per_fold(cfg.hypers),
        extra_methods=per_fold(cfg.extra_methods), task_seeds=per_fold(cfg.task_seeds),
    ), folds  # fmt: skip


class _Grid:
    """One invocation of a grid: its stages, and the runs they ask for (trained at most once)."""

    def __init__(
        self,
        cfg: BenchConfig,
        look: Resolver,
        executor: Executor,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.meta = meta_of(cfg)  # the tasks as given, cross-validated ones unexpanded
        cfg, self.folds = _fold_grid(cfg, look)
        self.cfg, self.look, self.executor, self.on_record = cfg, look, executor, on_record
        self.results = cfg.out / RESULTS
        self.summary = GridSummary(out=cfg.out)
        self.task_of: dict[str, Task] = {name: look.task(name) for name in cfg.tasks}
        self.task_of.update({name: look.task(name) for name in self.ablation_tasks().values()})
        self.counted: set[str] = set()
        # Trained in this invocation: an error is retried by the next one, not again now.
        self.attempted: set[str] = set()

    def records(self) -> dict[str, Record]:
        """Every record of ``results.jsonl``, the last one of each hash."""
        return latest_by_hash(read_records(self.results))

    def hash_of(self, spec: RunSpec) -> str:
        """``spec``'s configuration hash."""
        return spec.config_hash(self.task_of[spec.task])

    def train(self, specs: Sequence[RunSpec], desc: str) -> int:
        """Train the specs without a finished record, each once per invocation; return how many."""
        done = self.records()
        left, hashes = [], set()
        for spec in specs:
            h = self.hash_of(spec)
            if h in hashes:
                continue
            hashes.add(h)
            rec = done.get(h)
            finished = rec is not None and rec.finished
            if h not in self.counted:
                self.counted.add(h)
                self.summary.planned += 1
                self.summary.skipped += finished
            if not finished and self.cfg.run and h not in self.attempted:
                self.attempted.add(h)
                left.append(spec)
        self.summary.ran += len(left)
        if left:
            progress = Progress(len(left), desc, self.cfg.progress)
            try:
                self.executor.run(left, self.append, progress)
            finally:
                progress.close()
        return len(left)

    def append(self, spec: RunSpec, record: dict[str, Any]) -> None:
        """Append a finished run's record to ``results.jsonl`` (this process only)."""
        append_record(self.results, record)
        if self.on_record is not None:
            self.on_record(record)

    def run(self) -> GridSummary:
        t0 = time.perf_counter()
        cfg, summary = self.cfg, self.summary
        cfg.out.mkdir(parents=True, exist_ok=True)
        if cfg.run:
            # Fetch and load every dataset once in this process before any worker starts: a
            # missing source fails here with one clear error, and workers never download at once.
            for task in self.task_of.values():
                self.look.dataset(task)
        outcome = self.tune()
        summary.hypers = self.hypers(outcome)
        summary.tuning, summary.searches = list(outcome.choices), list(outcome.searches)
        eval_specs = self.plan(cfg.tasks, cfg.methods_of, cfg.epochs)
        self.train(list(eval_specs.values()), "benchmark")
        ablation = self.ablation_specs()
        self.train(list(ablation.values()), "budget ablation")
        found = self.records()
        self.collect(found, eval_specs, ablation, outcome.specs)
        if cfg.analysis_task is not None and cfg.run:
            summary.flatness = self.flatness(cfg.analysis_task, found, eval_specs)
        elif cfg.analysis_task is not None:
            summary.flatness = load_flatness(cfg.out)
        summary.wall_time = time.perf_counter() - t0
        if cfg.report:
            write_report(cfg.out, summary, meta=self.meta)
        return summary

    # -- 1. tuning ----------------------------------------------------------------------------

    def ablation_tasks(self) -> dict[float, str]:
        """The retuned budget ablation's tasks by factor.

        ``{}`` without ``tune``, and with an ``epochs`` override (a smoke run: the override would
        tune every budget at the same epochs), where the ablation uses the 1× choices.
        """
        cfg, at = self.cfg, self.cfg.ablation_task
        if at is None or not cfg.tune or cfg.epochs is not None:
            return {}
        return {f: f"{at}-x{f:g}" for f in cfg.ablation_factors}

    def tuning_grid(self) -> BenchConfig:
        """The configuration the tuner searches: the tasks and the ablation's budget variants."""
        cfg, at = self.cfg, self.cfg.ablation_task
        extra = tuple(self.ablation_tasks().values())
        if at is None or not extra:
            return cfg
        methods = tuple(m for m in ABLATION_METHODS if m in cfg.methods_of(at))
        return replace(
            cfg, tasks=(*cfg.tasks, *extra),
            task_methods={**cfg.task_methods, **dict.fromkeys(extra, methods)},
            task_budgets={**cfg.task_budgets, **dict.fromkeys(extra, cfg.budget_of(at))},
        )  # fmt: skip

    def tune(self) -> TuningOutcome:
        """The tuner's session, driven ask/tell through the executor (none without ``tune``)."""
        if not self.cfg.tune:
            return TuningOutcome(hypers={})
        session = self.cfg.tuner.start(self.tuning_grid(), self.task_of)
        found = self.records()
        while not session.done:
            trained = self.train(session.ask(found), "validation grid")
            found = self.records()
            session.tell(found, trained)
        return session.outcome(found)

    def hypers(self, outcome: TuningOutcome) -> dict[tuple[str, str], Hyper]:
        """The tuned hyper-parameters, else the suite's fixed ones, else the defaults."""
        hypers = dict(outcome.hypers)
        grid = self.tuning_grid()
        for task in grid.tasks:
            for name in grid.methods_of(task):
                if (task, name) not in hypers:
                    fixed = self.cfg.hypers.get(task, {}).get(name)
                    hypers[(task, name)] = get_method(name).resolve(fixed)
        return hypers

    # -- 2. evaluation and 3. budget ablation -------------------------------------------------

    def plan(
        self, tasks: Sequence[str], methods_of: Callable[[str], Sequence[str]], epochs: int | None
    ) -> dict[tuple[str, str, int], RunSpec]:
        """The evaluation runs of ``tasks`` (their ``methods_of``) at every evaluation seed."""
        cfg, specs = self.cfg, {}
        for task in tasks:
            specs.update(plan_eval(
                [task], methods_of(task), cfg.seeds_of(task), self.summary.hypers, cfg.budget_of,
                epochs, device=cfg.device, precision=cfg.precision,
            ))  # fmt: skip
        return specs

    def ablation_specs(self) -> dict[tuple[str, str, int, float], RunSpec]:
        """Baseline, SWA, SAM and WASAM of the ablation task at other epoch budgets.

        Keyed by the ablation task (not its budget variant), method, seed and factor.
        """
        cfg, at = self.cfg, self.cfg.ablation_task
        if at is None:
            return {}
        base_epochs = cfg.epochs or self.task_of[at].recipe(cfg.budget_of(at)).epochs
        methods = [m for m in ABLATION_METHODS if m in cfg.methods_of(at)]
        tuned = self.ablation_tasks()
        grid = self.tuning_grid()
        out = {}
        for factor in cfg.ablation_factors:
            task = tuned.get(factor, at)
            # A variant's recipe has the scaled epochs (and there is no override, see above).
            epochs = None if task != at else max(1, round(factor * base_epochs))
            specs = plan_eval(
                [task], methods, cfg.seeds_of(at), self.summary.hypers, grid.budget_of, epochs,
                device=cfg.device, precision=cfg.precision,
            )  # fmt: skip
            for (_, name, seed), spec in specs.items():
                out[(at, name, seed, factor)] = spec
        return out

    # -- results and 4. flatness ----------------------------------------------------------------

    def result(self, rec: Record, task: str, name: str, factor: float | None) -> MethodResult:
        """``name``'s result read from its trajectory's record."""
        hyper = self.summary.hypers[(task, name)]
        return MethodResult.parse(method_result(rec.to_dict(), name, hyper), rec, factor)

    def collect(
        self,
        found: Mapping[str, Record],
        eval_specs: Mapping[tuple[str, str, int], RunSpec],
        ablation: Mapping[tuple[str, str, int, float], RunSpec],
        tune_specs: Sequence[RunSpec],
    ) -> None:
        """The summary's results, tuning records and failure count from the records."""
        summary = self.summary
        results = [
            self.result(rec, t, name, None) for (t, name, _), spec in eval_specs.items()
            if (rec := found.get(self.hash_of(spec))) is not None
        ]  # fmt: skip
        parent_of = {n: t for t, names in self.folds.items() for n in names}
        summary.fold_records = [r for r in results if r.task in parent_of]
        by = {(r.task, r.method, r.seed): r for r in summary.fold_records}
        for r in results:
            if r.task not in parent_of:
                summary.records.append(r)
            elif r.task == self.folds[parent_of[r.task]][0]:  # pooled, in the grid's order
                parts = [by.get((n, r.method, r.seed)) for n in self.folds[parent_of[r.task]]]
                if all(p is not None for p in parts):  # a fold not run yet: no result yet
                    summary.records.append(pool_folds(parent_of[r.task], parts))  # type: ignore[arg-type]
        for (t, name, _, factor), spec in ablation.items():
            if (rec := found.get(self.hash_of(spec))) is not None:
                # Read with the variant's own choices, reported under the ablation task.
                result = self.result(rec, spec.task, name, factor)
                summary.ablation.append(replace(result, task=t))
        tune_hashes = dict.fromkeys(self.hash_of(s) for s in tune_specs)
        summary.tune_records = [found[h] for h in tune_hashes if h in found]
        all_runs = {self.hash_of(s) for s in (*eval_specs.values(), *ablation.values())}
        all_runs |= set(tune_hashes)
        summary.failed = sum(found[h].status != "ok" for h in all_runs if h in found)

    def flatness(
        self,
        an: str,
        found: Mapping[str, Record],
        eval_specs: Mapping[tuple[str, str, int], RunSpec],
    ) -> dict[str, Any]:
        """The flatness study of task ``an``'s first-seed baseline and SAM runs."""
        seed = self.cfg.seeds[0]
        specs = {
            name: eval_specs[(an, name, seed)]
            for name in ABLATION_METHODS
            if (an, name, seed) in eval_specs
        }
        return flatness_study(
            self.cfg.out, self.task_of[an], specs,
            {n: self.summary.hypers[(an, n)] for n in specs},
            {h: r.to_dict() for h, r in found.items()}, resolver=self.look,
            threads=self.cfg.threads,
        )  # fmt: skip


def meta_of(cfg: BenchConfig) -> dict[str, Any]:
    """The grid's options as the report's metadata."""
    return {
        "suite": cfg.suite,
        "budget": cfg.budget,
        "task_budgets": dict(cfg.task_budgets),
        "tasks": list(cfg.tasks),
        "methods": list(cfg.methods),
        "extra_methods": {t: list(ms) for t, ms in cfg.extra_methods.items()},
        "variants": list(cfg.variants),
        "seeds": list(cfg.seeds),
        "task_seeds": {t: list(s) for t, s in cfg.task_seeds.items()},
        "grids": {m: {p: list(v) for p, v in g.items()} for m, g in cfg.grids.items()},
        "tune": cfg.tune,
        "tune_seeds": list(cfg.tune_seeds),
        "tuner": cfg.tuner.name,
        "tuning": cfg.tuner.describe(cfg.tune_seeds) if cfg.tune else None,
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
