r"""ESAM: SAM with stochastic weight perturbation and sharpness-sensitive data selection.

Algorithm (Du et al. 2022, Alg. 1), for one mini-batch ``B`` of ``n`` samples::

    ℓ_i = loss of sample i at w;  g = ∇ mean_i ℓ_i           # first pass (forward + backward)
    ε̂   = ρ g / ‖g‖                                           # SAM's perturbation, norm over all
    SWP: each parameter tensor is drawn with probability β; the drawn ones move by ε̂ / β,
         the others stay at w and keep g (no weight gradient for them in the second pass)
    SDS: ℓ_i⁺ = loss of sample i at w + ε̂ (forward only, no graph)
         B⁺  = the ⌈γ n⌉ samples with the largest ℓ_i⁺ − ℓ_i
    g⁺  = ∇ mean_{i ∈ B⁺} ℓ_i at w + ε̂                       # second pass on B⁺ only
    w   ← base_step(w, g⁺ for drawn tensors, g for the others)

The second pass therefore costs a forward over the batch without a graph plus a forward/backward
over ``γ n`` samples, and skips the weight gradients of the undrawn tensors. ``β = γ = 1`` is SAM.

Design notes. The mask is drawn per parameter *tensor* (as the authors' code does with
``requires_grad``; a per-element mask saves no backward work), from an explicit CPU
:class:`torch.Generator`, so drawing it never syncs a GPU. Undrawn tensors step with their
first-pass gradient (the authors' code leaves them a zero gradient, which only their momentum and
weight decay move). Turning ``requires_grad`` off for the undrawn tensors during the second pass
does not mix with ``DistributedDataParallel``; use ``beta=1`` there.

References:
    Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural Networks",
    ICLR 2022, arXiv:2110.03141.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.optim._perturb import PerturbGroup
from flatmin.optim.bn import frozen_bn_stats
from flatmin.optim.sam import SAM

__all__ = ["ESAM", "PerSampleLoss"]

PerSampleLoss = Callable[[Tensor | None], Tensor]
"""``loss_fn(index) -> losses``: per-sample losses, shape ``(n,)``, of the whole batch when
``index`` is ``None``, else of the samples ``index`` (a 1-D ``LongTensor``) only."""

_ESAM_KEY = "esam"


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r} (expected a float in (0, 1])")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"Invalid {name}: {value} (expected a value in (0, 1])")
    return float(value)


class ESAM(SAM):
    r"""Efficient SAM: a random subset of tensors perturbed, the second pass on the sharpest data.

    Update rule (see the module docstring for the full algorithm): with ``m_j ~ Bernoulli(β)``
    per parameter tensor ``j`` and ``ε̂`` SAM's perturbation over all tensors,

    .. math::

        w_j \leftarrow \mathrm{base\_step}\Big(w_j,\ m_j\, \nabla_j L_{B^+}\big(w + m \odot
        \hat\epsilon / \beta\big) + (1 - m_j)\, \nabla_j L_B(w)\Big),

    where ``B⁺`` holds the ``⌈γ n⌉`` samples whose loss rises most from ``w`` to the perturbed
    point. ``β = γ = 1`` gives :class:`~flatmin.optim.SAM` exactly.

    ESAM needs per-sample losses, so :meth:`step` takes a ``loss_fn(index)`` instead of a
    closure: it returns the per-sample losses (shape ``(n,)``, ``reduction="none"``) of the whole
    batch for ``index=None`` and of the samples ``index`` otherwise. ESAM zeroes the gradients,
    averages and calls ``backward()`` itself. ``first_step``/``second_step`` by hand give SWP only.

    Args:
        params: As for :class:`~flatmin.optim.SAM`.
        base_optimizer: As for :class:`~flatmin.optim.SAM`.
        beta: Probability that a tensor is perturbed (SWP); the paper uses 0.6.
        gamma: Fraction of the batch used by the second pass (SDS); the paper uses 0.5.
        generator: A CPU generator for the SWP draws (default: a new one seeded with 0). Its
            state is saved in :meth:`state_dict`.
        **kwargs: Everything else :class:`~flatmin.optim.SAM` accepts (``rho``, ``lr``, ...).

    Raises:
        TypeError: ``beta``/``gamma`` not floats, ``generator`` not a CPU ``torch.Generator``.
        ValueError: ``beta`` or ``gamma`` outside ``(0, 1]``.

    References:
        Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural
        Networks", ICLR 2022, arXiv:2110.03141.

    Example:
        >>> import torch
        >>> from flatmin.optim.esam import ESAM
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.6, gamma=0.5, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> def loss_fn(index=None):
        ...     xb, yb = (x, y) if index is None else (x[index], y[index])
        ...     return torch.nn.functional.cross_entropy(model(xb), yb, reduction="none")
        >>> loss = opt.step(loss_fn, model=model)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        beta: float = 0.6,
        gamma: float = 0.5,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        self.beta = _check_fraction("beta", beta)
        self.gamma = _check_fraction("gamma", gamma)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"Invalid generator: {generator!r} (expected a CPU torch.Generator)")
        self.generator = generator
        self._drawn: list[Tensor] = []
        self._undrawn: list[Tensor] = []
        super().__init__(params, base_optimizer, **kwargs)

    def _perturb_groups(self) -> list[PerturbGroup]:
        # SWP: SAM's groups (the norm runs over all of them), each tensor moved with probability
        # β by ε̂/β. Undrawn tensors are still backed up and restored (a copy, exact).
        groups = super()._perturb_groups()
        n = sum(len(g.params) for g in groups)
        draws = (torch.rand(n, generator=self.generator) < self.beta).tolist() if n else []
        drawn: list[Tensor] = []
        undrawn: list[Tensor] = []
        start = 0
        for group in groups:
            group.mask = draws[start : start + len(group.params)]
            group.rho = group.rho / self.beta
            for w, m in zip(group.params, group.mask):
                (drawn if m else undrawn).append(w)
            start += len(group.params)
        self._drawn, self._undrawn = drawn, undrawn
        return groups

    def step(  # type: ignore[override]
        self, loss_fn: PerSampleLoss | None = None, *, model: torch.nn.Module | None = None
    ) -> Tensor | None:
        """One ESAM step: a full pass, SWP, SDS, and a second pass on the selected samples.

        Args:
            loss_fn: Per-sample losses for ``index=None`` (whole batch) or a 1-D index tensor
                (see :data:`PerSampleLoss`). Without it, finishes a manual ``first_step``.
            model: If given, BatchNorm running statistics stay as the first pass left them
                through the forward passes at the perturbed point.

        Returns:
            The mean loss at ``w`` (detached).

        Raises:
            ValueError: ``loss_fn`` does not return a 1-D tensor of per-sample losses.
        """
        if loss_fn is None:
            return super().step(None)
        with torch.enable_grad():
            self.zero_grad()
            losses = loss_fn(None)
            if not isinstance(losses, Tensor) or losses.dim() != 1:
                shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)
                raise ValueError(
                    f"Invalid per-sample losses of shape {shape} (expected (n,); use "
                    "reduction='none')"
                )
            loss = losses.mean()
            loss.backward()
        self.first_step()
        if not self._drawn:  # nothing perturbed: a plain step with g, no second pass
            self.second_step()
            return loss.detach()
        frozen = [w for w in self._undrawn if w.requires_grad]
        try:
            index = None
            n = losses.shape[0]
            keep = max(1, math.ceil(self.gamma * n))
            if keep < n:
                with torch.no_grad(), frozen_bn_stats(model):
                    after = loss_fn(None)
                index = torch.topk(after - losses.detach(), keep, sorted=False).indices
            torch._foreach_zero_([w.grad for w in self._drawn if w.grad is not None])
            for w in frozen:
                w.requires_grad_(False)
            with torch.enable_grad(), frozen_bn_stats(model):
                loss_fn(index).mean().backward()
        except BaseException:
            self.restore()  # never leave the caller's weights at w + ε̂
            raise
        finally:
            for w in frozen:
                w.requires_grad_(True)
        self.second_step()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        """SAM's state dict plus the SWP generator's state."""
        state = super().state_dict()
        state[_ESAM_KEY] = {"generator": self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (the generator, then SAM's and the base's state)."""
        if not isinstance(state_dict, dict) or _ESAM_KEY not in state_dict:
            raise ValueError(
                f"Invalid ESAM state_dict: no {_ESAM_KEY!r} entry (was it saved by "
                "ESAM.state_dict()?)"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != _ESAM_KEY})
        self.generator.set_state(state_dict[_ESAM_KEY]["generator"])

    def __repr__(self) -> str:
        base = self.base_optimizer.__class__.__name__
        return f"ESAM(base_optimizer={base}, beta={self.beta}, gamma={self.gamma})"
