"""Loss and error along rays, along the line between two models, and on 2-D planes.

All functions evaluate the network in eval mode (dropout off; BatchNorm per ``bn``, below) on one or
several data sets at once and restore the caller's model exactly.

BatchNorm policy ``bn``:

* ``"frozen"``: keep the running statistics the (first) model has; cheap, but the statistics no
  longer match the moved weights, so losses far from the start point are pessimistic.
* ``"recompute"``: at every point reset the statistics and recompute them as a cumulative average
  over ``bn_batches`` in training mode (as :func:`torch.optim.swa_utils.update_bn` does). This is
  what a trained model at that point would use; it costs one pass over ``bn_batches`` per point.
* ``"interpolate"`` (two-model line only): buffers ``(1−α) b + α b'``, exact at both endpoints;
  an extrapolated ``running_var`` is clamped at 0 (it can cross zero for α < 0 or α > 1).

References:
    Goodfellow, Vinyals, Saxe 2015 (arXiv:1412.6544), linear interpolation; Izmailov et al. 2018
    (arXiv:1803.05407), Fig. 4 rays; Li et al. 2018 (arXiv:1712.09913), planes; Kaddour et al. 2022
    (arXiv:2202.00661), asymmetry of the interpolation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from flatmin.analysis._common import (
    Batches,
    BNMode,
    LossFn,
    as_datasets,
    check_choice,
    check_max_batches,
    evaluate,
    preserved,
    recompute_batchnorm,
    reusable,
    set_eval_mode,
)
from flatmin.analysis.directions import Direction
from flatmin.analysis.results import AsymmetryResult, PathResult, PlaneResult

__all__ = ["asymmetry", "evaluate_plane", "evaluate_ray", "interpolate"]

BNPolicy = Literal["frozen", "recompute", "interpolate"]
Data = Mapping[str, Batches] | Batches


def _coords(values: Sequence[float] | np.ndarray | Tensor, name: str) -> np.ndarray:
    arr = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, float)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"Invalid {name}: {values!r} (expected a non-empty 1-D finite sequence)")
    return arr


def _check_bn(bn: str, bn_batches: Batches | None, allowed: tuple[str, ...]) -> None:
    check_choice("bn", bn, allowed)
    if bn == "recompute" and bn_batches is None:
        raise ValueError(
            "Invalid bn_batches: None (bn='recompute' needs batches for BN statistics)"
        )


def _check_direction(model: nn.Module, direction: Direction, name: str) -> None:
    params = dict(model.named_parameters())
    unknown = [k for k in direction if k not in params]
    if unknown:
        raise ValueError(f"Invalid {name}: unknown parameter names {unknown}")
    for k, v in direction.items():
        if v.shape != params[k].shape:
            expected = tuple(params[k].shape)
            raise ValueError(
                f"Invalid {name}: {k} has shape {tuple(v.shape)} (expected {expected})"
            )


def _sweep(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    n_points: int,
    move: Callable[[int], None],
    *,
    bn: str,
    bn_batches: Batches | None,
    max_batches: int | None,
    bn_mode: BNMode,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Evaluate every data set at ``n_points`` points; ``move(i)`` puts point ``i`` in the model."""
    check_max_batches(max_batches)
    datasets = {k: reusable(v) for k, v in as_datasets(data).items()}
    bn_source = reusable(bn_batches) if bn_batches is not None else None
    loss = {k: np.empty(n_points) for k in datasets}
    error = {k: np.empty(n_points) for k in datasets}
    for i in range(n_points):
        with torch.no_grad():
            move(i)
        if bn == "recompute":
            assert bn_source is not None  # checked by _check_bn
            recompute_batchnorm(model, bn_source, max_batches)
        set_eval_mode(model, bn_mode)
        for name, batches in datasets.items():
            loss[name][i], error[name][i] = evaluate(model, loss_fn, batches, max_batches)
    return loss, error


def evaluate_ray(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    direction: Direction,
    t: Sequence[float] | np.ndarray | Tensor,
    *,
    bn: Literal["frozen", "recompute"] = "frozen",
    bn_batches: Batches | None = None,
    max_batches: int | None = None,
    bn_mode: BNMode = "eval",
) -> PathResult:
    """Loss and error along the ray ``w(t) = w + t·d`` (Izmailov et al. 2018, Fig. 4).

    Args:
        model: The network at ``w``; restored exactly on return.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the batch).
        data: ``{name: batches}`` (e.g. train and test) or one iterable of ``(inputs, targets)``.
        direction: Name → tensor (see :func:`random_direction`); missing names are not moved.
        t: Positions along the ray, any real numbers.
        bn: ``"frozen"`` or ``"recompute"`` (see module docstring).
        bn_batches: Batches for ``bn="recompute"`` (usually training data without augmentation).
        max_batches: Use at most this many batches of every data set (and of ``bn_batches``).
        bn_mode: ``"eval"`` (running statistics) or ``"batch"`` (BatchNorm uses batch statistics).

    Returns:
        A :class:`PathResult` with ``kind="ray"`` and ``coords = t``.

    Raises:
        ValueError: for a bad ``t``, ``bn``, ``max_batches`` or a direction that does not fit.

    References:
        Izmailov et al. 2018 (arXiv:1803.05407); Li et al. 2018 (arXiv:1712.09913).
    """
    ts = _coords(t, "t")
    _check_bn(bn, bn_batches, ("frozen", "recompute"))
    _check_direction(model, direction, "direction")
    with preserved(model):
        params = dict(model.named_parameters())
        base = {k: params[k].detach().clone() for k in direction}

        def move(i: int) -> None:
            for k, d in direction.items():
                params[k].copy_(base[k] + float(ts[i]) * d.to(base[k]))

        loss, error = _sweep(
            model, loss_fn, data, len(ts), move,
            bn=bn, bn_batches=bn_batches, max_batches=max_batches, bn_mode=bn_mode,
        )  # fmt: skip
    settings = {"bn": bn, "max_batches": max_batches, "bn_mode": bn_mode}
    return PathResult(kind="ray", coords=ts, loss=loss, error=error, settings=settings)


def _pair(model_a: nn.Module, model_b: nn.Module) -> tuple[list[str], list[str]]:
    pa = [k for k, _ in model_a.named_parameters()]
    pb = [k for k, _ in model_b.named_parameters()]
    ba = [k for k, _ in model_a.named_buffers()]
    bb = [k for k, _ in model_b.named_buffers()]
    if pa != pb or ba != bb:
        raise ValueError("Invalid models: parameter or buffer names differ (same architecture?)")
    return pa, ba


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    data: Data,
    alpha: Sequence[float] | np.ndarray | Tensor,
    *,
    bn: BNPolicy = "interpolate",
    bn_batches: Batches | None = None,
    max_batches: int | None = None,
    bn_mode: BNMode = "eval",
) -> PathResult:
    """Loss and error on the line ``θ(α) = (1 − α)·θ_a + α·θ_b`` (any real ``α``).

    The points are written into ``model_a`` (restored on return); ``model_b`` is only read.
    ``α = 0`` gives ``θ_a`` and ``α = 1`` gives ``θ_b`` bit-exactly; ``α < 0`` and ``α > 1``
    extrapolate beyond the endpoints.

    Args:
        model_a: The model at ``α = 0``.
        model_b: The model at ``α = 1`` (same architecture).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        data: ``{name: batches}`` or one iterable of ``(inputs, targets)``.
        alpha: Coordinates along the line.
        bn: ``"interpolate"`` (buffers interpolated like the weights; default), ``"recompute"``
            (statistics recomputed on ``bn_batches`` at every point) or ``"frozen"`` (the buffers
            of ``model_a`` everywhere).
        bn_batches: Batches for ``bn="recompute"``.
        max_batches: Use at most this many batches of each data set.
        bn_mode: ``"eval"`` or ``"batch"``.

    Returns:
        A :class:`PathResult` with ``kind="interpolation"`` and ``coords = alpha``.

    Raises:
        ValueError: if the models differ in architecture, or for bad arguments.

    References:
        Goodfellow et al. 2015 (arXiv:1412.6544); Kaddour et al. 2022 (arXiv:2202.00661).
    """
    alphas = _coords(alpha, "alpha")
    _check_bn(bn, bn_batches, ("frozen", "recompute", "interpolate"))
    _pair(model_a, model_b)
    with preserved(model_a):
        pa = list(model_a.named_parameters())
        ba = list(model_a.named_buffers())
        with torch.no_grad():
            start_p = [p.detach().clone() for _, p in pa]
            end_p = [q.detach().to(p) for (_, p), (_, q) in zip(pa, model_b.named_parameters())]
            start_b = [b.detach().clone() for _, b in ba]
            end_b = [c.detach().to(b) for (_, b), (_, c) in zip(ba, model_b.named_buffers())]

        def move(i: int) -> None:
            a = float(alphas[i])
            for (_, p), s, e in zip(pa, start_p, end_p, strict=True):
                if p.is_floating_point():
                    p.copy_((1.0 - a) * s + a * e)
            if bn == "interpolate":
                for (name, b), s, e in zip(ba, start_b, end_b, strict=True):
                    if b.is_floating_point():
                        b.copy_((1.0 - a) * s + a * e)
                        if name.endswith("running_var"):  # extrapolation can cross zero
                            b.clamp_(min=0.0)
            elif bn == "frozen":
                for (_, b), s in zip(ba, start_b, strict=True):
                    b.copy_(s)

        loss, error = _sweep(
            model_a, loss_fn, data, len(alphas), move,
            bn=bn, bn_batches=bn_batches, max_batches=max_batches, bn_mode=bn_mode,
        )  # fmt: skip
    settings = {"bn": bn, "max_batches": max_batches, "bn_mode": bn_mode}
    return PathResult(
        kind="interpolation", coords=alphas, loss=loss, error=error, settings=settings
    )


def asymmetry(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    a: float = 0.1,
    bn: BNPolicy = "interpolate",
    bn_batches: Batches | None = None,
    max_batches: int | None = None,
    bn_mode: BNMode = "eval",
) -> AsymmetryResult:
    r"""Asymmetry of the loss around ``θ_a`` along the line towards ``θ_b``.

    .. math:: \Delta = L(\theta(+a)) - L(\theta(-a)),\quad \theta(\alpha) = (1-\alpha)\theta_a
       + \alpha\theta_b

    Kaddour et al. (2022) compare ``L(θ(0.1))`` and ``L(θ(−0.1))`` between a flat (SWA/SAM) and a
    non-flat solution to show that the minima lie in asymmetric valleys.

    Args:
        model_a: ``θ_a`` (the centre).
        model_b: ``θ_b`` (sets the direction and scale).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        data: ``{name: batches}`` or one iterable.
        a: Step along the line; must be > 0.
        bn: BatchNorm policy, as in :func:`interpolate`.
        bn_batches: Batches for ``bn="recompute"``.
        max_batches: Use at most this many batches of each data set.
        bn_mode: ``"eval"`` or ``"batch"``.

    Returns:
        An :class:`AsymmetryResult`; ``.difference`` holds ``Δ`` per data set.

    Raises:
        ValueError: if ``a <= 0`` or for bad arguments.

    References:
        Kaddour et al. 2022 (arXiv:2202.00661); He, Huang, Yuan 2019 (arXiv:1902.00744).
    """
    if not (isinstance(a, (int, float)) and a > 0):
        raise ValueError(f"Invalid a: {a!r} (expected > 0)")
    path = interpolate(
        model_a, model_b, loss_fn, data, [-a, 0.0, a],
        bn=bn, bn_batches=bn_batches, max_batches=max_batches, bn_mode=bn_mode,
    )  # fmt: skip
    settings = dict(path.settings)
    return AsymmetryResult(a=float(a), loss=path.loss, error=path.error, settings=settings)


def evaluate_plane(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    directions: tuple[Direction, Direction],
    x: Sequence[float] | np.ndarray | Tensor,
    y: Sequence[float] | np.ndarray | Tensor,
    *,
    bn: Literal["frozen", "recompute"] = "frozen",
    bn_batches: Batches | None = None,
    max_batches: int | None = None,
    bn_mode: BNMode = "eval",
) -> PlaneResult:
    """Loss and error on the plane ``w(x, y) = w + x·d₁ + y·d₂`` (Li et al. 2018).

    Args:
        model: The network at the origin; restored on return.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        data: ``{name: batches}`` or one iterable.
        directions: ``(d₁, d₂)``, e.g. two filter-normalised :func:`random_direction` draws, or
            :func:`model_direction` towards two other solutions.
        x: Coordinates along ``d₁``.
        y: Coordinates along ``d₂``.
        bn: ``"frozen"`` or ``"recompute"``.
        bn_batches: Batches for ``bn="recompute"``.
        max_batches: Use at most this many batches of each data set.
        bn_mode: ``"eval"`` or ``"batch"``.

    Returns:
        A :class:`PlaneResult`; ``loss[name][i, j]`` is the loss at ``(x[i], y[j])``.

    References:
        Li et al. 2018 (arXiv:1712.09913); Garipov et al. 2018 (arXiv:1802.10026), Fig. 1.
    """
    xs, ys = _coords(x, "x"), _coords(y, "y")
    _check_bn(bn, bn_batches, ("frozen", "recompute"))
    if not isinstance(directions, (tuple, list)) or len(directions) != 2:
        raise ValueError(f"Invalid directions: expected two directions, got {type(directions)}")
    d1, d2 = directions
    _check_direction(model, d1, "directions[0]")
    _check_direction(model, d2, "directions[1]")
    grid = [(float(u), float(v)) for u in xs for v in ys]
    with preserved(model):
        params = dict(model.named_parameters())
        names = sorted(set(d1) | set(d2), key=list(params).index)
        base = {k: params[k].detach().clone() for k in names}

        def move(i: int) -> None:
            u, v = grid[i]
            for k in names:
                step = base[k].clone()
                if k in d1:
                    step += u * d1[k].to(step)
                if k in d2:
                    step += v * d2[k].to(step)
                params[k].copy_(step)

        loss, error = _sweep(
            model, loss_fn, data, len(grid), move,
            bn=bn, bn_batches=bn_batches, max_batches=max_batches, bn_mode=bn_mode,
        )  # fmt: skip
    shape = (len(xs), len(ys))
    settings = {"bn": bn, "max_batches": max_batches, "bn_mode": bn_mode}
    return PlaneResult(
        x=xs,
        y=ys,
        loss={k: v.reshape(shape) for k, v in loss.items()},
        error={k: v.reshape(shape) for k, v in error.items()},
        settings=settings,
    )
