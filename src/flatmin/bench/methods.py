"""Benchmark methods as recipes: a registry of frozen :class:`Method` records.

A method is either a **trajectory** (an optimizer that trains: baseline, SAM, ASAM, the SAM
variants, SWA with its own learning rate) or a **view** of another method's trajectory: SWA in the
sense of Kaddour et al. (Alg. 1) is the average of the *baseline's* iterates under the task's own
schedule, and WASAM (Alg. 2) the average of *SAM's* iterates, so neither trains anything of its
own — a baseline or SAM run keeps one running average per start of :data:`START_GRID` and reports
them all (``record["averages"]``). A variant is another record, never an ``if`` on a name.

==========  ====================================================  ==================================
name        what                                                  chosen on validation
==========  ====================================================  ==================================
baseline    the task's optimizer (SGD with momentum or AdamW)     —
swa         average of the baseline's iterates (Kaddour Alg. 1)   ``start``
swa-lr      SWA with a constant LR from the start (Izmailov Alg.1) ``start``, ``swa_lr``
sam         SAM around the task's optimizer (Foret et al. 2021)   ``rho``
asam        adaptive SAM (Kwon et al. 2021)                       ``rho``
wasam       average of SAM's iterates (Kaddour Alg. 2)            ``rho`` × ``start`` jointly
samk        SAM on every 2nd step, base steps in between          (``rho`` from sam)
samk5       SAM on every 5th step                                 (``rho`` from sam)
looksam     LookSAM, k = 5 (Liu et al. 2022)                      ``alpha`` (``rho`` from sam)
esam        ESAM, β = 0.6, γ = 0.5 (Du et al. 2022)                (``rho`` from sam)
msam        Momentum-SAM, one pass per step (Becker et al. 2024)  ``rho`` (its own scale)
gsam        GSAM, α = 0.1 (Zhuang et al. 2022)                     (``rho`` from sam)
wsam        WSAM, γ = 0.9, decoupled (Yue et al. 2023)             (``rho`` from sam)
fsam        FriendlySAM, σ = 1, λ = 0.9 (Li et al. 2024)           (``rho`` from sam)
gcsam       GCSAM, gradient centralization (Hassan et al. 2025)   (``rho`` from sam)
sam2        2 ascent steps of ρ/2 (optax ``sync_period`` = 3)      (``rho`` from sam)
==========  ====================================================  ==================================

Grids (:class:`Grid`) marked ``extend`` grow by one geometric step beyond an end whenever the
chosen value sits on that end, at most :data:`MAX_EXTENSIONS` times (see :mod:`flatmin.bench.plan`).

References:
    Kaddour et al., "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv:2202.00661.
    Izmailov et al., arXiv:1803.05407 (SWA). Foret et al., arXiv:2010.01412 (SAM).
    Kwon et al., arXiv:2102.11600 (ASAM). Liu et al., arXiv:2203.02714 (LookSAM).
    Du et al., arXiv:2110.03141 (ESAM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatmin.optim.esam import ESAM
from flatmin.optim.friendly_sam import FriendlySAM
from flatmin.optim.gcsam import GCSAM
from flatmin.optim.gsam import GSAM
from flatmin.optim.looksam import LookSAM, SAMEveryK
from flatmin.optim.momentum_sam import MomentumSAM
from flatmin.optim.multistep import MultiStepSAM
from flatmin.optim.sam import SAM
from flatmin.optim.wsam import WSAM

__all__ = [
    "ASAM_RHO_GRID",
    "MAX_EXTENSIONS",
    "METHODS",
    "RHO_GRID",
    "START_GRID",
    "BuildContext",
    "Grid",
    "Hyper",
    "Method",
    "get_method",
    "method_names",
    "register_method",
    "start_epoch",
    "unknown_method_message",
]

RHO_GRID = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ASAM_RHO_GRID = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0)
START_GRID = (0.5, 0.75, 0.9)
SWA_LR_GRID = (0.1, 0.3)
SWA_LR_START_GRID = (0.5, 0.75)
ALPHA_GRID = (0.1, 0.3, 0.7)
MSAM_RHO_GRID = (0.1, 0.3, 1.0, 3.0)
MAX_EXTENSIONS = 2


@dataclass(frozen=True)
class Hyper:
    """The method hyper-parameters of one run (``None`` where the method has none).

    Attributes:
        rho: SAM neighbourhood radius.
        start: fraction of the epoch budget after which averaging starts (one snapshot at the end
            of each later epoch; see :func:`start_epoch`).
        swa_lr: ``swa-lr``: the constant learning rate from the start, as a multiple of the task's
            peak learning rate.
        alpha: LookSAM's gradient-mixing weight.
    """

    rho: float | None = None
    start: float | None = None
    swa_lr: float | None = None
    alpha: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The set hyper-parameters only."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def without(self, *names: str) -> Hyper:
        """A copy with ``names`` unset."""
        return replace(self, **{n: None for n in names})


HYPER_NAMES = tuple(f.name for f in fields(Hyper))


@dataclass(frozen=True)
class Grid:
    """The validation grid of one hyper-parameter.

    Attributes:
        values: increasing candidate values.
        extend: when the chosen value is the first or last one, extend the grid by one step beyond
            it (geometric: the ratio of the two values at that end), at most
            :data:`MAX_EXTENSIONS` times per end.
    """

    values: tuple[float, ...]
    extend: bool = False

    def __post_init__(self) -> None:
        if not self.values or list(self.values) != sorted(set(self.values)):
            raise ValueError(f"Invalid grid: {self.values} (expected increasing distinct values)")
        if self.extend and (len(self.values) < 2 or self.values[0] <= 0):
            raise ValueError(f"Invalid extendable grid: {self.values} (need >= 2 positive values)")

    def step_beyond(self, values: tuple[float, ...], end: str) -> float:
        """The value one geometric step beyond ``end`` (``"low"`` or ``"high"``) of ``values``."""
        if end == "high":
            return _round(values[-1] * values[-1] / values[-2])
        return _round(values[0] * values[0] / values[1])


def _round(x: float) -> float:
    # Grid values end up in config hashes and file names: keep them short and exact.
    return float(f"{x:.6g}")


# The methods of the budget ablation (the baseline / SWA / SAM / WASAM).
ABLATION_METHODS = ("baseline", "swa", "sam", "wasam")


def start_epoch(start: float, epochs: int) -> int:
    """First epoch (1-based) whose end-of-epoch weights enter the SWA average.

    ``floor(start · epochs) + 1`` clipped to ``[1, epochs]``: with 8 epochs and ``start = 0.75``
    the weights after epochs 7 and 8 are averaged (the last quarter of the budget).

    Raises:
        ValueError: ``start`` outside ``[0, 1)`` or ``epochs < 1``.
    """
    if not 0.0 <= start < 1.0:
        raise ValueError(f"Invalid start: {start} (expected 0 <= start < 1)")
    if epochs < 1:
        raise ValueError(f"Invalid epochs: {epochs} (expected >= 1)")
    return min(epochs, math.floor(start * epochs) + 1)


@dataclass(frozen=True)
class BuildContext:
    """What a method's builder gets for one run.

    Attributes:
        model: the freshly initialised model.
        base: the task's optimizer class (SGD or AdamW), SAM's base optimizer.
        base_kwargs: its keyword arguments (lr, momentum, weight decay, ...).
        hyper: the run's method hyper-parameters.
        epochs: the epoch budget.
        seed: the run's seed (for methods that draw random numbers, e.g. ESAM).
    """

    model: nn.Module
    base: type[Optimizer]
    base_kwargs: Mapping[str, Any]
    hyper: Hyper
    epochs: int
    seed: int


Builder = Callable[[BuildContext], Optimizer]


def _required(value: float | None, name: str, method: str) -> float:
    """A hyper-parameter the builder needs (``Method.resolve`` fills in the defaults)."""
    if value is None:
        raise ValueError(f"Invalid {name}: None (method {method!r} needs it; use Method.resolve)")
    return value


def _build_base(ctx: BuildContext) -> Optimizer:
    return ctx.base(ctx.model.parameters(), **ctx.base_kwargs)


def _sam_builder(cls: type[SAM] = SAM, **options: Any) -> Builder:
    """A builder of ``cls(params, base, rho=hyper.rho, **options, **base_kwargs)``."""

    def build(ctx: BuildContext) -> Optimizer:
        rho = _required(ctx.hyper.rho, "rho", cls.__name__)
        return cls(ctx.model.parameters(), ctx.base, rho=rho, **options, **ctx.base_kwargs)

    return build


def _build_looksam(ctx: BuildContext) -> Optimizer:
    rho = _required(ctx.hyper.rho, "rho", "looksam")
    alpha = _required(ctx.hyper.alpha, "alpha", "looksam")
    return LookSAM(ctx.model.parameters(), ctx.base, rho=rho, k=5, alpha=alpha, **ctx.base_kwargs)


def _build_sam2(ctx: BuildContext) -> Optimizer:
    rho = _required(ctx.hyper.rho, "rho", "sam2")
    # Two ascent steps of ρ/2: the point reached stays in SAM's ρ-ball.
    return MultiStepSAM(ctx.model.parameters(), ctx.base, rho=rho / 2, steps=2, **ctx.base_kwargs)


def _build_esam(ctx: BuildContext) -> Optimizer:
    rho = _required(ctx.hyper.rho, "rho", "esam")
    gen = torch.Generator().manual_seed(ctx.seed)  # the SWP draws follow the run seed
    return ESAM(
        ctx.model.parameters(), ctx.base, rho=rho, beta=0.6, gamma=0.5, generator=gen,
        **ctx.base_kwargs,
    )  # fmt: skip


@dataclass(frozen=True)
class Method:
    """A benchmark method: how to build its optimizer, what it reports and what it tunes.

    Attributes:
        name: registry name (``flatmin bench --methods NAME``).
        description: one line for the report.
        build: ``build(BuildContext) -> optimizer`` (``None`` for a view of another trajectory).
        trajectory: the method whose training run this one reads (itself for a trajectory).
        averaged: the reported weights are the SWA average from ``start`` (else the final
            weights).
        keeps_averages: a run of this trajectory keeps one average per start of
            :data:`START_GRID` (for its averaged views, e.g. baseline → swa, sam → wasam).
        constant_lr_from_start: from the start epoch on the learning rate is the constant
            ``swa_lr`` × the task's peak learning rate (Izmailov et al. Alg. 1).
        grads_per_step: gradient evaluations per optimizer step (nominal cost: 2 for SAM).
        defaults: default hyper-parameters (used when nothing is tuned).
        grids: the validation grids this method chooses from (``start`` for an averaged view
            costs no run: the trajectory keeps every start).
        tuned_by: hyper-parameters taken from another method's choice (``{"rho": "sam"}``).
        references: arXiv ids.
    """

    name: str
    description: str
    build: Builder | None
    trajectory: str = ""
    averaged: bool = False
    keeps_averages: bool = False
    constant_lr_from_start: bool = False
    grads_per_step: float = 1.0
    defaults: Hyper = field(default_factory=Hyper)
    grids: Mapping[str, Grid] = field(default_factory=dict)
    tuned_by: Mapping[str, str] = field(default_factory=dict)
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.trajectory:
            object.__setattr__(self, "trajectory", self.name)
        if (self.build is None) == self.is_trajectory:
            raise ValueError(
                f"Invalid method {self.name!r}: a trajectory has a builder, a view has none"
            )
        for param in (*self.grids, *self.tuned_by):
            if param not in HYPER_NAMES:
                raise ValueError(f"Invalid hyper-parameter {param!r} of method {self.name!r}")

    @property
    def is_trajectory(self) -> bool:
        """Whether this method trains (its own run) rather than reads another's."""
        return self.trajectory == self.name

    def resolve(self, hyper: Hyper | None = None, **values: float | None) -> Hyper:
        """Hyper-parameters of a run: the given values, else this method's defaults.

        Values for hyper-parameters the method does not have are ignored.
        """
        given = {**(hyper.as_dict() if hyper is not None else {}), **values}
        out = {}
        for name in HYPER_NAMES:
            default = getattr(self.defaults, name)
            if default is None:
                continue
            value = given.get(name)
            out[name] = float(default if value is None else value)
        return Hyper(**out)


#: The registered methods by name (:func:`register_method` adds one).
METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (``ValueError`` on a duplicate name); returns it."""
    if method.name in METHODS:
        raise ValueError(f"Invalid method name: {method.name!r} (already registered)")
    if not method.is_trajectory and method.trajectory not in METHODS:
        raise ValueError(
            f"Invalid trajectory {method.trajectory!r} of method {method.name!r} (not registered)"
        )
    METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    """Names of the registered methods."""
    return list(METHODS)


def unknown_method_message(name: str) -> str:
    """``Unknown method: 'x' (known: ...)``."""
    return f"Unknown method: {name!r} (known: {', '.join(METHODS)})"


def get_method(name: str) -> Method:
    """The method ``name``.

    Raises:
        ValueError: unknown name (the message lists the known methods).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(unknown_method_message(name)) from None


_RHO = Grid(RHO_GRID, extend=True)
_START = Grid(START_GRID)

for _m in (
    Method(
        "baseline", "the task's optimizer and LR schedule (non-flat baseline)", _build_base,
        keeps_averages=True,
    ),
    Method(
        "swa", "average of the baseline's iterates under the task's schedule (Kaddour Alg. 1)",
        None, trajectory="baseline", averaged=True, defaults=Hyper(start=0.75),
        grids={"start": _START}, references=("2202.00661", "1803.05407"),
    ),
    Method(
        "swa-lr", "SWA with a constant SWA learning rate from the start (Izmailov Alg. 1)",
        _build_base, averaged=True, constant_lr_from_start=True,
        defaults=Hyper(start=0.75, swa_lr=0.1),
        grids={"start": Grid(SWA_LR_START_GRID), "swa_lr": Grid(SWA_LR_GRID)},
        references=("1803.05407",),
    ),
    Method(
        "sam", "SAM around the task's optimizer", _sam_builder(), keeps_averages=True,
        grads_per_step=2.0, defaults=Hyper(rho=0.05), grids={"rho": _RHO},
        references=("2010.01412",),
    ),
    Method(
        "asam", "adaptive SAM (ASAM, T = |w| + 0.01)", _sam_builder(adaptive=True),
        grads_per_step=2.0, defaults=Hyper(rho=0.5),
        grids={"rho": Grid(ASAM_RHO_GRID, extend=True)}, references=("2102.11600",),
    ),
    Method(
        "wasam", "average of SAM's iterates (Kaddour Alg. 2); rho and start chosen jointly",
        None, trajectory="sam", averaged=True, grads_per_step=2.0,
        defaults=Hyper(rho=0.05, start=0.75), grids={"rho": _RHO, "start": _START},
        references=("2202.00661",),
    ),
    Method(
        "samk", "SAM every 2nd step, base steps in between (rho from sam)",
        _sam_builder(SAMEveryK, k=2), grads_per_step=1.5, defaults=Hyper(rho=0.05),
        tuned_by={"rho": "sam"}, references=("2203.02714",),
    ),
    Method(
        "samk5", "SAM every 5th step, base steps in between (rho from sam)",
        _sam_builder(SAMEveryK, k=5), grads_per_step=1.2, defaults=Hyper(rho=0.05),
        tuned_by={"rho": "sam"}, references=("2203.02714",),
    ),
    Method(
        "esam", "ESAM, beta = 0.6 of the tensors, gamma = 0.5 of the batch (rho from sam)",
        _build_esam, grads_per_step=1.5, defaults=Hyper(rho=0.05),
        tuned_by={"rho": "sam"}, references=("2110.03141",),
    ),
    Method(
        "looksam", "LookSAM, k = 5 (rho from sam, alpha tuned)", _build_looksam,
        grads_per_step=1.2, defaults=Hyper(rho=0.05, alpha=0.7),
        grids={"alpha": Grid(ALPHA_GRID)}, tuned_by={"rho": "sam"},
        references=("2203.02714",),
    ),
    Method(
        # One pass: the perturbation follows the momentum, whose norm is not the gradient's, so
        # rho lives on another scale (the paper's defaults are larger than SAM's) and has its own
        # extendable grid.
        "msam", "Momentum-SAM, one pass per step (own rho grid)", _sam_builder(MomentumSAM),
        grads_per_step=1.0, defaults=Hyper(rho=0.3),
        grids={"rho": Grid(MSAM_RHO_GRID, extend=True)}, references=("2401.12033",),
    ),
    Method(
        "gsam", "GSAM, alpha = 0.1 (rho from sam)", _sam_builder(GSAM, alpha=0.1),
        grads_per_step=2.0, defaults=Hyper(rho=0.05), tuned_by={"rho": "sam"},
        references=("2203.08065",),
    ),
    Method(
        "wsam", "WSAM, gamma = 0.9, decoupled (rho from sam)", _sam_builder(WSAM, gamma=0.9),
        grads_per_step=2.0, defaults=Hyper(rho=0.05), tuned_by={"rho": "sam"},
        references=("2305.15817",),
    ),
    Method(
        "fsam", "FriendlySAM, sigma = 1, lambda = 0.9 (rho from sam)",
        _sam_builder(FriendlySAM, sigma=1.0, lmbda=0.9), grads_per_step=2.0,
        defaults=Hyper(rho=0.05), tuned_by={"rho": "sam"}, references=("2403.12350",),
    ),
    Method(
        "gcsam", "GCSAM, gradient centralization of both gradients (rho from sam)",
        _sam_builder(GCSAM), grads_per_step=2.0, defaults=Hyper(rho=0.05),
        tuned_by={"rho": "sam"}, references=("2501.11584",),
    ),
    Method(
        "sam2", "SAM with 2 ascent steps of rho/2 (rho from sam)", _build_sam2,
        grads_per_step=3.0, defaults=Hyper(rho=0.05), tuned_by={"rho": "sam"},
        references=("2010.01412", "2206.06232"),
    ),
):  # fmt: skip
    register_method(_m)
