r"""GCSAM: SAM with gradient centralization (Hassan et al. 2025).

Gradient centralization (Yong et al. 2020) removes from the gradient of every weight with two or
more dimensions its mean over all dimensions but the first (per output channel / row)::

    Φ(g) = g − mean_{dims ≥ 1}(g)      (tensors with ndim ≥ 2; vectors such as biases unchanged)

GCSAM, as Hassan et al. describe it, centralizes the gradient that defines the ascent and the
gradient at the perturbed point that the descent uses::

    ε̂ = ρ Φ(g) / ‖Φ(g)‖;   w ← base_step(w, Φ(∇L(w + ε̂)))

(``descent=False`` centralizes the ascent only, which is pytorch-optimizer's ``SAM(use_gc=True)``
up to its normalising by the norm of the uncentralized gradient.)

References:
    Hassan et al., "GCSAM: Gradient Centralized Sharpness Aware Minimization", arXiv:2501.11584
    (2025). Yong et al., "Gradient Centralization: A New Optimization Technique for Deep Neural
    Networks", ECCV 2020, arXiv:2004.01461.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from flatmin.optim._checks import GroupCheck, check_bool
from flatmin.optim.sam import SAM

__all__ = ["GCSAM", "centralize_"]


@torch.no_grad()
def centralize_(tensors: Iterable[Tensor | None]) -> None:
    """Gradient centralization in place: subtract the mean over all dims but the first (ndim ≥ 2).

    Example:
        >>> g = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
        >>> centralize_([g])
        >>> g
        tensor([[-1.,  1.],
                [ 0.,  0.]])
    """
    for g in tensors:
        if g is not None and g.dim() > 1:
            g.sub_(g.mean(dim=tuple(range(1, g.dim())), keepdim=True))


class GCSAM(SAM):
    r"""SAM with gradient centralization of the ascent and (by default) the descent gradient.

    .. math::

        \hat\epsilon = \rho\, \frac{\Phi(g)}{\|\Phi(g)\|}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\ \Phi(\nabla L(w + \hat\epsilon))\big),

    with ``Φ`` the gradient centralization of Yong et al. (mean over all dims but the first
    removed, for tensors with two or more dims). The centralization is done in place on
    ``.grad``. On a model whose parameters are all vectors it is :class:`~flatmin.optim.SAM`.

    Args:
        descent: Also centralize the gradient at ``w + ε̂`` (the descent), as GCSAM does
            (default). Every other argument is :class:`~flatmin.optim.SAM`'s.

    Raises:
        TypeError: ``descent`` is not a bool (and SAM's own checks).

    References:
        Hassan et al., "GCSAM: Gradient Centralized Sharpness Aware Minimization",
        arXiv:2501.11584. Yong et al., "Gradient Centralization", ECCV 2020, arXiv:2004.01461.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = flatmin.GCSAM(model.parameters(), torch.optim.SGD, 0.05, lr=0.1)
        >>> opt.descent
        True
    """

    descent: bool
    _options: ClassVar[dict[str, tuple[Any, GroupCheck]]] = {"descent": (True, check_bool)}
    # The ascent is along the centralized gradient Φ(g), not g (second_order_step refuses it).
    _ascends_along_grad = False

    def _grads(self) -> list[Tensor | None]:
        return [w.grad for group in self.param_groups for w in group["params"]]

    def _on_first_pass(self) -> None:
        centralize_(self._grads())

    def _combine_(self) -> None:
        if self.descent:
            centralize_(self._grads())
