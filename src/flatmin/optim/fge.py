r"""Fast Geometric Ensembling (FGE, Garipov et al. 2018).

From a pre-trained solution, train with a short triangular cyclic learning rate and collect a
snapshot each time the rate reaches its minimum ``α2``; predict with the average of the members'
softmax outputs::

    for i = 1, 2, ...:                      # iterations
        α ← α(i);  w ← w − α ∇L_i(w)
        if mod(i, c) = c/2:  members.append(w)   # t(i) = 1/2: the minimum of the cycle
    p(y | x) = 1/K Σ_k softmax(f(x; w_k))

with the triangular schedule (``t(i) = (mod(i − 1, c) + 1)/c``, ``c`` even)::

    α(i) = (1 − 2t) α1 + 2t α2          if t ≤ 1/2
    α(i) = (2 − 2t) α2 + (2t − 1) α1    otherwise

Snapshots are detached copies of the model's named parameters and buffers (never a deep copy of
the module); predictions load each member into the model in turn and restore the training weights
bit-exactly afterwards.

References:
    Garipov et al., "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs",
    NeurIPS 2018, arXiv:1802.10026.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatmin.optim.averaging import unwrap_model
from flatmin.optim.bn import ForwardFn, call_model
from flatmin.optim.schedules import CyclicSWALR

__all__ = ["FGE", "FGECyclicLR"]


class FGECyclicLR(CyclicSWALR):
    r"""FGE's per-iteration triangular schedule between ``α1`` (peak) and ``α2`` (minimum).

    .. math::

        \alpha(i) = \begin{cases}
            (1 - 2t)\,\alpha_1 + 2t\,\alpha_2 & t(i) \le 1/2 \\
            (2 - 2t)\,\alpha_2 + (2t - 1)\,\alpha_1 & t(i) > 1/2
        \end{cases}, \qquad t(i) = \frac{\operatorname{mod}(i - 1, c) + 1}{c}.

    Call ``step()`` after each optimizer step. :attr:`at_minimum` tells whether the iteration just
    finished used ``α2`` (``mod(i, c) = c/2``): the moment to collect a snapshot.

    Args:
        optimizer: Any optimizer (SAM included).
        alpha1: Peak learning rate (one, or one per group).
        alpha2: Minimum learning rate (one, or one per group).
        cycle: Cycle length ``c`` in iterations (even, ``>= 2``).
        last_epoch: Index of the last iteration done, ``-1`` to start fresh.

    Raises:
        ValueError: ``cycle`` is odd or smaller than 2, or a rate is negative.

    References:
        Garipov et al., arXiv:1802.10026, Section 4 (eq. 2).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = FGECyclicLR(opt, alpha1=0.05, alpha2=0.0005, cycle=4)
        >>> round(sched.get_last_lr()[0], 5)
        0.02525
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
        # The same arguments as Izmailov's cyclic schedule; only the shape within a cycle differs.
        if isinstance(cycle, int) and not isinstance(cycle, bool) and (cycle < 2 or cycle % 2):
            raise ValueError(f"Invalid cycle: {cycle} (expected an even int >= 2)")
        super().__init__(
            optimizer, alpha1=alpha1, alpha2=alpha2, cycle=cycle, last_epoch=last_epoch
        )

    def _lr(self, i: int, group: int) -> float:
        t = ((i - 1) % self.cycle + 1) / self.cycle
        a1, a2 = self.alpha1[group], self.alpha2[group]
        if t <= 0.5:
            return (1.0 - 2.0 * t) * a1 + 2.0 * t * a2
        return (2.0 - 2.0 * t) * a2 + (2.0 * t - 1.0) * a1

    @property
    def at_minimum(self) -> bool:
        """Whether the last finished iteration (``i = last_epoch``) ran at ``α2``."""
        return self.last_epoch > 0 and self.last_epoch % self.cycle == self.cycle // 2


class FGE:
    """A snapshot ensemble collected at the minima of :class:`FGECyclicLR`.

    Typical use, after pre-training::

        fge = FGE(model, optimizer, alpha1=0.05, alpha2=0.0005, cycle=2 * len(loader))
        for x, y in batches:
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
            fge.step()                      # advance the schedule; snapshot at its minimum
        probs = fge.predict(x_test)         # mean of the members' softmax outputs

    Args:
        model: The trained model (a DDP / DataParallel wrapper is unwrapped).
        optimizer: Its optimizer, whose learning rate the schedule sets.
        alpha1: Peak learning rate.
        alpha2: Minimum learning rate (when snapshots are taken).
        cycle: Cycle length in iterations (even).
        device: Where snapshots are stored (e.g. ``"cpu"``); ``None``: next to the model.

    References:
        Garipov et al., "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs",
        NeurIPS 2018, arXiv:1802.10026.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> fge = FGE(model, opt, alpha1=0.1, alpha2=0.01, cycle=2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> for _ in range(4):
        ...     opt.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.step()
        ...     collected = fge.step()
        >>> len(fge), fge.predict(x).shape
        (2, torch.Size([8, 2]))
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        alpha1: float | Sequence[float],
        alpha2: float | Sequence[float],
        cycle: int,
        device: torch.device | str | None = None,
    ) -> None:
        self.module = unwrap_model(model)
        self.scheduler = FGECyclicLR(optimizer, alpha1=alpha1, alpha2=alpha2, cycle=cycle)
        self.device = None if device is None else torch.device(device)
        self.members: list[dict[str, Tensor]] = []

    def __len__(self) -> int:
        return len(self.members)

    def _tensors(self) -> dict[str, Tensor]:
        live: dict[str, Tensor] = dict(self.module.named_parameters())
        live.update(self.module.named_buffers())
        return live

    def step(self) -> bool:
        """Advance the schedule by one iteration; collect a snapshot at its minimum.

        Returns:
            ``True`` if a snapshot was collected.
        """
        self.scheduler.step()
        if self.scheduler.at_minimum:
            self.collect()
            return True
        return False

    @torch.no_grad()
    def collect(self) -> None:
        """Add the model's current weights and buffers to the ensemble."""
        self.members.append(
            {
                name: t.detach().to(self.device or t.device, copy=True)
                for name, t in self._tensors().items()
            }
        )

    @contextmanager
    def member(self, k: int) -> Iterator[nn.Module]:
        """Load member ``k`` into the model; restore the training weights bit-exactly on exit.

        Raises:
            IndexError: No member ``k``.
        """
        snapshot = self.members[k]
        live = self._tensors()
        backup = {name: t.detach().clone() for name, t in live.items()}
        try:
            with torch.no_grad():
                for name, t in snapshot.items():
                    live[name].copy_(t)
            yield self.module
        finally:
            with torch.no_grad():
                for name, saved in backup.items():
                    live[name].copy_(saved)

    @torch.no_grad()
    def predict(
        self,
        batch: Any,
        *,
        forward_fn: ForwardFn | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Ensemble prediction: the mean over members of ``softmax(logits, dim=-1)``.

        The model runs in whatever train/eval mode it is in (call ``model.eval()`` first).
        ``batch`` is dispatched as in :meth:`WeightAveraging.update_bn`: ``forward_fn(model,
        batch)`` if given, else a tensor, the first element of a tuple/list, or ``model(**dict)``.

        Raises:
            RuntimeError: The ensemble is empty.
        """
        if not self.members:
            raise RuntimeError("FGE ensemble is empty: no snapshot collected yet")
        total: Tensor | None = None
        for k in range(len(self.members)):
            with self.member(k) as model:
                probs = torch.softmax(call_model(model, batch, forward_fn, device), dim=-1)
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(self.members)

    def state_dict(self) -> dict[str, Any]:
        """Members and schedule progress."""
        return {"members": list(self.members), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`.

        Raises:
            ValueError: Keys are not those of :meth:`state_dict`, or a member's names differ.
        """
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"members", "scheduler"}:
            raise ValueError("Invalid FGE state_dict (expected keys 'members' and 'scheduler')")
        names = set(self._tensors())
        for member in state_dict["members"]:
            if set(member) != names:
                raise ValueError(
                    f"Invalid FGE member with names {sorted(set(member) ^ names)} differing "
                    "from the model's"
                )
        self.members = [
            {k: v.detach().to(self.device or v.device, copy=True) for k, v in m.items()}
            for m in state_dict["members"]
        ]
        self.scheduler.load_state_dict(state_dict["scheduler"])

    def __repr__(self) -> str:
        return f"FGE(members={len(self.members)}, cycle={self.scheduler.cycle})"
