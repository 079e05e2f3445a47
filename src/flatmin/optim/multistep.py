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

from typing import Any, ClassVar

from flatmin.optim._checks import GroupCheck, check_positive_int
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
        steps: Number ``n >= 1`` of ascent steps (default 2); ``rho`` is the radius of each.
            Every other argument is :class:`~flatmin.optim.SAM`'s.

    Raises:
        TypeError, ValueError: ``steps`` is not an int ``>= 1`` (and SAM's own checks).

    References:
        optax ``contrib.sam`` (``sync_period``); Andriushchenko & Flammarion, ICML 2022,
        arXiv:2206.06232.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = flatmin.MultiStepSAM(model.parameters(), torch.optim.SGD, 0.025, steps=2, lr=0.1)
        >>> opt.steps  # step(closure) calls the closure steps + 1 = 3 times
        2
    """

    steps: int
    _options: ClassVar[dict[str, tuple[Any, GroupCheck]]] = {"steps": (2, check_positive_int)}

    @property
    def _ascent_steps(self) -> int:  # type: ignore[override]
        return self.steps

    def __repr__(self) -> str:
        base = self.base_optimizer.__class__.__name__
        return f"MultiStepSAM(base_optimizer={base}, steps={self.steps})"
