r"""Schedules for SAM's radius ``rho``, which lives in the param groups like the learning rate.

:class:`ProportionalRho` makes ``rho`` follow the learning rate, as GSAM does (Zhuang et al. 2022):
with ``lr_t`` the group's current learning rate,

.. math::

    \rho_t = \rho_{\min} + (\rho_{\max} - \rho_{\min})\,
             \frac{lr_t - lr_{\min}}{lr_{\max} - lr_{\min}},

clamped to ``[rho_min, rho_max]``. During a warm-up the radius grows with the learning rate; under
a cosine or linear decay it shrinks with it. Any LR scheduler may drive the learning rate; call
``rho_scheduler.step()`` right after ``lr_scheduler.step()``.

References:
    Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022,
    arXiv:2203.08065.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer

from flatmin.optim.schedules import _per_group

__all__ = ["ProportionalRho"]


class ProportionalRho:
    """Set each param group's ``rho`` proportionally to its learning rate (GSAM's schedule).

    Args:
        optimizer: A SAM optimizer (anything with ``param_groups`` holding ``lr`` and ``rho``).
            Where the base optimizer has a ``rho`` of its own (Adadelta), the schedule drives
            SAM's, ``sam_rho`` (:meth:`flatmin.SAM.group_key`), never the base's.
        rho_max: ``rho`` at ``lr = lr_max``; defaults to each group's current ``rho``.
        rho_min: ``rho`` at ``lr = lr_min``.
        lr_max: The peak learning rate; defaults to each group's ``initial_lr`` (set by LR
            schedulers) or, without one, its current ``lr``.
        lr_min: The final learning rate of the schedule.

    Each of ``rho_max``, ``rho_min``, ``lr_max``, ``lr_min`` is a float or one per group. The
    constructor applies the rule once, for the current learning rate.

    Raises:
        TypeError: A value is not a float.
        ValueError: A value is negative or non-finite, or ``lr_max == lr_min`` in some group.

    References:
        Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022,
        arXiv:2203.08065.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = flatmin.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
        >>> lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        >>> rho_sched = ProportionalRho(opt, rho_min=0.01)
        >>> for _ in range(10):
        ...     pass  # opt.step(closure)
        ...     lr_sched.step()
        ...     rho_sched.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        rho_max: float | Sequence[float] | None = None,
        rho_min: float | Sequence[float] = 0.0,
        lr_max: float | Sequence[float] | None = None,
        lr_min: float | Sequence[float] = 0.0,
    ) -> None:
        groups = optimizer.param_groups
        n = len(groups)
        group_key = getattr(optimizer, "group_key", None)
        self._key = "rho" if group_key is None else group_key("rho")
        key = self._key
        missing = [i for i, g in enumerate(groups) if key not in g or "lr" not in g]
        if missing:
            raise TypeError(
                f"Invalid optimizer: param groups {missing} have no {key!r} and 'lr' "
                "(expected a flatmin.SAM optimizer)"
            )
        self.optimizer = optimizer
        self.rho_max = _per_group(
            "rho_max", [g[key] for g in groups] if rho_max is None else rho_max, n
        )
        self.rho_min = _per_group("rho_min", rho_min, n)
        default_lr = [g.get("initial_lr", g["lr"]) for g in groups]
        self.lr_max = _per_group("lr_max", default_lr if lr_max is None else lr_max, n)
        self.lr_min = _per_group("lr_min", lr_min, n)
        for i, (hi, lo) in enumerate(zip(self.lr_max, self.lr_min)):
            if hi == lo:
                raise ValueError(f"Invalid lr_max: {hi} equals lr_min in group {i}")
        self._last_rho: list[float] = []
        self.step()

    def rho_at(self, lr: float, group: int = 0) -> float:
        """Return the radius the rule gives a learning rate ``lr`` in param group ``group``."""
        lo, hi = self.rho_min[group], self.rho_max[group]
        t = (lr - self.lr_min[group]) / (self.lr_max[group] - self.lr_min[group])
        return min(max(lo + (hi - lo) * t, min(lo, hi)), max(lo, hi))

    def step(self) -> None:
        """Set every group's ``rho`` from its current learning rate."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.rho_max):
            raise RuntimeError(
                f"The optimizer has {len(groups)} param groups, the rho schedule was built for "
                f"{len(self.rho_max)}: build a new ProportionalRho after add_param_group()"
            )
        for i, group in enumerate(groups):
            group[self._key] = self.rho_at(float(group["lr"]), i)
        self._last_rho = [g[self._key] for g in groups]

    def get_last_rho(self) -> list[float]:
        """Return the radius set in each group by the last :meth:`step`."""
        return list(self._last_rho)

    def state_dict(self) -> dict[str, Any]:
        """Return the schedule's settings (the radii themselves live in the optimizer's groups)."""
        return {
            "rho_max": list(self.rho_max),
            "rho_min": list(self.rho_min),
            "lr_max": list(self.lr_max),
            "lr_min": list(self.lr_min),
            "last_rho": list(self._last_rho),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: every value is checked first, then all are set.

        Raises:
            ValueError, TypeError: A missing key or an invalid value (nothing is changed).
        """
        keys = ("rho_max", "rho_min", "lr_max", "lr_min", "last_rho")
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ValueError(f"Invalid ProportionalRho state_dict: missing {missing}")
        n = len(self.optimizer.param_groups)
        values = [_per_group(k, state_dict[k], n) for k in keys[:4]]
        last = state_dict["last_rho"]
        last_rho = [] if not last else _per_group("last_rho", last, n)
        self.rho_max, self.rho_min, self.lr_max, self.lr_min = values
        self._last_rho = last_rho
