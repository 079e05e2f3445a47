r"""FriendlySAM (F-SAM): perturb along the batch-specific part of the gradient (Li et al. 2024).

The mini-batch gradient ``g`` is a full-gradient component (estimated by an exponential moving
average ``m`` of past gradients) plus a batch-specific component. F-SAM finds the full-gradient
component harmful to generalisation and ascends along ``g − σ m`` only, as the official code
does::

    if m is unset:  m = g,  d = g                 # first step: plain SAM
    else:           d = g − σ m;  m ← λ m + (1 − λ) g      # m sees the plain gradient
    ε̂ = ρ d / ‖d‖;  w ← base_step(w, ∇L(w + ε̂))

``σ = 0`` is SAM.

References:
    Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024, arXiv:2403.12350
    (official code: github.com/nblt/F-SAM).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from flatmin.optim._checks import GroupCheck, check_nonneg, check_real
from flatmin.optim._vec import foreach
from flatmin.optim.rules import PerturbGroup
from flatmin.optim.sam import SAM

__all__ = ["FriendlySAM"]

_M_KEY = "fsam_momentum"


def _check_lmbda(name: str, value: Any) -> None:
    check_real(name, value, low=0.0, high=1.0)


class FriendlySAM(SAM):
    r"""F-SAM: SAM whose ascent direction drops the full-gradient component ``σ m``.

    .. math::

        d = g - \sigma m, \quad m \leftarrow \lambda m + (1 - \lambda) g, \quad
        \hat\epsilon = \rho\, d / \|d\|, \quad
        w \leftarrow \mathrm{base\_step}\big(w, \nabla L(w + \hat\epsilon)\big),

    with ``m`` the EMA of the plain first-pass gradients (initialised with the first one, when
    ``d = g``). Any rule applies to ``d`` (ℓp, ASAM, Fisher). ``sigma`` and ``lmbda`` live in the
    param groups; ``σ = 0`` is :class:`~flatmin.optim.SAM` exactly. The EMA is one
    parameter-sized buffer per tensor (``self.state[p]["fsam_momentum"]``, checkpointed). An
    abandoned step (restore after an error) has already folded its ``g`` into ``m``.

    Args:
        sigma: Weight σ ``>= 0`` of the removed full-gradient component (the paper uses 1).
        lmbda: EMA decay λ in ``[0, 1]`` (official default 0.9). Every other argument is
            :class:`~flatmin.optim.SAM`'s.

    Raises:
        TypeError, ValueError: ``sigma`` negative or ``lmbda`` outside ``[0, 1]`` (and SAM's own
            checks).

    References:
        Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024, arXiv:2403.12350.

    Example:
        >>> import torch, flatmin
        >>> model, x, y = torch.nn.Linear(3, 1), torch.randn(8, 3), torch.randn(8, 1)
        >>> opt = flatmin.FriendlySAM(model.parameters(), torch.optim.SGD, 0.05, sigma=1.0, lr=0.1)
        >>> closure = flatmin.optim.per_sample_closure(opt, lambda i: (model(x) - y).square()[:, 0])
        >>> per_sample = opt.step(closure)
        >>> "fsam_momentum" in opt.state[model.weight]  # the EMA of the plain gradients
        True
    """

    _group_defaults: ClassVar[dict[str, Any]] = {"sigma": 1.0, "lmbda": 0.9}
    _group_checks: ClassVar[dict[str, GroupCheck]] = {
        **SAM._group_checks,
        "sigma": check_nonneg,
        "lmbda": _check_lmbda,
    }
    # The ascent is along g − σ m, not g (second_order_step refuses it).
    _ascends_along_grad = False

    @torch.no_grad()
    def _ascent_groups(self) -> list[PerturbGroup]:
        groups = super()._ascent_groups()
        for group, pg in zip(self.param_groups, groups):
            directions = list(pg.grads)
            ready = []
            for i, (w, g) in enumerate(zip(pg.params, pg.grads)):
                if _M_KEY in self.state.get(w, {}):
                    ready.append(i)
                else:  # first gradient: m = g, and the direction is g itself
                    self.state[w][_M_KEY] = g.detach().clone()
            if ready:
                grads = [pg.grads[i] for i in ready]
                ms = [self.state[pg.params[i]][_M_KEY] for i in ready]
                # d = g − σ m with the old m; then m ← λ m + (1 − λ) g (the plain gradient).
                d = foreach(torch._foreach_sub, grads, ms, alpha=self._hp(group, "sigma"))
                foreach(torch._foreach_lerp_, ms, grads, 1.0 - self._hp(group, "lmbda"))
                for i, di in zip(ready, d):
                    directions[i] = di
            pg.grads = directions
        return groups
