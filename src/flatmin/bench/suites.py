"""Named benchmark suites: which tasks, methods, seeds and budget ``flatmin bench`` runs.

* ``full`` — the committed run in ``docs/results/``: three domains, label noise on three vision
  datasets and one text dataset beside clean tasks (among them ``fashion-mnist-aug``, the
  papers' clean regime: a 4× wider CNN that fits 2000 Fashion-MNIST images under random crop +
  flip in 120 epochs, 99.65 % train accuracy), the methods of Kaddour et al. (baseline,
  SWA, SAM, WASAM) with both definitions of SWA, ASAM on two noisy vision tasks, the cheap SAM
  variants (SAM every k, LookSAM, ESAM, Momentum-SAM) on two label-noise tasks, 5 evaluation
  seeds (10 on Fashion-MNIST with 40 % noise, for power), every hyper-parameter chosen on
  validation data with 2 tuning seeds (:mod:`flatmin.bench.plan`), a budget ablation (tuned
  again per budget) and a flatness study.
* ``quick`` — the README's main command: one task per domain, baseline / SWA / SAM / WASAM,
  3 seeds, **no tuning**: each task's hyper-parameters are the full run's validation choices,
  written below with where they came from, so that its table shows what the full run shows in a
  few minutes.
* ``gpu`` — the GPU-size task ``fashion-mnist-full`` (all 55k training images, a WRN-16-4),
  baseline / SWA / SAM / WASAM, 3 seeds, bf16 on ``--device auto``, two runs sharing the device
  (``jobs=2``), no tuning: ``rho = 0.05`` is Foret et al.'s choice for a WRN on Fashion-MNIST
  (arXiv:2010.01412, Appendix C.1, Table 7) and ``start = 0.75`` is the quick suite's. Six
  trajectories of 10 epochs (SWA and WASAM are views of the baseline and SAM runs), sized for
  about 15 minutes on one current GPU. The anchor is Foret et al.'s Fashion-MNIST row
  (Appendix B.1, Table 5, test error %, 95 % CI over 5 runs, WideResNet-28-10): basic
  augmentation SGD 4.57 ± 0.07 vs SAM 3.98 ± 0.05; with cutout SGD 3.86 ± 0.14 vs SAM
  3.61 ± 0.06. This suite trains a smaller WRN for far fewer epochs without augmentation, so its
  errors are higher; what carries over is the direction and rough size of SAM's gain.
* ``when`` — the map of *when* flat minima help (issue #23): MNIST-5k (the cheapest task with a
  clear effect) at symmetric label noise × epoch budget, each cell a task
  (``mnist-5k-noisy<NN>[-x<F>]``, ``-noisy0`` the clean control with the same recipe) tuned on
  its own, plus one class-dependent noise cell (``mnist-5k-asym40``) as a check. The report draws
  it as heat maps (noise × budget). Sized for about 50 minutes of two CPU cores (a SAM run is
  34 s at 1×, a baseline run 16 s): noise {0, 40, 80} % × budget {0.5, 1, 2}×, plus 4× at 40 %
  and 20 % / 60 % at 1× (13 of the issue's 20 cells + the asymmetric one); one tuning seed and a
  three-point rho grid (0.05, 0.2, 0.5; extended at an edge); Momentum-SAM at 40 % noise, 0.5×
  and 1× only; 3 evaluation seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from flatmin.bench.methods import Hyper

__all__ = ["SUITES", "Suite", "get_suite", "map_cell", "suite_names", "unknown_suite_message"]


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
        tune: choose the hyper-parameters on validation data.
        task_budgets: per-task exceptions to ``budget``.
        tune_seeds: seeds of the validation-grid runs (never evaluation seeds).
        task_seeds: per-task numbers of evaluation seeds (exceptions to ``seeds``).
        grids: validation-grid values replacing the methods' own, by trajectory method and
            hyper-parameter (extended at an edge like the methods' grids).
        hypers: fixed hyper-parameters by task and method (without ``tune``).
        hyper_source: where ``hypers`` come from.
        extra_methods: methods run on some tasks only, by task.
        variants: the methods reported as cheap SAM variants.
        ablation_task: the task of the budget ablation (``None``: none).
        analysis_task: the task of the flatness study (``None``: none).
        jobs: default number of parallel worker processes.
        device: default ``--device`` (``"auto"``: an accelerator when present).
        precision: default ``--precision``.
    """

    name: str
    description: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: int
    budget: str
    tune: bool
    task_budgets: Mapping[str, str] = field(default_factory=dict)
    tune_seeds: tuple[int, ...] = (100, 101)
    task_seeds: Mapping[str, int] = field(default_factory=dict)
    grids: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)
    hypers: Mapping[str, Mapping[str, Hyper]] = field(default_factory=dict)
    hyper_source: str | None = None
    extra_methods: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    variants: tuple[str, ...] = ()
    ablation_task: str | None = None
    analysis_task: str | None = None
    jobs: int = 2
    device: str = "cpu"
    precision: str = "fp32"


# The quick suite's hyper-parameters: the validation choices of the committed full run
# (docs/results/report.md, "Chosen hyper-parameters"), copied here by hand.
QUICK_SOURCE = "validation choices of the committed full run (docs/results/report.md)"
QUICK_HYPERS: Mapping[str, Mapping[str, Hyper]] = {
    "digits-noisy40": {
        "swa": Hyper(start=0.5),
        "sam": Hyper(rho=0.5),
        "wasam": Hyper(rho=0.5, start=0.5),
    },
    "rotten-tomatoes": {
        "swa": Hyper(start=0.5),
        "sam": Hyper(rho=0.5),
        "wasam": Hyper(rho=0.5, start=0.5),
    },
    # Nested CV: each outer fold of MUTAG chose on its own inner validation split (issue #22).
    **{
        f"mutag@fold{fold}": {
            "swa": Hyper(start=swa),
            "sam": Hyper(rho=sam),
            "wasam": Hyper(rho=wasam_rho, start=wasam_start),
        }
        for fold, (swa, sam, wasam_rho, wasam_start) in enumerate([
            (0.9, 0.02, 0.02, 0.5),
            (0.5, 0.2, 0.1, 0.5),
            (0.75, 0.0032, 0.0032, 0.5),
            (0.75, 0.2, 0.05, 0.75),
            (0.75, 0.1, 0.1, 0.5),
            (0.75, 0.05, 0.05, 0.75),
            (0.5, 0.2, 0.2, 0.5),
            (0.75, 0.05, 0.05, 0.75),
            (0.75, 0.05, 0.05, 0.75),
            (0.75, 0.0032, 0.0032, 0.5),
        ])
    },
}

# The cheap SAM variants, measured on two label-noise tasks (cost vs the share of SAM's gain).
_VARIANTS = ("samk", "samk5", "looksam", "esam", "msam")

# The gpu suite's hyper-parameters (no tuning on the GPU budget).
GPU_SOURCE = (
    "rho 0.05: Foret et al. 2021 (arXiv:2010.01412), Table 7, WRN on Fashion-MNIST; "
    "start 0.75: as the quick suite"
)
GPU_HYPERS: Mapping[str, Mapping[str, Hyper]] = {
    "fashion-mnist-full": {
        "swa": Hyper(start=0.75),
        "sam": Hyper(rho=0.05),
        "wasam": Hyper(rho=0.05, start=0.75),
    },
}

# The `when` map (issue #23): noise % x budget factor cells of MNIST-5k, see the module docstring.
WHEN_BASE = "mnist-5k"
WHEN_CELLS = (
    *((noise, factor) for noise in (0, 40, 80) for factor in (0.5, 1.0, 2.0)),
    (40, 4.0), (20, 1.0), (60, 1.0),
)  # fmt: skip


def map_cell(base: str, noise: int, factor: float, kind: str = "noisy") -> str:
    """The task name of one map cell: ``mnist-5k-noisy40-x2`` (1×: no ``-x`` suffix)."""
    name = f"{base}-{kind}{noise}"
    return name if factor == 1 else f"{name}-x{factor:g}"


_WHEN_TASKS = (*(map_cell(WHEN_BASE, n, f) for n, f in WHEN_CELLS),
               map_cell(WHEN_BASE, 40, 1.0, "asym"))  # fmt: skip

#: The built-in suites by name (``quick``, ``full``, ``gpu``, ``when``).
SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "quick",
            "3 domains (vision with 40 % label noise), baseline/SWA/SAM/WASAM, 3 seeds, "
            "hyper-parameters from the full run",
            tasks=("digits-noisy40", "rotten-tomatoes", "mutag"),
            methods=("baseline", "swa", "sam", "wasam"),
            seeds=3,
            budget="full",
            tune=False,
            hypers=QUICK_HYPERS,
            hyper_source=QUICK_SOURCE,
        ),
        Suite(
            "full",
            "3 domains, label noise, 5 methods + ASAM + 5 cheap variants, 5 seeds, all tuned",
            tasks=(
                "digits-noisy40",
                "mnist-5k-noisy40",
                "fashion-mnist-noisy40",
                "fashion-mnist",
                "fashion-mnist-aug",
                "rotten-tomatoes",
                "rotten-tomatoes-noisy20",
                "20newsgroups",
                "mutag",
            ),
            methods=("baseline", "swa", "swa-lr", "sam", "wasam"),
            seeds=5,
            budget="full",
            tune=True,
            # Fashion-noisy40's gain (+3.1) had a CI across zero over 5 seeds (one outlier
            # baseline seed): 10 seeds for the power to tell (issue #23).
            task_seeds={"fashion-mnist-noisy40": 10},
            extra_methods={
                "digits-noisy40": ("asam", *_VARIANTS),
                "mnist-5k-noisy40": ("asam", *_VARIANTS),
            },
            variants=_VARIANTS,
            ablation_task="digits-noisy40",
            analysis_task="digits-noisy40",
        ),
        Suite(
            "gpu",
            "Fashion-MNIST 55k with a WRN-16-4 on one GPU (bf16), baseline/SWA/SAM/WASAM, "
            "3 seeds, about 15 min",
            tasks=("fashion-mnist-full",),
            methods=("baseline", "swa", "sam", "wasam"),
            seeds=3,
            budget="full",
            tune=False,
            hypers=GPU_HYPERS,
            hyper_source=GPU_SOURCE,
            jobs=2,
            device="auto",
            precision="bf16",
        ),
        Suite(
            "when",
            "when flat minima help: MNIST-5k at label noise x epoch budget (+ asymmetric noise), "
            "baseline/SWA/SAM/WASAM (+ MSAM), tuned per cell, 3 seeds",
            tasks=_WHEN_TASKS,
            methods=("baseline", "swa", "sam", "wasam"),
            seeds=3,
            budget="full",
            tune=True,
            tune_seeds=(100,),
            grids={"sam": {"rho": (0.05, 0.2, 0.5)}, "msam": {"rho": (0.3, 1.0, 3.0)}},
            extra_methods={
                map_cell(WHEN_BASE, 40, 0.5): ("msam",),
                map_cell(WHEN_BASE, 40, 1.0): ("msam",),
            },
        ),
    )
}


def suite_names() -> list[str]:
    """Names of the suites."""
    return list(SUITES)


def unknown_suite_message(name: str) -> str:
    """``Unknown suite: 'x' (known: quick, full, gpu)``."""
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
