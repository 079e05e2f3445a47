"""Sharpness measures: worst case (SAM-style), m-sharpness, adaptive and average case.

For a batch ``B`` with loss ``L_B`` and perturbation set ``𝒮``:

* worst case: ``S = max_{δ∈𝒮} L_B(w + δ) − L_B(w)`` with ``𝒮 = {‖δ‖_p ≤ ρ}``, p ∈ {2, ∞}, or
  adaptively ``𝒮 = {‖δ / T‖_p ≤ ρ}``, ``T = |w| + η`` (ASAM); the maximum is approximated by
  projected gradient ascent from ``δ = 0`` (one step = the SAM perturbation).
* average case: ``S = E_{δ∼N(0, ρ² I)} L_B(w + δ) − L_B(w)`` (adaptive: ``δ = T ⊙ z``,
  ``z ∼ N(0, ρ² I)``), estimated with ``samples`` draws.
* m-sharpness: each batch is split into chunks of ``m`` examples, the sharpness of every chunk is
  computed with its own perturbation and the chunks are averaged.

One value per batch is returned together with its mean and standard deviation.

References:
    Foret et al. 2021 (arXiv:2010.01412), m-sharpness and Fig. 5; Kwon et al. 2021 (ASAM,
    arXiv:2102.11600); Keskar et al. 2017 (arXiv:1609.04836); Jiang et al. 2020
    (arXiv:1912.02178); Andriushchenko et al. 2023 (arXiv:2302.07011).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from flatmin.analysis._common import (
    Batch,
    Batches,
    BNMode,
    LossFn,
    check_choice,
    forward,
    materialize,
    model_device,
    preserved,
    set_eval_mode,
    to_device,
)
from flatmin.analysis.results import SharpnessResult
from flatmin.optim.rules import LpBall, PerturbGroup

__all__ = ["sharpness"]


def _split(batch: Batch, m: int | None) -> list[Batch]:
    inputs, targets = batch
    n = targets.shape[0]
    if m is None or m >= n:
        return [batch]
    if not isinstance(inputs, Tensor):
        raise TypeError("m-sharpness needs tensor inputs that can be split along dim 0")
    return [(inputs[i : i + m], targets[i : i + m]) for i in range(0, n, m)]


def _ascent_direction(
    grads: list[Tensor], w0: list[Tensor], p: float, adaptive: bool, eta: float
) -> list[Tensor]:
    """Steepest ascent unit step in the (scaled) ``ℓ_p`` ball: ``T ⊙ u`` with ‖u‖_p = 1.

    It is the optimizers' ``ε̂`` with ``ρ = 1`` (:mod:`flatmin.optim.rules`), ``T = |w0| + η``.
    """
    group = PerturbGroup(w0, grads, 1.0, p, adaptive, eta)
    return [e for e in LpBall().perturbation([group], eps=0.0)[0] if e is not None]


def _norm2(ts: list[Tensor]) -> float:
    """``‖concat(ts)‖₂`` in float64, scaled by the largest entry so that it cannot overflow.

    An overflowed norm (inf) would make the projection factor ``ρ/inf = 0`` and silently drop
    the perturbation, reporting a sharpness of 0.
    """
    big = max((float(t.detach().abs().max()) for t in ts if t.numel()), default=0.0)
    if big == 0.0 or not math.isfinite(big):
        return big
    return big * math.sqrt(sum(float(((t.double() / big) ** 2).sum()) for t in ts))


def _nan_max(a: float, b: float) -> float:
    """``max(a, b)`` that propagates NaN (Python's ``max`` keeps ``a`` when ``b`` is NaN)."""
    return b if math.isnan(b) or b > a else a


def _project(
    delta: list[Tensor], scales: list[Tensor] | None, rho: float, p: float
) -> list[Tensor]:
    """Project onto ``{‖δ / T‖_p ≤ ρ}``."""
    u = delta if scales is None else [d / t for d, t in zip(delta, scales, strict=True)]
    if p == 2:
        norm = _norm2(u)
        factor = min(1.0, rho / norm) if norm > 0 else 1.0
        u = [ui * factor for ui in u]
    else:
        u = [ui.clamp(-rho, rho) for ui in u]
    return u if scales is None else [t * ui for t, ui in zip(scales, u, strict=True)]


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    rho: float = 0.05,
    kind: Literal["worst", "average"] = "worst",
    p: float = 2,
    steps: int = 1,
    step_size: float | None = None,
    m: int | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
    samples: int = 10,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    bn_mode: BNMode = "eval",
) -> SharpnessResult:
    r"""Per-batch sharpness of the loss at the model's weights.

    Worst case (``kind="worst"``): with ``T = |w| + η`` if ``adaptive`` else ``T = 1``, ascent in
    the scaled coordinates ``u = δ / T`` for ``steps`` iterations,

    .. math:: u \leftarrow \Pi_{\|u\|_p \le \rho}\big(u + \alpha\, s_p(T \odot
       \nabla L_B(w + T\odot u))\big),

    with ``s_2(g) = g/‖g‖₂``, ``s_∞(g) = sign(g)``, ``α = ρ`` for one step (which gives SAM's
    ``ε = ρ g/‖g‖``, or ASAM's ``ρ T² g / ‖T g‖``) and ``α = 2ρ/steps`` by default otherwise. The
    reported perturbed loss is the largest loss over the iterates.

    Average case (``kind="average"``): mean of ``L_B(w + T ⊙ z) − L_B(w)`` over ``samples`` draws
    ``z ∼ N(0, ρ² I)``.

    Args:
        model: The network; restored exactly on return.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batches: Iterable of ``(inputs, targets)``; one sharpness value per batch.
        rho: Radius ``ρ`` (worst case) or standard deviation (average case), ≥ 0.
        kind: ``"worst"`` or ``"average"``.
        p: ``2`` or ``math.inf`` (worst case only).
        steps: Ascent steps (worst case).
        step_size: Ascent step ``α`` (default ``ρ`` for one step, ``2ρ/steps`` otherwise).
        m: Chunk size for m-sharpness (``None``: the whole batch).
        adaptive: Scale the ball by ``T = |w| + η`` (ASAM).
        eta: ``η`` of the adaptive scaling.
        samples: Gaussian draws per chunk (average case).
        generator: Source of the Gaussian draws (``None``: torch's default generator).
        max_batches: Use at most this many batches.
        bn_mode: ``"eval"`` (running statistics) or ``"batch"`` (BatchNorm batch statistics, as
            in SAM's training-time perturbation).

    Returns:
        :class:`SharpnessResult` with per-batch ``values``, ``mean`` and ``std``. A batch whose
        loss, gradient or perturbed loss is NaN or infinite gets a non-finite value (never a
        number standing in for it), and ``result.finite`` is then ``False``.

    Raises:
        ValueError: for a negative ``rho``, unknown ``kind`` or ``p``, or bad counts, or a batch
            of other than two values.
        TypeError: A batch is not a pair ``(inputs, targets)`` (e.g. a bare tensor ``[x]``).

    References:
        Foret et al. 2021 (arXiv:2010.01412); Kwon et al. 2021 (arXiv:2102.11600);
        Andriushchenko et al. 2023 (arXiv:2302.07011).

    Example:
        >>> net = nn.Linear(4, 3).double()
        >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        >>> res = sharpness(net, nn.functional.cross_entropy, [(x, y)], rho=0.1)
        >>> res.values.shape
        (1,)
    """
    if not (isinstance(rho, (int, float)) and rho >= 0):
        raise ValueError(f"Invalid rho: {rho!r} (expected >= 0)")
    check_choice("kind", kind, ("worst", "average"))
    if p not in (2, math.inf):
        raise ValueError(f"Invalid p: {p!r} (expected 2 or math.inf)")
    for name, value in (("steps", steps), ("samples", samples)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 1)")
    if m is not None and (not isinstance(m, int) or m < 1):
        raise ValueError(f"Invalid m: {m!r} (expected None or an int >= 1)")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"Invalid step_size: {step_size!r} (expected > 0)")
    if not eta >= 0:
        raise ValueError(f"Invalid eta: {eta!r} (expected >= 0)")
    alpha = step_size if step_size is not None else (rho if steps == 1 else 2 * rho / steps)
    data = materialize(batches, max_batches)
    values, base_losses, pert_losses = [], [], []
    with preserved(model):
        set_eval_mode(model, bn_mode)
        device = model_device(model)
        params = [q for q in model.parameters() if q.requires_grad]
        w0 = [q.detach().clone() for q in params]
        scales = [w.abs() + eta for w in w0] if adaptive else None
        gen_device = generator.device if generator is not None else torch.device("cpu")

        def loss_at(delta: list[Tensor] | None, batch: Batch, grad: bool) -> tuple[float, list]:
            with torch.no_grad():
                for i, (q, w) in enumerate(zip(params, w0, strict=True)):
                    q.copy_(w if delta is None else w + delta[i])
            inputs, targets = batch
            with torch.set_grad_enabled(grad):
                loss = loss_fn(forward(model, inputs), targets)
            if not grad:
                return float(loss.detach()), []
            g = torch.autograd.grad(loss, params, allow_unused=True)
            return float(loss.detach()), [
                torch.zeros_like(q) if gi is None else gi for q, gi in zip(params, g)
            ]

        for batch in data:
            chunk_vals, chunk_base, chunk_pert = [], [], []
            for chunk in _split(to_device(batch, device), m):
                if kind == "worst":
                    base, grads = loss_at(None, chunk, True)
                    delta = [torch.zeros_like(w) for w in w0]
                    best = base
                    for it in range(steps):
                        if it > 0:
                            _, grads = loss_at(delta, chunk, True)
                        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                            best = math.nan  # no ascent direction: the worst case is undefined
                            break
                        step = _ascent_direction(grads, w0, p, adaptive, eta)
                        delta = _project(
                            [d + alpha * s for d, s in zip(delta, step, strict=True)],
                            scales, rho, p,
                        )  # fmt: skip
                        # A NaN loss must win: max(best, nan) would keep best and report
                        # a finite sharpness where the loss is undefined.
                        best = _nan_max(best, loss_at(delta, chunk, False)[0])
                    pert = best
                else:
                    base = loss_at(None, chunk, False)[0]
                    draws = []
                    for _ in range(samples):
                        z = [
                            rho * torch.randn(w.shape, generator=generator, dtype=w.dtype,
                                              device=gen_device).to(w.device)
                            for w in w0
                        ]  # fmt: skip
                        if scales is not None:
                            z = [t * zi for t, zi in zip(scales, z, strict=True)]
                        draws.append(loss_at(z, chunk, False)[0])
                    pert = float(np.mean(draws))
                chunk_vals.append(pert - base)
                chunk_base.append(base)
                chunk_pert.append(pert)
            values.append(float(np.mean(chunk_vals)))
            base_losses.append(float(np.mean(chunk_base)))
            pert_losses.append(float(np.mean(chunk_pert)))
    arr = np.array(values)
    settings = {
        "kind": kind,
        "rho": rho,
        "p": "inf" if p == math.inf else p,
        "steps": steps,
        "step_size": alpha,
        "m": m,
        "adaptive": adaptive,
        "eta": eta,
        "samples": samples,
        "max_batches": max_batches,
        "bn_mode": bn_mode,
    }
    return SharpnessResult(
        values=arr,
        base_loss=np.array(base_losses),
        perturbed_loss=np.array(pert_losses),
        mean=float(arr.mean()),
        std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        settings=settings,
    )
