r"""GSAM: surrogate-gap guided SAM (Zhuang et al. 2022).

SAM minimises the perturbed loss ``f_p(w) = L(w + ε̂)``; GSAM also minimises the surrogate gap
``h(w) = f_p(w) − L(w)`` without moving ``f_p``: it descends along the SAM gradient and ascends
along the part of the plain gradient that is orthogonal to it. With ``g = ∇L(w)`` and
``g_s = ∇L(w + ε̂)`` (SAM's two passes)::

    g_⊥ = g − (g·g_s / ‖g_s‖²) g_s          # component of g orthogonal to g_s
    w   ← base_step(w, g_s − α g_⊥)

The radius follows the learning rate (``ρ_t ∝ lr_t``), which is
:class:`~flatmin.optim.rho_schedule.ProportionalRho`. ``α = 0`` is SAM.

References:
    Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022,
    arXiv:2203.08065.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from flatmin.optim._checks import GroupCheck, check_nonneg
from flatmin.optim._vec import add_scaled_, dot, foreach, sum_sq, wide_dtype
from flatmin.optim.sam import SAM

__all__ = ["GSAM"]


class GSAM(SAM):
    r"""Surrogate-gap guided SAM: descend along ``g_s``, remove ``α`` of ``g``'s orthogonal part.

    .. math::

        g_\perp = g - \frac{g \cdot g_s}{\|g_s\|^2}\, g_s, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\ g_s - \alpha\, g_\perp\big),

    with ``g = ∇L(w)`` and ``g_s = ∇L(w + ε̂)`` over all param groups. ``alpha`` lives in the
    param groups (per group, schedulable); ``α = 0`` is :class:`~flatmin.optim.SAM` exactly.
    Pair it with :class:`~flatmin.optim.rho_schedule.ProportionalRho` for GSAM's radius schedule.
    Costs one parameter-sized buffer (``g`` between the passes).

    Args:
        alpha: Weight α ``>= 0`` of the surrogate-gap direction (the paper tunes 0.01–0.3; the
            official example uses 0.4, the default). Every other argument is
            :class:`~flatmin.optim.SAM`'s (``rho`` is GSAM's ``ρ_max`` under ProportionalRho).

    Raises:
        TypeError, ValueError: ``alpha`` is not a finite float ``>= 0`` (and SAM's own checks).

    References:
        Zhuang et al., ICLR 2022, arXiv:2203.08065 (GSAM, Algorithm 1).

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = flatmin.GSAM(model.parameters(), torch.optim.SGD, 0.05, alpha=0.1, lr=0.1)
        >>> rho_sched = flatmin.optim.ProportionalRho(opt, rho_min=0.01)  # ρ_t ∝ lr_t
        >>> opt.param_groups[0]["alpha"], opt.param_groups[0]["rho"]
        (0.1, 0.05)
    """

    _group_defaults: ClassVar[dict[str, Any]] = {"alpha": 0.4}
    _group_checks: ClassVar[dict[str, GroupCheck]] = {**SAM._group_checks, "alpha": check_nonneg}

    def _on_first_pass(self) -> None:
        self._keep_first_grads()

    @torch.no_grad()
    def _combine_(self) -> None:
        parts = self._kept_by_group()
        if not parts:
            return
        g = [t for _, _, kept, _ in parts for t in kept]
        g_s = [t for _, _, _, grads in parts for t in grads]
        dtype = wide_dtype(g)
        # g ← g_⊥ = g − c g_s, c = g·g_s / ‖g_s‖² (in the buffers; they are refilled next step).
        c = dot(g, g_s, dtype) / (sum_sq(g_s, dtype) + self.eps)
        add_scaled_(g, g_s, -c)
        for group, _, kept, grads in parts:
            alpha = self._hp(group, "alpha")
            if alpha != 0.0:
                foreach(torch._foreach_add_, grads, kept, alpha=-alpha)
