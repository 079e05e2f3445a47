r"""WSAM: weighted sharpness as a regulariser (Yue et al. 2023).

SAM's objective is ``L(w + ε̂) = L(w) + S(w)`` with the sharpness ``S(w) = L(w + ε̂) − L(w)``.
WSAM weights the sharpness instead, with ``γ ∈ [0, 1)``::

    L_WSAM(w) = L(w) + γ/(1 − γ) · S(w)

so ``γ = ½`` is SAM's objective. With ``g = ∇L(w)``, ``g_s = ∇L(w + ε̂)`` and ``a = γ/(1 − γ)``
its gradient is ``g + a (g_s − g)``. Two ways to apply it (the paper's Algorithm 1 decouples)::

    coupled:    w ← base_step(w, a g_s + (1 − a) g)
    decoupled:  w ← base_step(w, g) − lr · a · (g_s − g)      # the sharpness step bypasses the
                                                              # base optimizer (as weight decay
                                                              # does in AdamW)

References:
    Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization
    Term", KDD 2023, arXiv:2305.15817.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from flatmin.optim._checks import GroupCheck, check_bool, check_real
from flatmin.optim._vec import copy_, foreach
from flatmin.optim.sam import SAM

__all__ = ["WSAM"]


def _check_gamma(name: str, value: Any) -> None:
    check_real(name, value, low=0.0, high=1.0, high_open=True)


class WSAM(SAM):
    r"""Weighted SAM: the sharpness enters the objective with weight ``γ/(1 − γ)``.

    .. math::

        a = \frac{\gamma}{1-\gamma}, \qquad
        w \leftarrow \begin{cases}
          \mathrm{base\_step}(w, g) - \mathrm{lr}\, a\,(g_s - g) & \text{decouple} \\
          \mathrm{base\_step}\big(w, a\, g_s + (1-a)\, g\big) & \text{otherwise,}
        \end{cases}

    with ``g = ∇L(w)`` and ``g_s = ∇L(w + ε̂)``; ``lr`` is the group's current learning rate.
    ``gamma`` lives in the param groups (per group, schedulable). ``γ = ½`` with
    ``decouple=False`` is :class:`~flatmin.optim.SAM` exactly. Costs one parameter-sized buffer
    (``g`` between the passes) and, decoupled, one temporary for ``g_s − g``.

    Args:
        gamma: Sharpness weight ``γ ∈ [0, 1)`` (the paper uses 0.8–0.95; default 0.9).
        decouple: Apply the sharpness term outside the base optimizer (the paper's default).
            Every other argument is :class:`~flatmin.optim.SAM`'s.

    Raises:
        TypeError, ValueError: ``gamma`` outside ``[0, 1)``, ``decouple`` not a bool (and SAM's
            own checks).

    References:
        Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
        Regularization Term", KDD 2023, arXiv:2305.15817.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = flatmin.WSAM(model.parameters(), torch.optim.SGD, 0.05, gamma=0.9, lr=0.1)
        >>> opt.param_groups[0]["gamma"], opt.decouple
        (0.9, True)
    """

    decouple: bool
    _options: ClassVar[dict[str, tuple[Any, GroupCheck]]] = {"decouple": (True, check_bool)}
    _group_defaults: ClassVar[dict[str, Any]] = {"gamma": 0.9}
    _group_checks: ClassVar[dict[str, GroupCheck]] = {**SAM._group_checks, "gamma": _check_gamma}
    # The decoupled sharpness step waiting for the base step: (group, params, g_s − g, a).
    _sharpness: Sequence[tuple[dict[str, Any], list[Tensor], list[Tensor], float]] = ()

    def _on_first_pass(self) -> None:
        self._keep_first_grads()

    @torch.no_grad()
    def _combine_(self) -> None:
        pending = []
        for group, params, kept, grads in self._kept_by_group():
            gamma = self._hp(group, "gamma")
            a = gamma / (1.0 - gamma)
            if not self.decouple:
                # a g_s + (1 − a) g  ==  g_s + (1 − a)(g − g_s)
                foreach(torch._foreach_lerp_, grads, kept, 1.0 - a)
                continue
            pending.append((group, params, list(foreach(torch._foreach_sub, grads, kept)), a))
            copy_(grads, kept)
        self._sharpness = pending

    @torch.no_grad()
    def _after_base_step(self) -> None:
        for group, params, sharpness, a in self._sharpness:
            foreach(torch._foreach_add_, params, sharpness, alpha=-group["lr"] * a)
        self._sharpness = ()

    def __repr__(self) -> str:
        base = self.base_optimizer.__class__.__name__
        return f"WSAM(base_optimizer={base}, decouple={self.decouple})"
