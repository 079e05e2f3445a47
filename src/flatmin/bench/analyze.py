"""Landscape and sharpness analyses of benchmark checkpoints, built on :mod:`flatmin.analysis`.

These back ``flatmin landscape`` and ``flatmin sharpness``; functions return results and the CLI
writes them.

Landscape (Kaddour et al. 2022, Sec. 3; Izmailov et al. 2018, Fig. 4): for each checkpoint the
loss and error along a filter-normalised random ray ``w + t·d`` (Li et al. 2018); the linear
interpolation ``θ(α) = (1 − α)θ_0 + αθ_k`` between the first checkpoint and each other one (and,
for an averaging run, between its final weights and its average); and the asymmetry
``L(θ(+a)) − L(θ(−a))`` at each end of every interpolation.

References:
    Kaddour et al., arXiv:2202.00661. Izmailov et al., arXiv:1803.05407. Li et al.,
    arXiv:1712.09913. Foret et al., arXiv:2010.01412. Kwon et al., arXiv:2102.11600.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from flatmin._io import finite_json
from flatmin.analysis import (
    AsymmetryResult,
    PathResult,
    asymmetry,
    evaluate_ray,
    hessian_eigenvalues,
    hessian_trace,
    interpolate,
    random_direction,
    sharpness,
)
from flatmin.bench.checkpoint import LoadedCheckpoint
from flatmin.bench.device import autocast, check_precision

__all__ = [
    "LandscapeConfig",
    "LandscapeResult",
    "SharpnessConfig",
    "landscape",
    "sharpness_summary",
]


@dataclass(frozen=True)
class LandscapeConfig:
    """Options of ``flatmin landscape``.

    Attributes:
        points: coordinates per path.
        distance: rays span ``t ∈ [−distance, distance]`` (filter-normalised units).
        alpha_min, alpha_max: interpolation range (beyond ``[0, 1]`` extrapolates).
        a: asymmetry step.
        max_batches: batches of each data set per evaluation (``None``: all).
        seed: seed of the random directions.
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"``: the model's forward passes under
            autocast (faster on an accelerator, losses to about 3 significant digits).
    """

    points: int = 21
    distance: float = 1.0
    alpha_min: float = -0.5
    alpha_max: float = 1.5
    a: float = 0.1
    max_batches: int | None = 4
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _check_int("points", self.points, 2)
        _check_number("distance", self.distance, low=0, strict=True)
        _check_number("alpha_min", self.alpha_min)
        _check_number("alpha_max", self.alpha_max)
        if not self.alpha_min < self.alpha_max:
            raise ValueError(
                f"Invalid alpha range: [{self.alpha_min}, {self.alpha_max}] (expected min < max)"
            )
        _check_number("a", self.a, low=0, strict=True)
        if self.max_batches is not None:
            _check_int("max_batches", self.max_batches, 1)
        _check_seed(self.seed)
        check_precision(self.precision)


SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (torch generators take 64-bit seeds)


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= {low})")


def _check_number(
    name: str, value: object, *, low: float | None = None, strict: bool = False
) -> None:
    """``value`` must be a finite real number, ``>= low`` (``> low`` if ``strict``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low  # type: ignore[operator]
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number{bound})")


def _check_seed(seed: object) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"Invalid seed: {seed!r} (expected an int, 0 <= seed < 2**63)")


@dataclass
class LandscapeResult:
    """Rays by checkpoint label, interpolations and asymmetries by ``"a→b"``."""

    rays: dict[str, PathResult] = field(default_factory=dict)
    interpolations: dict[str, PathResult] = field(default_factory=dict)
    asymmetries: dict[str, AsymmetryResult] = field(default_factory=dict)

    def nonfinite(self) -> list[str]:
        """Where a loss is NaN or infinite, e.g. ``"ray sam-s0: test loss at 3 of 21 points"``."""
        out = []
        for kind, results in (("ray", self.rays), ("interpolation", self.interpolations),
                              ("asymmetry", self.asymmetries)):  # fmt: skip
            for key, res in results.items():
                for name, loss in res.loss.items():
                    bad = int(np.sum(~np.isfinite(loss)))
                    if bad:
                        out.append(f"{kind} {key}: {name} loss at {bad} of {loss.size} points")
        return out


def _data(ckpt: LoadedCheckpoint) -> dict[str, Any]:
    return {"train": ckpt.data.train_eval, "test": ckpt.data.test}


def _device_of(ckpt: LoadedCheckpoint) -> torch.device:
    return next(ckpt.model.parameters()).device


def landscape(checkpoints: Sequence[LoadedCheckpoint], cfg: LandscapeConfig) -> LandscapeResult:
    """Rays, interpolations and asymmetries of ``checkpoints`` (see the module docstring).

    The checkpoints' models and data may be on any device (all on the same one); the forward
    passes run at ``cfg.precision``.
    """
    if not checkpoints:
        raise ValueError("Invalid checkpoints: none given (expected at least one)")
    if cfg.points < 2:
        raise ValueError(f"Invalid points: {cfg.points} (expected >= 2)")
    with autocast(_device_of(checkpoints[0]), cfg.precision):
        return _landscape(checkpoints, cfg)


def _landscape(checkpoints: Sequence[LoadedCheckpoint], cfg: LandscapeConfig) -> LandscapeResult:
    out = LandscapeResult()
    gen = torch.Generator().manual_seed(cfg.seed)
    ts = np.linspace(-cfg.distance, cfg.distance, cfg.points)
    alphas = np.linspace(cfg.alpha_min, cfg.alpha_max, cfg.points)
    labels = _unique([c.label for c in checkpoints])
    for label, ck in zip(labels, checkpoints, strict=True):
        d = random_direction(ck.model, norm="filter", generator=gen)
        out.rays[label] = evaluate_ray(
            ck.model, ck.data.loss_fn, _data(ck), d, ts, max_batches=cfg.max_batches
        )
    pairs: list[tuple[str, Any, str, Any, LoadedCheckpoint]] = []
    first = checkpoints[0]
    for label, ck in zip(labels[1:], checkpoints[1:], strict=True):
        pairs.append((labels[0], first.model, label, ck.model, first))
    for label, ck in zip(labels, checkpoints, strict=True):
        if ck.final_model is not None:  # an averaging run: its final weights vs its average
            pairs.append(
                (f"{label.removesuffix('-avg')}-final", ck.final_model, label, ck.model, ck)
            )
    for la, ma, lb, mb, ck in pairs:
        data = _data(ck)
        key = f"{la}→{lb}"
        out.interpolations[key] = interpolate(
            ma, mb, ck.data.loss_fn, data, alphas, max_batches=cfg.max_batches
        )
        out.asymmetries[key] = asymmetry(
            ma, mb, ck.data.loss_fn, data, a=cfg.a, max_batches=cfg.max_batches
        )
        out.asymmetries[f"{lb}→{la}"] = asymmetry(
            mb, ma, ck.data.loss_fn, data, a=cfg.a, max_batches=cfg.max_batches
        )
    return out


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


@dataclass(frozen=True)
class SharpnessConfig:
    """Options of ``flatmin sharpness``.

    Attributes:
        rho: radius of the worst-case (SAM) sharpness.
        adaptive_rho: radius of the adaptive (ASAM) sharpness.
        steps: ascent steps of the worst case.
        max_batches: training batches used (each gives one sharpness value).
        hessian_iters: Lanczos steps for the top eigenvalue.
        trace_samples: Hutchinson samples for the trace.
        seed: seed of the random vectors.
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"``: forward passes (and the Hessian's
            double backward) under autocast — fast, but the Hessian estimates lose precision.
    """

    rho: float = 0.05
    adaptive_rho: float = 0.5
    steps: int = 1
    max_batches: int | None = 4
    hessian_iters: int = 20
    trace_samples: int = 20
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _check_number("rho", self.rho, low=0)
        _check_number("adaptive_rho", self.adaptive_rho, low=0)
        _check_int("steps", self.steps, 1)
        if self.max_batches is not None:
            _check_int("max_batches", self.max_batches, 1)
        _check_int("hessian_iters", self.hessian_iters, 1)
        _check_int("trace_samples", self.trace_samples, 2)
        _check_seed(self.seed)
        check_precision(self.precision)


def sharpness_summary(ckpt: LoadedCheckpoint, cfg: SharpnessConfig) -> dict[str, Any]:
    """Worst-case and adaptive sharpness, top Hessian eigenvalue and trace (JSON-ready dict).

    All are measured on the first ``max_batches`` training batches (the labels trained on),
    BatchNorm in eval mode. The dict is strict JSON: a NaN or infinite value (the loss blew up
    at the perturbed weights, e.g. for a huge ``rho``) is ``None`` and its dotted path is listed
    under ``"nonfinite"`` (empty when every value is finite).
    """
    model, loss_fn, batches = ckpt.model, ckpt.data.loss_fn, ckpt.data.train_eval
    gen = torch.Generator().manual_seed(cfg.seed)
    device = _device_of(ckpt)
    with autocast(device, cfg.precision):
        worst = sharpness(
            model, loss_fn, batches, rho=cfg.rho, steps=cfg.steps, max_batches=cfg.max_batches
        )
        adaptive = sharpness(
            model, loss_fn, batches, rho=cfg.adaptive_rho, steps=cfg.steps, adaptive=True,
            max_batches=cfg.max_batches,
        )  # fmt: skip
        eig = hessian_eigenvalues(
            model, loss_fn, batches, k=1, max_iter=cfg.hessian_iters, generator=gen,
            max_batches=cfg.max_batches,
        )  # fmt: skip
        trace = hessian_trace(
            model, loss_fn, batches, n_samples=cfg.trace_samples, generator=gen,
            max_batches=cfg.max_batches,
        )  # fmt: skip
    summary = {
        "checkpoint": ckpt.path,
        "task": ckpt.data.task.name,
        "method": ckpt.meta["method"],
        "seed": ckpt.meta["seed"],
        "weights": ckpt.weights,
        "worst_case_sharpness": {
            "rho": cfg.rho, "steps": cfg.steps, "mean": worst.mean, "std": worst.std,
            "base_loss": float(np.mean(worst.base_loss)),
        },
        "adaptive_sharpness": {
            "rho": cfg.adaptive_rho, "steps": cfg.steps, "mean": adaptive.mean,
            "std": adaptive.std,
        },
        "hessian_top_eigenvalue": float(eig.eigenvalues[0]),
        "hessian_top_eigenvalue_residual": float(eig.residuals[0]),
        "hessian_trace": {"trace": trace.trace, "stderr": trace.stderr},
        "settings": {
            "max_batches": cfg.max_batches, "batch_size": ckpt.data.train_eval.batch_size,
            "hessian_iters": cfg.hessian_iters, "trace_samples": cfg.trace_samples,
            "seed": cfg.seed, "bn_mode": "eval", "device": str(device),
            "precision": cfg.precision,
        },
    }  # fmt: skip
    clean, nonfinite = finite_json(summary)
    clean["nonfinite"] = nonfinite
    return cast(dict[str, Any], clean)
