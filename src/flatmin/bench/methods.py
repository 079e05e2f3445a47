"""Benchmark methods as recipes: a registry of frozen :class:`Method` records.

A method says how to build the optimizer (and, for the averaging methods, the averager) from the
task's own base optimizer, learning rate and schedule. Every method trains for the task's epoch
budget under the task's LR schedule; averaging never replaces that schedule (Kaddour et al. 2022,
Sec. 4). A variant is another record (different builder or defaults), never an ``if`` on a name.

=========  ==========================================================  ====================
name       optimizer                                                   tuned on validation
=========  ==========================================================  ====================
baseline   the task's optimizer (SGD with momentum or AdamW)           —
swa        baseline + SWA of one snapshot per epoch from ``start``     ``start``
sam        SAM around the task's optimizer (Foret et al. 2021)         ``rho``
asam       adaptive SAM (Kwon et al. 2021)                             ``rho`` (own grid)
wasam      SAM + the same per-epoch SWA (Kaddour et al. 2022)          rho (sam), start (swa)
samk       SAM on every 2nd step, base steps in between                rho (sam)
samk5      SAM on every 5th step, base steps in between                rho (sam)
esam       ESAM, β = 0.6, γ = 0.5 (Du et al. 2022)                     rho (sam)
looksam    LookSAM, k = 5, α = 0.7 (Liu et al. 2022)                   rho (sam)
gsam       GSAM, α = 0.1 (Zhuang et al. 2022)                          rho (sam)
wsam       WSAM, γ = 0.9, decoupled (Yue et al. 2023)                  rho (sam)
fsam       FriendlySAM, σ = 1, λ = 0.9 (Li et al. 2024)                rho (sam)
gcsam      GCSAM, gradient centralization (Hassan et al. 2025)         rho (sam)
msam       Momentum-SAM, one pass per step (Becker et al. 2024)        rho (sam)
sam2       2 ascent steps of ρ/2 each (optax sync_period = 3)          rho (sam)
=========  ==========================================================  ====================

References:
    Kaddour et al., "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv:2202.00661.
    Izmailov et al., arXiv:1803.05407 (SWA). Foret et al., arXiv:2010.01412 (SAM).
    Kwon et al., arXiv:2102.11600 (ASAM). Liu et al., arXiv:2203.02714 (LookSAM).
    Du et al., arXiv:2110.03141 (ESAM). Zhuang et al., arXiv:2203.08065 (GSAM). Yue et al.,
    arXiv:2305.15817 (WSAM). Li et al., arXiv:2403.12350 (FriendlySAM). Hassan et al.,
    arXiv:2501.11584 (GCSAM). Becker et al., arXiv:2401.12033 (Momentum-SAM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatmin.optim.averaging import WeightAveraging
from flatmin.optim.esam import ESAM
from flatmin.optim.friendly_sam import FriendlySAM
from flatmin.optim.gcsam import GCSAM
from flatmin.optim.gsam import GSAM
from flatmin.optim.looksam import LookSAM, SAMEveryK
from flatmin.optim.momentum_sam import MomentumSAM
from flatmin.optim.multistep import MultiStepSAM
from flatmin.optim.sam import SAM
from flatmin.optim.wasam import WASAM
from flatmin.optim.wsam import WSAM

__all__ = [
    "METHODS",
    "BuildContext",
    "Hyper",
    "Method",
    "get_method",
    "method_names",
    "register_method",
    "start_epoch",
    "unknown_method_message",
]

RHO_GRID = (0.01, 0.02, 0.05, 0.1, 0.2)
ASAM_RHO_GRID = (0.1, 0.2, 0.5, 1.0, 2.0)
START_GRID = (0.5, 0.75)


@dataclass(frozen=True)
class Hyper:
    """The method hyper-parameters of one run (``None`` where the method has none).

    Attributes:
        rho: SAM neighbourhood radius.
        start: fraction of the epoch budget after which SWA starts averaging (one snapshot at the
            end of each later epoch).
    """

    rho: float | None = None
    start: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The set hyper-parameters only."""
        return {k: v for k, v in (("rho", self.rho), ("start", self.start)) if v is not None}


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


Built = tuple[Optimizer, WeightAveraging | None]


@dataclass(frozen=True)
class BuildContext:
    """What a method's builder gets for one run.

    Attributes:
        model: the freshly initialised model.
        base: the task's optimizer class (SGD or AdamW), SAM's base optimizer.
        base_kwargs: its keyword arguments (lr, momentum, weight decay, ...).
        hyper: the run's method hyper-parameters.
        epochs: the epoch budget (SWA's start is a fraction of it).
        seed: the run's seed (for methods that draw random numbers, e.g. ESAM).
    """

    model: nn.Module
    base: type[Optimizer]
    base_kwargs: Mapping[str, Any]
    hyper: Hyper
    epochs: int
    seed: int


Builder = Callable[[BuildContext], Built]


def _required(value: float | None, name: str, method: str) -> float:
    """A hyper-parameter the builder needs (``Method.resolve`` fills in the defaults)."""
    if value is None:
        raise ValueError(f"Invalid {name}: None (method {method!r} needs it; use Method.resolve)")
    return value


def _build_base(ctx: BuildContext) -> Built:
    return ctx.base(ctx.model.parameters(), **ctx.base_kwargs), None


def _build_swa(ctx: BuildContext) -> Built:
    opt = ctx.base(ctx.model.parameters(), **ctx.base_kwargs)
    start = _required(ctx.hyper.start, "start", "swa")
    return opt, WeightAveraging(ctx.model, mode="swa", start=start_epoch(start, ctx.epochs))


def _sam_builder(cls: type[SAM] = SAM, **options: Any) -> Builder:
    """A builder of ``cls(params, base, rho=hyper.rho, **options, **base_kwargs)``."""

    def build(ctx: BuildContext) -> Built:
        rho = _required(ctx.hyper.rho, "rho", cls.__name__)
        return cls(ctx.model.parameters(), ctx.base, rho=rho, **options, **ctx.base_kwargs), None

    return build


def _build_sam2(ctx: BuildContext) -> Built:
    rho = _required(ctx.hyper.rho, "rho", "sam2")
    # Two ascent steps of ρ/2: the point reached stays in SAM's ρ-ball.
    opt = MultiStepSAM(ctx.model.parameters(), ctx.base, rho=rho / 2, steps=2, **ctx.base_kwargs)
    return opt, None


def _build_esam(ctx: BuildContext) -> Built:
    rho = _required(ctx.hyper.rho, "rho", "esam")
    gen = torch.Generator().manual_seed(ctx.seed)  # the SWP draws follow the run seed
    opt = ESAM(
        ctx.model.parameters(), ctx.base, rho=rho, beta=0.6, gamma=0.5, generator=gen,
        **ctx.base_kwargs,
    )  # fmt: skip
    return opt, None


def _build_wasam(ctx: BuildContext) -> Built:
    rho = _required(ctx.hyper.rho, "rho", "wasam")
    start = _required(ctx.hyper.start, "start", "wasam")
    # average_on_step=False: the runner counts epochs (one snapshot per epoch, as SWA does).
    opt = WASAM(
        ctx.model, ctx.base, rho=rho, start=start_epoch(start, ctx.epochs),
        average_on_step=False, **ctx.base_kwargs,
    )  # fmt: skip
    return opt, opt.averaging


@dataclass(frozen=True)
class Method:
    """A benchmark method: how to build its optimizer and averager, and what to tune.

    Attributes:
        name: registry name (``flatmin bench --methods NAME``).
        description: one line for the report.
        build: ``build(BuildContext) -> (optimizer, averager)``; the averager (or ``None``) is
            updated once per epoch by the training loop.
        per_sample: the optimizer's ``step`` takes per-sample losses ``loss_fn(index)`` instead
            of a closure (ESAM).
        grads_per_step: gradient evaluations per optimizer step (nominal cost: 2 for SAM).
        defaults: default hyper-parameters (``rho``, ``start``).
        grids: validation grid of each hyper-parameter this method tunes itself.
        tuned_by: for each hyper-parameter, the method whose validation grid selects it (e.g.
            WASAM takes ``rho`` from SAM's grid and ``start`` from SWA's).
        references: arXiv ids.
    """

    name: str
    description: str
    build: Builder
    per_sample: bool = False
    grads_per_step: float = 1.0
    defaults: Hyper = field(default_factory=Hyper)
    grids: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    tuned_by: Mapping[str, str] = field(default_factory=dict)
    references: tuple[str, ...] = ()

    @property
    def averages(self) -> bool:
        """Whether the method reports an average of its iterates (SWA-style)."""
        return self.defaults.start is not None

    def resolve(self, rho: float | None = None, start: float | None = None) -> Hyper:
        """Hyper-parameters of a run: the given values, else this method's defaults.

        Values for hyper-parameters the method does not have are ignored.
        """
        d = self.defaults
        return Hyper(
            rho=None if d.rho is None else float(d.rho if rho is None else rho),
            start=None if d.start is None else float(d.start if start is None else start),
        )


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (``ValueError`` on a duplicate name); returns it."""
    if method.name in METHODS:
        raise ValueError(f"Invalid method name: {method.name!r} (already registered)")
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


for _m in (
    Method(
        "baseline", "the task's optimizer and LR schedule (non-flat baseline)", _build_base
    ),
    Method(
        "swa", "baseline + SWA: one snapshot per epoch from `start`, BN recomputed", _build_swa,
        defaults=Hyper(start=0.75), grids={"start": START_GRID}, tuned_by={"start": "swa"},
        references=("1803.05407",),
    ),
    Method(
        "sam", "SAM around the task's optimizer", _sam_builder(),
        grads_per_step=2.0, defaults=Hyper(rho=0.05), grids={"rho": RHO_GRID},
        tuned_by={"rho": "sam"}, references=("2010.01412",),
    ),
    Method(
        "asam", "adaptive SAM (ASAM, T = |w| + 0.01)", _sam_builder(adaptive=True),
        grads_per_step=2.0, defaults=Hyper(rho=0.5), grids={"rho": ASAM_RHO_GRID},
        tuned_by={"rho": "asam"}, references=("2102.11600",),
    ),
    Method(
        "wasam", "SAM + SWA of its unperturbed iterates (rho from sam, start from swa)",
        _build_wasam, grads_per_step=2.0, defaults=Hyper(rho=0.05, start=0.75),
        tuned_by={"rho": "sam", "start": "swa"}, references=("2202.00661",),
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
        _build_esam, per_sample=True, grads_per_step=1.5, defaults=Hyper(rho=0.05),
        tuned_by={"rho": "sam"}, references=("2110.03141",),
    ),
    Method(
        "looksam", "LookSAM, k = 5, alpha = 0.7 (rho from sam)",
        _sam_builder(LookSAM, k=5, alpha=0.7), grads_per_step=1.2, defaults=Hyper(rho=0.05),
        tuned_by={"rho": "sam"}, references=("2203.02714",),
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
        "msam", "Momentum-SAM, one pass per step (rho from sam)", _sam_builder(MomentumSAM),
        grads_per_step=1.0, defaults=Hyper(rho=0.05), tuned_by={"rho": "sam"},
        references=("2401.12033",),
    ),
    Method(
        "sam2", "SAM with 2 ascent steps of rho/2 (rho from sam)", _build_sam2,
        grads_per_step=3.0, defaults=Hyper(rho=0.05), tuned_by={"rho": "sam"},
        references=("2010.01412", "2206.06232"),
    ),
):  # fmt: skip
    register_method(_m)
