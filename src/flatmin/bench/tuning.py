"""The tuner seam: how a grid's hyper-parameters are chosen, through the grid's executor.

A :class:`Tuner` is a setting of :class:`~flatmin.bench.runner.BenchConfig` (the CLI builds it).
For one grid it starts a :class:`TuningSession`, which the runner drives ask/tell::

    session = tuner.start(cfg, task_of)
    while not session.done:
        specs = session.ask(found)            # tuning runs (stage "tune") needed now
        trained = run(specs)                  # the grid's executor; records -> results.jsonl
        found = records()                     # every record, by configuration hash
        session.tell(found, trained)
    outcome = session.outcome(found)          # the hyper-parameters, and what the report shows

Every tuning run is a :class:`~flatmin.bench.train.RunSpec` recorded in ``results.jsonl`` like
any run: a finished one is never retrained (a resumed session asks for the same specs and finds
them), ``--jobs`` and ``--executor ray`` apply, and the runner retries an ``error`` run once per
invocation. :class:`GridTuner` is the reference protocol (:func:`flatmin.bench.plan.plan_tuning`);
``flatmin.tune.bench.OptunaTuner`` an Optuna search (bench never imports ``flatmin.tune``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flatmin.bench.methods import Hyper
from flatmin.bench.plan import Grid, GridState, TuneChoice, TuningPlan, plan_tuning
from flatmin.bench.records import Record
from flatmin.bench.train import RunSpec
from flatmin.tasks import Task

__all__ = [
    "GridTuner",
    "SearchSummary",
    "Tuner",
    "TuningOutcome",
    "TuningSession",
]


@dataclass(frozen=True)
class SearchSummary:
    """One search's line in the report (``OptunaTuner``).

    Attributes:
        task, method: what was searched.
        chosen: the best trial's hyper-parameters (``None``: no trial completed).
        score: its score (``mean − penalty · std`` over the tuning seeds), and ``mean``.
        trials: finished trials by state (``{"complete": 10, "failed": 2}``).
    """

    task: str
    method: str
    chosen: Mapping[str, float] | None
    score: float | None
    mean: float | None
    trials: Mapping[str, int]


@dataclass(frozen=True)
class TuningOutcome:
    """What a tuning session chose.

    Attributes:
        hypers: the tuned methods' hyper-parameters by ``(task, method)`` (the runner gives the
            others their fixed or default values).
        specs: every tuning run the choices rest on (the report lists the failed ones).
        choices: the validation grids (:class:`GridTuner`).
        searches: the searches (``OptunaTuner``).
    """

    hypers: Mapping[tuple[str, str], Hyper]
    specs: tuple[RunSpec, ...] = ()
    choices: tuple[TuneChoice, ...] = ()
    searches: tuple[SearchSummary, ...] = ()


class TuningSession(Protocol):
    """One grid's tuning, driven ask/tell by the runner (see the module docstring)."""

    @property
    def done(self) -> bool:
        """Nothing more to ask (the choices are final, or no run could be trained)."""
        ...

    def ask(self, found: Mapping[str, Record]) -> Sequence[RunSpec]:
        """The tuning runs needed now (found ones included: the runner skips them)."""
        ...

    def tell(self, found: Mapping[str, Record], trained: int) -> None:
        """The records after the asked runs were trained (``trained`` of them this time)."""
        ...

    def outcome(self, found: Mapping[str, Record]) -> TuningOutcome:
        """The choices (after ``done``; before it: the best so far, or the defaults)."""
        ...


class Tuner(Protocol):
    """A way to choose hyper-parameters on the validation split (a :class:`BenchConfig` field)."""

    @property
    def name(self) -> str:
        """``"grid"``, ``"optuna"``, ... (the report's metadata)."""
        ...

    def check(self) -> None:
        """Raise ``ValueError`` for a bad setting or a missing optional dependency."""
        ...

    def describe(self, tune_seeds: Sequence[int]) -> str:
        """The report's sentence on how hyper-parameters were chosen."""
        ...

    def start(self, grid: Grid, task_of: Mapping[str, Task]) -> TuningSession:
        """A session for the grid ``grid`` (tasks by name in ``task_of``)."""
        ...


@dataclass(frozen=True)
class GridTuner:
    """The reference protocol: validation grids in rounds (:func:`.plan.plan_tuning`)."""

    name: str = field(default="grid", init=False)

    def check(self) -> None:
        """Nothing to check."""

    def describe(self, tune_seeds: Sequence[int]) -> str:
        """The report's sentence."""
        return (
            "Hyper-parameters: every tuned hyper-parameter is chosen per task on the validation "
            f"split (clean labels) by the **mean over tuning seeds {list(tune_seeds)}** "
            "(never evaluation seeds); grids at an edge are extended (see 'Validation grids')."
        )

    def start(self, grid: Grid, task_of: Mapping[str, Task]) -> TuningSession:
        """A session of validation-grid rounds."""
        return _GridSession(grid, task_of)


class _GridSession:
    """Rounds of :func:`plan_tuning`: the same grids again after new records, else extend."""

    def __init__(self, grid: Grid, task_of: Mapping[str, Task]) -> None:
        self.grid, self.task_of = grid, task_of
        self.state: GridState = {}
        self.plan: TuningPlan | None = None
        self.done = False

    def ask(self, found: Mapping[str, Record]) -> Sequence[RunSpec]:
        plain = {h: r.to_dict() for h, r in found.items()}
        self.plan = plan_tuning(self.grid, self.state, plain, self.task_of)
        return self.plan.specs

    def tell(self, found: Mapping[str, Record], trained: int) -> None:
        if trained or self.plan is None:
            return  # plan again with the same grids, on the new records
        missing = any(s.config_hash(self.task_of[s.task]) not in found for s in self.plan.specs)
        if self.plan.state == self.state or missing:  # missing: only without training
            self.done = True
        else:
            self.state = self.plan.state

    def outcome(self, found: Mapping[str, Record]) -> TuningOutcome:
        plan = self.plan or plan_tuning(self.grid, self.state, {}, self.task_of)
        return TuningOutcome(
            hypers={key: choice.hyper for key, choice in plan.choices.items()},
            specs=tuple(plan.specs),
            choices=tuple(plan.choices.values()),
        )
