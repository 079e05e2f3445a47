r"""Momentum-SAM: perturb along the momentum, one gradient per step (Becker et al. 2024).

SAM spends a second forward/backward pass on the ascent direction. Momentum-SAM takes it from the
base optimizer's momentum ``m`` (SGD's ``momentum_buffer``, Adam's ``exp_avg``; the base step
moves ``w`` along ``−m``): it perturbs along the negative, normalised momentum ``−m/‖m‖``, with the
sign of the official code::

    w̃ = w − ρ m / ‖m‖          # the perturbed point (m = 0 on the first step: w̃ = w)
    g = ∇L(w̃)                  # the only forward/backward pass
    w ← base_step(w, g)         # from the unperturbed w (the perturbation is undone first)

Between steps the weights are always the unperturbed ``w`` (the official code keeps them at
``w̃`` and offers ``move_back_from_momentumAscent``): evaluation, checkpoints and weight
averaging after ``step()`` see ``w``; inside a step driven by hand, ``opt.unperturbed()`` does.
The pass at ``w̃`` is the only one, so BatchNorm statistics are updated there.

References:
    Becker et al., "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead",
    arXiv:2401.12033 (2024), official code: github.com/MarlonBecker/MSAM.
"""

from __future__ import annotations

from typing import Any

from flatmin.optim.rules import PerturbGroup
from flatmin.optim.sam import SAM, Base, Params

__all__ = ["MomentumSAM"]


class MomentumSAM(SAM):
    r"""Momentum-SAM: SAM's perturbation from the momentum buffer, with a single pass per step.

    .. math::

        \tilde w = w - \rho\, \frac{m}{\|m\|}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\ \nabla L(\tilde w)\big),

    with ``m`` the base optimizer's momentum (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``)
    and the norm over all param groups. Any rule applies to ``−m`` (ℓ∞, ASAM, ...).
    ``step(closure)`` calls the closure **once**, at ``w̃``, and returns its value there; the
    weights are ``w`` again when it returns. By hand: ``first_step()`` (perturb from ``m``), one
    forward/backward, ``second_step()``. ``ρ = 0`` is the base optimizer.

    Args:
        params: As for :class:`~flatmin.optim.SAM`.
        base_optimizer: An optimizer with momentum: SGD with ``momentum > 0`` or the Adam family.
        rho: Radius (the paper uses larger values than SAM: 0.3 with SGD, ~1 with AdamW).
        **kwargs: Everything else :class:`~flatmin.optim.SAM` accepts.

    Raises:
        ValueError: The base optimizer keeps no momentum (and SAM's own checks).

    References:
        Becker et al., "Momentum-SAM: Sharpness Aware Minimization without Computational
        Overhead", arXiv:2401.12033.

    Example:
        >>> import torch, flatmin
        >>> model, x, y = torch.nn.Linear(3, 1), torch.randn(8, 3), torch.randn(8, 1)
        >>> opt = flatmin.MomentumSAM(model.parameters(), torch.optim.SGD, 0.3, lr=0.1,
        ...                           momentum=0.9)
        >>> closure = flatmin.optim.per_sample_closure(opt, lambda i: (model(x) - y).square()[:, 0])
        >>> per_sample = [opt.step(closure) for _ in range(3)]  # one pass each, at w − ρ m/‖m‖
        >>> opt.perturbed  # the weights are w between steps
        False
    """

    _lead_pass = False
    # The "gradients" of the ascent are the momentum buffers: never scratch space.
    _direction_is_scratch = False

    def __init__(self, params: Params, base_optimizer: Base, rho: float = 0.3, **kw: Any) -> None:
        super().__init__(params, base_optimizer, rho, **kw)
        for i, group in enumerate(self.param_groups):
            if not (group.get("momentum", 0) > 0 or "betas" in group):
                raise ValueError(
                    f"Invalid base optimizer for MomentumSAM: param group {i} keeps no momentum "
                    f"(momentum={group.get('momentum')!r}; use SGD with momentum > 0 or Adam/AdamW)"
                )

    def _ascent_groups(self) -> list[PerturbGroup]:
        state = self.base_optimizer.state
        groups = []
        for group in self.param_groups:
            key = "momentum_buffer" if "momentum" in group else "exp_avg"
            params = [w for w in group["params"] if state.get(w, {}).get(key) is not None]
            bufs = [state[w][key] for w in params]
            # ε̂ is odd in its direction: the rule applied to m with radius −ρ is ε̂(−m).
            rho, p, adaptive, eta = self._ball(group)
            groups.append(PerturbGroup(params, bufs, -rho, p, adaptive, eta))
        return groups
