r"""Learning-rate schedules for stochastic weight averaging (Izmailov et al. 2018).

Each schedule is a :class:`torch.optim.lr_scheduler.LRScheduler` that sets an absolute learning
rate (not a factor of the optimizer's initial one) in every param group. They only touch
``optimizer.param_groups``, so they work with any optimizer, including :class:`flatmin.optim.SAM`
and WASAM, whose groups are shared with the base optimizer. Call ``scheduler.step()`` once per unit
(an iteration for :class:`CyclicSWALR`; an iteration or an epoch for the others, as you count
``total``). Averaging never changes the learning rate: these schedules and
:class:`~flatmin.optim.averaging.WeightAveraging` are independent.

Schedules, with ``i`` the 1-based index of the unit the learning rate is used for
(``i = last_epoch + 1``)::

    ConstantSWALR    α(i) = α
    CyclicSWALR      α(i) = (1 − t(i)) α1 + t(i) α2,   t(i) = (mod(i − 1, c) + 1) / c
    DecayHoldSWALR   s = (i − 1)/total:  α1 if s ≤ ½;  linear α1 → α2 for ½ < s ≤ 0.9;  α2 after

References:
    Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
    UAI 2018, arXiv:1803.05407 (Algorithm 1 and Section 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["ConstantSWALR", "CyclicSWALR", "DecayHoldSWALR"]


def _per_group(name: str, value: float | Sequence[float], n_groups: int) -> list[float]:
    values = list(value) if isinstance(value, Sequence) else [value] * n_groups
    if len(values) != n_groups:
        raise ValueError(f"Invalid {name}: {len(values)} values for {n_groups} param groups")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"Invalid {name}: {v!r} (expected a float)")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"Invalid {name}: {v} (expected a finite value >= 0)")
    return [float(v) for v in values]


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: {value!r} (expected an int)")
    if value < 1:
        raise ValueError(f"Invalid {name}: {value} (expected >= 1)")
    return value


class _AbsoluteLR(LRScheduler):
    """An LR scheduler whose value at each index is a closed form of that index."""

    def _lr(self, i: int, group: int) -> float:
        """Learning rate of param group ``group`` for the ``i``-th unit (1-based)."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Learning rate of each param group for the next unit."""
        i = self.last_epoch + 1
        return [self._lr(i, g) for g in range(len(self.optimizer.param_groups))]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


class ConstantSWALR(_AbsoluteLR):
    """A constant learning rate ``α`` (SWA with cycle length 1).

    Args:
        optimizer: Any optimizer (SAM included).
        lr: The learning rate, one for all groups or one per group.
        last_epoch: Index of the last unit done, ``-1`` to start fresh.

    References:
        Izmailov et al., arXiv:1803.05407, Algorithm 1 with ``c = 1``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = ConstantSWALR(opt, lr=0.05)
        >>> sched.get_last_lr()
        [0.05]
    """

    def __init__(
        self, optimizer: Optimizer, lr: float | Sequence[float], *, last_epoch: int = -1
    ) -> None:
        self.lrs = _per_group("lr", lr, len(optimizer.param_groups))
        super().__init__(optimizer, last_epoch)

    def _lr(self, i: int, group: int) -> float:
        return self.lrs[group]


class CyclicSWALR(_AbsoluteLR):
    r"""Izmailov et al.'s cyclic schedule: within each cycle of ``c`` iterations, α1 → α2 linearly.

    .. math::

        \alpha(i) = (1 - t(i))\,\alpha_1 + t(i)\,\alpha_2, \qquad
        t(i) = \frac{\operatorname{mod}(i - 1, c) + 1}{c},

    so the ``c``-th iteration of each cycle uses ``α2``: average after it
    (``WeightAveraging(..., every=c)`` counting iterations, with ``start`` a multiple of ``c``).
    ``c = 1`` is the constant schedule ``α2``.

    Args:
        optimizer: Any optimizer (SAM included).
        alpha1: Learning rate at the start of a cycle (one, or one per group).
        alpha2: Learning rate at the end of a cycle (one, or one per group).
        cycle: Cycle length ``c`` in iterations.
        last_epoch: Index of the last iteration done, ``-1`` to start fresh.

    References:
        Izmailov et al., arXiv:1803.05407, Algorithm 1 and eq. (2).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = CyclicSWALR(opt, alpha1=0.1, alpha2=0.01, cycle=4)
        >>> lrs = []
        >>> for _ in range(5):
        ...     lrs.append(round(sched.get_last_lr()[0], 4))
        ...     opt.step()
        ...     sched.step()
        >>> lrs
        [0.0775, 0.055, 0.0325, 0.01, 0.0775]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        alpha1: float | Sequence[float],
        alpha2: float | Sequence[float],
        cycle: int,
        last_epoch: int = -1,
    ) -> None:
        n = len(optimizer.param_groups)
        self.alpha1 = _per_group("alpha1", alpha1, n)
        self.alpha2 = _per_group("alpha2", alpha2, n)
        self.cycle = _positive_int("cycle", cycle)
        super().__init__(optimizer, last_epoch)

    def _lr(self, i: int, group: int) -> float:
        t = ((i - 1) % self.cycle + 1) / self.cycle
        return (1.0 - t) * self.alpha1[group] + t * self.alpha2[group]


class DecayHoldSWALR(_AbsoluteLR):
    r"""Izmailov et al.'s schedule: hold α1, decay linearly to α2, then hold α2.

    With ``s = (i − 1)/total`` the fraction of the budget done before the ``i``-th unit:

    .. math::

        \alpha(i) = \begin{cases}
            \alpha_1 & s \le h \\
            \alpha_1 - (\alpha_1 - \alpha_2)\,\frac{s - h}{e - h} & h < s \le e \\
            \alpha_2 & s > e
        \end{cases}

    with ``h = hold = 0.5`` and ``e = decay_end = 0.9`` as in the paper's code, where ``total`` is
    the number of units before averaging starts (the SWA start epoch); averaging then runs at the
    constant ``α2``.

    Args:
        optimizer: Any optimizer (SAM included).
        alpha1: Initial learning rate (one, or one per group).
        alpha2: Final (SWA) learning rate (one, or one per group).
        total: Budget in units (epochs or iterations, as you call ``step()``).
        hold: Fraction of ``total`` at ``α1``.
        decay_end: Fraction of ``total`` by which ``α2`` is reached.
        last_epoch: Index of the last unit done, ``-1`` to start fresh.

    Raises:
        ValueError: ``not 0 <= hold <= decay_end <= 1``, ``total < 1`` or a negative rate.

    References:
        Izmailov et al., arXiv:1803.05407, Section 4 (and the authors' ``train.py``).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = DecayHoldSWALR(opt, alpha1=0.1, alpha2=0.01, total=10)
        >>> lrs = []
        >>> for _ in range(12):
        ...     lrs.append(round(sched.get_last_lr()[0], 4))
        ...     opt.step()
        ...     sched.step()
        >>> lrs
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0775, 0.055, 0.0325, 0.01, 0.01, 0.01]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        alpha1: float | Sequence[float],
        alpha2: float | Sequence[float],
        total: int,
        hold: float = 0.5,
        decay_end: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        n = len(optimizer.param_groups)
        self.alpha1 = _per_group("alpha1", alpha1, n)
        self.alpha2 = _per_group("alpha2", alpha2, n)
        self.total = _positive_int("total", total)
        if not 0.0 <= hold <= decay_end <= 1.0:
            raise ValueError(
                f"Invalid hold/decay_end: {hold}/{decay_end} (expected 0 <= hold <= decay_end <= 1)"
            )
        self.hold = float(hold)
        self.decay_end = float(decay_end)
        super().__init__(optimizer, last_epoch)

    def _lr(self, i: int, group: int) -> float:
        s = (i - 1) / self.total
        a1, a2 = self.alpha1[group], self.alpha2[group]
        if s <= self.hold:
            return a1
        if s <= self.decay_end:
            return a1 - (a1 - a2) * (s - self.hold) / (self.decay_end - self.hold)
        return a2
