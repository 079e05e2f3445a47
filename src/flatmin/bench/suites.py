"""Named benchmark suites: which tasks, methods, seeds and budget ``flatmin bench`` runs.

* ``quick`` — the README's first command: one task per domain (the vision one with 40 % label
  noise, trained to memorise it), the four methods of Kaddour et al. (baseline, SWA, SAM,
  WASAM), 3 seeds and the methods' default hyper-parameters (rho = 0.05, SWA from 75 % of the
  budget; no validation grid), so that it takes a few minutes on 2 CPU cores.
* ``full`` — the committed run in ``docs/results/``: two or three tasks per domain, among them a
  label-noise task trained long enough for SGD to memorise the noise, ASAM and the cheap SAM
  variants as well, 3 seeds, the ``full`` budgets, and rho / start chosen per task on the
  validation split from the methods' grids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["SUITES", "Suite", "get_suite", "suite_names", "unknown_suite_message"]


@dataclass(frozen=True)
class Suite:
    """A grid of tasks × methods × seeds at one budget.

    Attributes:
        name: registry name (``flatmin bench --suite NAME``).
        description: one line.
        tasks: task names.
        methods: method names (``baseline`` first: the others are reported against it).
        seeds: number of evaluation seeds (``0 .. seeds - 1``).
        budget: ``"quick"`` or ``"full"`` recipes of the tasks.
        task_budgets: per-task exceptions to ``budget``.
        tune: choose rho / start per task on the validation split (the methods' grids).
        tune_seed: the seed of the validation-grid runs (not one of the evaluation seeds).
        jobs: default number of parallel worker processes.
    """

    name: str
    description: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: int
    budget: str
    tune: bool
    task_budgets: Mapping[str, str] = field(default_factory=dict)
    tune_seed: int = 100
    jobs: int = 2


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "quick",
            "3 domains (one with 40 % label noise), 4 methods, 3 seeds, default rho/start",
            tasks=("digits-noisy40", "rotten-tomatoes", "mutag"),
            methods=("baseline", "swa", "sam", "wasam"),
            seeds=3,
            budget="quick",
            # The cheap tasks at their full budgets: SGD memorises the noisy labels, GIN fits
            # MUTAG, and the text task trains 12 epochs, so that SWA from 75 % averages 3 of them.
            task_budgets={"digits-noisy40": "full", "rotten-tomatoes": "full", "mutag": "full"},
            tune=False,
        ),
        Suite(
            "full",
            "3 domains + label noise, 9 methods, 3 seeds, full budgets, rho/start tuned on val",
            tasks=(
                "digits",
                "digits-noisy40",
                "mnist-5k",
                "rotten-tomatoes",
                "reuters-r8",
                "mutag",
                "mutag-gcn",
                "drosophila",
            ),
            methods=("baseline", "swa", "sam", "asam", "wasam", "samk", "samk5", "looksam", "esam"),
            seeds=3,
            budget="full",
            tune=True,
        ),
    )
}


def suite_names() -> list[str]:
    """Names of the suites."""
    return list(SUITES)


def unknown_suite_message(name: str) -> str:
    """``Unknown suite: 'x' (known: quick, full)``."""
    return f"Unknown suite: {name!r} (known: {', '.join(SUITES)})"


def get_suite(name: str) -> Suite:
    """The suite ``name``.

    Raises:
        ValueError: unknown name (the message lists the known suites).
    """
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(unknown_suite_message(name)) from None
