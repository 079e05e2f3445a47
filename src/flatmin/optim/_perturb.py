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
parameters in place and must agree in float64. A group may carry a ``mask``: every tensor of the
group counts towards the norm, but only the tensors whose mask entry is true are moved (ESAM's
stochastic weight perturbation perturbs a random subset of the tensors).

Cost (p = 2, not adaptive, the common case) in passes over parameter-sized tensors: the norm reads
``g`` once; ``w ← w + s·g`` is one fused ``addcmul`` (reads ``w`` and ``g``, writes ``w``); no
temporary the size of the parameters is allocated and the scale ``s = ρ/‖g‖`` stays a 0-d tensor,
so there is no host sync (no ``.item()``). On CUDA the fused ``addcmul`` with a broadcast 0-d scale
would leave the multi-tensor fast path (one kernel launch per tensor), so there the update is
``_foreach_mul`` into one temporary (from the caching allocator) plus ``_foreach_add_``: two
launches per chunk of tensors instead of one per tensor.

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

__all__ = [
    "PerturbGroup",
    "add_scaled_",
    "dual_exponent",
    "perturb_foreach_",
    "perturb_single_tensor_",
    "split_by_device_dtype",
]


@dataclass
class PerturbGroup:
    """The tensors of one param group that take part in a perturbation, and its settings.

    ``mask`` (one bool per tensor, or ``None`` for all) selects the tensors that are moved; every
    tensor of the group counts towards the norm either way.
    """

    params: list[Tensor]
    grads: list[Tensor]
    rho: float
    p: float
    adaptive: bool
    eta: float
    mask: list[bool] | None = None

    def moved(self) -> list[int]:
        """Return the indices of the tensors that the perturbation moves."""
        if self.mask is None:
            return list(range(len(self.params)))
        return [i for i, m in enumerate(self.mask) if m]


def dual_exponent(p: float) -> float:
    """Return q with 1/p + 1/q = 1 (q = 1 for p = inf)."""
    return 1.0 if math.isinf(p) else p / (p - 1.0)


def _norm_dtype(groups: Sequence[PerturbGroup], uniform: bool = False) -> torch.dtype:
    # Low-precision parameters (bf16/fp16) get their norm accumulated in float32.
    if uniform:  # one dtype for all tensors: one look is enough
        wide = next(g.params[0] for g in groups if g.params).dtype == torch.float64
    else:
        wide = any(t.dtype == torch.float64 for g in groups for t in g.params)
    return torch.float64 if wide else torch.float32


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
            for i in group.moved():
                w, h = group.params[i], hs[i]
                if math.isinf(p):
                    e = h.sign() * group.rho
                else:
                    direction = h if p == 2.0 else h.sign() * h.abs().pow(q - 1.0)
                    assert denom is not None
                    e = direction * group.rho / denom.to(w)
                if group.adaptive:
                    e = e * (w.abs() + group.eta)
                w.add_(e)


def split_by_device_dtype(
    *lists: Sequence[Tensor], uniform: bool = False
) -> list[tuple[list[Tensor], ...]]:
    """Split aligned tensor lists by the (device, dtype) of the first list.

    ``torch._foreach_*`` ops want one device and dtype per call. ``uniform=True`` promises that
    all tensors already share one (SAM checks it once per set of parameters), which skips the
    per-tensor scan: on an accelerator that Python loop costs more than the kernels.
    """
    if uniform or not lists[0]:
        return [tuple(list(t) for t in lists)]
    index: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(lists[0]):
        index[(t.device, t.dtype)].append(i)
    return [tuple([t[i] for i in idx] for t in lists) for idx in index.values()]


def _sum_pow_q(hs: Sequence[Tensor], q: float, dtype: torch.dtype, uniform: bool) -> Tensor:
    """Return Σ_i ‖h_i‖_q^q as one 0-d tensor, without a host sync."""
    partial = []
    for (sub,) in split_by_device_dtype(hs, uniform=uniform):
        norms = torch._foreach_norm(sub, q, dtype=dtype)
        partial.append(torch.stack(norms).pow(q).sum())
    if len(partial) == 1:
        return partial[0]
    device = partial[0].device
    return torch.stack([s.to(device) for s in partial]).sum()


def _fused_addcmul(device: torch.device) -> bool:
    # On CPU the foreach ops loop over tensors anyway, so one fused addcmul per tensor (one pass
    # over memory) wins; on accelerators a broadcast 0-d operand leaves the multi-tensor fast path.
    return device.type == "cpu"


def add_scaled_(
    tensors: Sequence[Tensor],
    others: Sequence[Tensor],
    scale: Tensor,
    *,
    uniform: bool = False,
    scratch_others: bool = False,
) -> None:
    """``t ← t + s·o`` for every pair, with ``s`` a 0-d tensor: no host sync, no ``.item()``.

    On CPU one fused ``addcmul`` per tensor (one pass, no temporary). Elsewhere ``_foreach_mul``
    into one temporary plus ``_foreach_add_``, which keeps the multi-tensor fast path (a broadcast
    0-d operand would fall back to one kernel launch per tensor); with ``scratch_others`` the
    product goes into ``others`` in place instead, with no temporary at all.

    Args:
        tensors: Updated in place.
        others: Same shapes as ``tensors``.
        scale: A 0-d tensor on any device; it is moved to each tensor's device and dtype.
        uniform: All tensors share one device and dtype (see :func:`split_by_device_dtype`).
        scratch_others: ``others`` may be overwritten (e.g. gradients about to be cleared).
    """
    for ts, os in split_by_device_dtype(tensors, others, uniform=uniform):
        if not ts:
            continue
        s = scale.to(device=ts[0].device, dtype=ts[0].dtype)
        if _fused_addcmul(ts[0].device):
            torch._foreach_addcmul_(ts, os, [s] * len(ts))
        elif scratch_others:
            torch._foreach_mul_(os, s)
            torch._foreach_add_(ts, os)
        else:
            torch._foreach_add_(ts, torch._foreach_mul(os, s))


def perturb_foreach_(
    groups: Sequence[PerturbGroup],
    eps: float,
    *,
    uniform: bool = False,
    consume_grads: bool = False,
) -> None:
    """Multi-tensor kernel: the same update as :func:`perturb_single_tensor_`.

    For the common case (p = 2, not adaptive) it makes one fused pass ``w ← w + s·g`` per tensor
    (:func:`add_scaled_` with a 0-d scale tensor, so there is no host sync and on CPU no temporary
    the size of the parameters); the other cases build ``ε`` in temporaries first.

    Args:
        groups: The participating tensors per param group with their settings.
        eps: Added to the normaliser so that a zero gradient gives ``ε = 0``, not NaN.
        uniform: All tensors share one device and dtype (skips a per-tensor scan).
        consume_grads: The gradients are cleared right after, so they may serve as scratch
            space (saves a temporary the size of the parameters on accelerators).
    """
    for p, ball in _by_p(groups).items():
        q = dual_exponent(p)
        dtype = _norm_dtype(ball, uniform)
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
            all_hs = [h for hs in hs_per_group for h in hs]
            inv = 1.0 / (_sum_pow_q(all_hs, q, dtype, uniform).pow(1.0 / p) + eps)
        for group, hs in zip(ball, hs_per_group):
            params = group.params
            if group.mask is not None:
                params = [w for w, m in zip(params, group.mask) if m]
                hs = [h for h, m in zip(hs, group.mask) if m]
            if not params:
                continue
            if inv is not None and p == 2.0 and not group.adaptive:
                # Fused: one pass over w and g, no temporary the size of the parameters.
                add_scaled_(
                    params, hs, inv * group.rho, uniform=uniform, scratch_others=consume_grads
                )
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
                for (sub,) in split_by_device_dtype(e, uniform=uniform):
                    torch._foreach_mul_(sub, (inv * group.rho).to(sub[0]))
            if group.adaptive:
                t = torch._foreach_abs(params)
                torch._foreach_add_(t, group.eta)
                torch._foreach_mul_(e, t)
            torch._foreach_add_(params, e)
