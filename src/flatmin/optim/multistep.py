r"""Multi-step ascent: SAM's inner maximisation with ``n`` ascent steps, as optax's SAM does.

optax's ``contrib.sam`` with ``adv_optimizer = chain(normalize(), sgd(ρ))`` and
``sync_period = n + 1`` (opaque mode) takes ``n`` normalised ascent steps from ``w``, each at the
gradient of the point reached so far, and steps the outer optimizer with the last gradient::

    w_0 = w;  g_0 = ∇L(w)
    for i in 1..n:  w_i = w_{i−1} + ε̂(g_{i−1});  g_i = ∇L(w_i)    # ε̂ = ρ g/‖g‖ for ℓ2
    w ← base_step(w, g_n)

Each step moves by the rule's ``ε̂`` (any rule: ℓ∞, ASAM with ``T`` at the current point, ...),
so the total displacement is up to ``n ρ``; set ``rho`` to ``ρ/n`` to stay in the ``ρ``-ball.
``n = 1`` is SAM.

References:
    Foret et al., arXiv:2010.01412 (SAM). DeepMind, optax ``optax/contrib/_sam.py``
    (``sync_period``). Andriushchenko & Flammarion, "Towards Understanding Sharpness-Aware
    Minimization", ICML 2022, arXiv:2206.06232 (multi-step ascent).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from flatmin.optim._checks import check_int
from flatmin.optim.sam import SAM

__all__ = ["MultiStepSAM"]


class MultiStepSAM(SAM):
    r"""SAM with ``steps`` ascent steps per update (optax's ``sync_period = steps + 1``).

    .. math::

        w_0 = w, \quad w_i = w_{i-1} + \hat\epsilon\big(\nabla L(w_{i-1})\big)
        \ (i = 1..n), \qquad w \leftarrow \mathrm{base\_step}\big(w, \nabla L(w_n)\big).

    ``step(closure)`` calls the closure ``steps + 1`` times (BatchNorm statistics frozen and, with
    ``same_rng``, the same random numbers in every pass after the first). By hand: one
    ``first_step()`` and one forward/backward per ascent step, then ``second_step()``.

    Args:
        params: As for :class:`~flatmin.optim.SAM`.
        base_optimizer: As for :class:`~flatmin.optim.SAM`.
        rho: Radius of each ascent step (per group).
        steps: Number ``n >= 1`` of ascent steps.
        **kwargs: Everything else :class:`~flatmin.optim.SAM` accepts.

    Raises:
        TypeError, ValueError: ``steps`` is not an int ``>= 1`` (and SAM's own checks).

    References:
        optax ``contrib.sam`` (``sync_period``); Andriushchenko & Flammarion, ICML 2022,
        arXiv:2206.06232.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = flatmin.MultiStepSAM(model.parameters(), torch.optim.SGD, rho=0.025, steps=2,
        ...                            lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # three passes
    """

    _hyper = (*SAM._hyper, "steps")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        steps: int = 2,
        **kwargs: Any,
    ) -> None:
        self.steps = check_int("steps", steps, low=1)
        super().__init__(params, base_optimizer, rho, **kwargs)
        self._ascent_steps = self.steps

    def __repr__(self) -> str:
        base = self.base_optimizer.__class__.__name__
        return f"MultiStepSAM(base_optimizer={base}, steps={self.steps})"
