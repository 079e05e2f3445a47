r"""The perturbation core shared by SAM, ASAM, WASAM and the cheaper SAM variants.

SAM (Foret et al. 2021, eq. 2) approximates the inner maximisation
:math:`\max_{\|\epsilon\|_p \le \rho} L(w + \epsilon)` to first order by

.. math::

    \hat\epsilon(w) = \rho \,\operatorname{sign}(g)\, |g|^{q-1} \,/\, \big(\|g\|_q^q\big)^{1/p},
    \qquad 1/p + 1/q = 1,

so :math:`p = 2` gives :math:`\rho\, g / \|g\|_2` and :math:`p = \infty` gives
:math:`\rho \operatorname{sign}(g)`. Adaptive SAM (Kwon et al. 2021) solves the same problem in the
rescaled space :math:`T^{-1}\epsilon` with :math:`T = |w| + \eta` (elementwise): with
:math:`h = T g`, :math:`\hat\epsilon = T\, \hat\epsilon_p(h)`; for :math:`p = 2` this is
:math:`\rho\, T^2 g / \|T g\|_2`.

The norm runs over **every** tensor that takes part in the step (all param groups), so the
perturbation is one point on one ball. Groups may carry their own ``rho`` (a per-group radius on the
shared direction), ``adaptive`` and ``eta``; groups with different ``p`` form separate balls, each
normalised over its own tensors.

Two kernels compute it: :func:`perturb_single_tensor_` (a plain loop, the reference) and
:func:`perturb_foreach_` (``torch._foreach_*``, the default). Both write ``w + ε`` into the
parameters in place and must agree in float64.

References:
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021, arXiv:2010.01412. Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks", ICML 2021, arXiv:2102.11600.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PerturbGroup", "dual_exponent", "perturb_foreach_", "perturb_single_tensor_"]


@dataclass
class PerturbGroup:
    """The tensors of one param group that take part in a perturbation, and its settings."""

    params: list[Tensor]
    grads: list[Tensor]
    rho: float
    p: float
    adaptive: bool
    eta: float


def dual_exponent(p: float) -> float:
    """Return q with 1/p + 1/q = 1 (q = 1 for p = inf)."""
    return 1.0 if math.isinf(p) else p / (p - 1.0)


def _norm_dtype(groups: Sequence[PerturbGroup]) -> torch.dtype:
    # Low-precision parameters (bf16/fp16) get their norm accumulated in float32.
    if any(t.dtype == torch.float64 for g in groups for t in g.params):
        return torch.float64
    return torch.float32


def _by_p(groups: Sequence[PerturbGroup]) -> dict[float, list[PerturbGroup]]:
    balls: dict[float, list[PerturbGroup]] = defaultdict(list)
    for group in groups:
        if group.params:
            balls[float(group.p)].append(group)
    return balls


def perturb_single_tensor_(groups: Sequence[PerturbGroup], eps: float) -> None:
    """Reference kernel: ``w ← w + ε̂(w)`` with one plain loop per tensor.

    Args:
        groups: The participating tensors per param group with their settings.
        eps: Added to the normaliser so that a zero gradient gives ``ε = 0``, not NaN.
    """
    for p, ball in _by_p(groups).items():
        q = dual_exponent(p)
        dtype = _norm_dtype(ball)
        scaled: list[list[Tensor]] = []
        total = None
        for group in ball:
            hs = []
            for w, g in zip(group.params, group.grads):
                h = (w.abs() + group.eta) * g if group.adaptive else g
                hs.append(h)
                if not math.isinf(p):
                    term = h.to(dtype).abs().pow(q).sum()
                    total = term if total is None else total + term.to(total.device)
            scaled.append(hs)
        # (‖h‖_q^q)^(1/p); for p = inf the exponent is 0 and ε = ρ sign(h).
        denom = None if total is None else total.pow(1.0 / p) + eps
        for group, hs in zip(ball, scaled):
            for w, h in zip(group.params, hs):
                if math.isinf(p):
                    e = h.sign() * group.rho
                else:
                    direction = h if p == 2.0 else h.sign() * h.abs().pow(q - 1.0)
                    assert denom is not None
                    e = direction * group.rho / denom.to(w)
                if group.adaptive:
                    e = e * (w.abs() + group.eta)
                w.add_(e)


def _grouped(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    index: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        index[(t.device, t.dtype)].append(i)
    return index


def _sum_pow_q(hs: Sequence[Tensor], q: float, dtype: torch.dtype) -> Tensor:
    """Return Σ_i ‖h_i‖_q^q as one 0-d tensor, without a host sync."""
    partial = []
    for idx in _grouped(hs).values():
        norms = torch._foreach_norm([hs[i] for i in idx], q, dtype=dtype)
        partial.append(torch.stack(norms).pow(q).sum())
    device = partial[0].device
    return torch.stack([s.to(device) for s in partial]).sum()


def perturb_foreach_(groups: Sequence[PerturbGroup], eps: float) -> None:
    """Multi-tensor kernel: the same update as :func:`perturb_single_tensor_`.

    For the common case (p = 2, not adaptive) it makes one fused pass ``w ← w + s·g`` per tensor
    (``addcmul`` with a 0-d scale tensor, so there is no host sync and no temporary the size of
    the parameters); the other cases build ``ε`` in temporaries first.
    """
    for p, ball in _by_p(groups).items():
        q = dual_exponent(p)
        dtype = _norm_dtype(ball)
        hs_per_group: list[list[Tensor]] = []
        for group in ball:
            if group.adaptive:
                t = torch._foreach_abs(group.params)
                torch._foreach_add_(t, group.eta)
                hs_per_group.append(list(torch._foreach_mul(t, group.grads)))
            else:
                hs_per_group.append(group.grads)
        if math.isinf(p):
            inv = None
        else:
            total = _sum_pow_q([h for hs in hs_per_group for h in hs], q, dtype)
            inv = 1.0 / (total.pow(1.0 / p) + eps)
        for group, hs in zip(ball, hs_per_group):
            if inv is not None and p == 2.0 and not group.adaptive:
                # Fused: one pass over w and g, no temporary the size of the parameters.
                for idx in _grouped(group.params).values():
                    params = [group.params[i] for i in idx]
                    scale = (inv * group.rho).to(params[0])
                    torch._foreach_addcmul_(params, [hs[i] for i in idx], [scale] * len(idx))
                continue
            if inv is None:  # p = inf: ε = ρ sign(h)
                e = list(torch._foreach_sign(hs))
                torch._foreach_mul_(e, group.rho)
            else:
                # For p = 2 here h is already a temporary (adaptive), so scale it in place.
                if p == 2.0:
                    e = list(hs)
                else:
                    e = list(torch._foreach_pow(torch._foreach_abs(hs), q - 1.0))
                    torch._foreach_mul_(e, torch._foreach_sign(hs))
                for idx in _grouped(e).values():
                    torch._foreach_mul_([e[i] for i in idx], (inv * group.rho).to(e[idx[0]]))
            if group.adaptive:
                t = torch._foreach_abs(group.params)
                torch._foreach_add_(t, group.eta)
                torch._foreach_mul_(e, t)
            torch._foreach_add_(group.params, e)
