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

The closure contract (the PyTorch one, with an optional argument): ``closure()`` zeroes the
gradients, runs the batch, calls ``backward()`` on the batch loss **when gradients are enabled**,
and returns the **per-sample losses** (shape ``(n,)``); ``closure(index)`` does the same for the
samples ``index`` (a 1-D ``LongTensor``) only. ESAM calls ``closure()`` at ``w``, then at
``w + ε̂`` under ``torch.no_grad()`` (the selection), then ``closure(index)``.
:func:`per_sample_closure` builds such a closure from a function of the index.

Design notes. SWP is the rule :class:`~flatmin.optim.rules.RandomSubset`: the mask is drawn per
parameter *tensor* (as the authors' code does with ``requires_grad``; a per-element mask saves no
backward work), from an explicit CPU :class:`torch.Generator`, so drawing it never syncs a GPU.
Undrawn tensors step with their first-pass gradient (the authors' code leaves them a zero
gradient, which only their momentum and weight decay move). Turning ``requires_grad`` off for
the undrawn tensors during the second pass does not mix with ``DistributedDataParallel``; use
``beta=1`` there.

References:
    Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural Networks",
    ICLR 2022, arXiv:2110.03141.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.optim._checks import GroupCheck, check_fraction
from flatmin.optim.rules import PerturbationRule, RandomSubset
from flatmin.optim.sam import SAM, Base, Params

__all__ = ["ESAM", "per_sample_closure"]


def per_sample_closure(
    optimizer: Optimizer, losses: Callable[[Tensor | None], Tensor]
) -> Callable[..., Tensor]:
    """Build the closure ESAM (and every optimizer) accepts from per-sample losses.

    Args:
        optimizer: Whose gradients the closure zeroes.
        losses: ``losses(index)``: the per-sample losses (``reduction="none"``, shape ``(n,)``) of
            the whole batch for ``index=None``, else of the samples ``index``.

    Returns:
        ``closure(index=None)``: zero the gradients, ``losses(index).mean().backward()`` when
        gradients are enabled, return the (detached) per-sample losses.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = flatmin.ESAM(model.parameters(), torch.optim.SGD, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> def losses(index=None):
        ...     xb, yb = (x, y) if index is None else (x[index], y[index])
        ...     return torch.nn.functional.cross_entropy(model(xb), yb, reduction="none")
        >>> per_sample = opt.step(per_sample_closure(opt, losses), model=model)
        >>> per_sample.shape
        torch.Size([8])
    """

    def closure(index: Tensor | None = None) -> Tensor:
        optimizer.zero_grad()
        out = losses(index)
        if torch.is_grad_enabled():
            out.mean().backward()
        return out.detach()

    return closure


def _per_sample(losses: Any, what: str) -> Tensor:
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"Invalid per-sample losses of shape {shape} from the closure {what} (expected (n,): "
            "return the losses with reduction='none'; see flatmin.optim.esam.per_sample_closure)"
        )
    return losses


class ESAM(SAM):
    r"""Efficient SAM: a random subset of tensors perturbed, the second pass on the sharpest data.

    Update rule (see the module docstring for the full algorithm): with ``m_j ~ Bernoulli(β)``
    per parameter tensor ``j`` and ``ε̂`` SAM's perturbation over all tensors,

    .. math::

        w_j \leftarrow \mathrm{base\_step}\Big(w_j,\ m_j\, \nabla_j L_{B^+}\big(w + m \odot
        \hat\epsilon / \beta\big) + (1 - m_j)\, \nabla_j L_B(w)\Big),

    where ``B⁺`` holds the ``⌈γ n⌉`` samples whose loss rises most from ``w`` to the perturbed
    point. ``β = γ = 1`` gives :class:`~flatmin.optim.SAM` exactly.

    ESAM follows the closure contract of the family; with ``gamma < 1`` the closure returns
    per-sample losses and accepts an optional sample index (module docstring,
    :func:`per_sample_closure`). ``step`` returns the per-sample losses at ``w``.
    ``first_step``/``second_step`` by hand give SWP only.

    Args:
        params: As for :class:`~flatmin.optim.SAM`.
        base_optimizer: As for :class:`~flatmin.optim.SAM`.
        rho: As for :class:`~flatmin.optim.SAM`.
        beta: Probability that a tensor is perturbed (SWP); the paper uses 0.6.
        gamma: Fraction of the batch used by the second pass (SDS); the paper uses 0.5.
        generator: A CPU generator for the SWP draws (default: a new one seeded with 0). Its
            state is saved in :meth:`state_dict`.
        rule: The geometry inside SWP (default :class:`~flatmin.optim.rules.LpBall`).
        **kwargs: Everything else :class:`~flatmin.optim.SAM` accepts (``p``, ``lr``, ...).

    Raises:
        TypeError: ``beta``/``gamma`` not floats, ``generator`` not a CPU ``torch.Generator``.
        ValueError: ``beta`` or ``gamma`` outside ``(0, 1]``; at a step, a closure that does
            not return per-sample losses while ``gamma < 1``.

    References:
        Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural
        Networks", ICLR 2022, arXiv:2110.03141.

    Example:
        >>> import torch, flatmin
        >>> from flatmin.optim.esam import per_sample_closure
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = flatmin.ESAM(model.parameters(), torch.optim.SGD, beta=0.6, gamma=0.5, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> def losses(index=None):
        ...     xb, yb = (x, y) if index is None else (x[index], y[index])
        ...     return torch.nn.functional.cross_entropy(model(xb), yb, reduction="none")
        >>> per_sample = opt.step(per_sample_closure(opt, losses), model=model)
    """

    gamma: float
    _options: ClassVar[dict[str, tuple[Any, GroupCheck]]] = {"gamma": (0.5, check_fraction)}
    # The undrawn tensors keep their first-pass gradient for the base step.
    _zero_grad_after_ascent = False

    def __init__(
        self,
        params: Params,
        base_optimizer: Base,
        rho: float = 0.05,
        *,
        beta: float = 0.6,
        generator: torch.Generator | None = None,
        rule: PerturbationRule | None = None,
        **kwargs: Any,
    ) -> None:
        self._swp = RandomSubset(beta, generator, inner=rule)
        super().__init__(params, base_optimizer, rho, rule=self._swp, **kwargs)

    @property
    def beta(self) -> float:
        """Probability that a tensor is perturbed (SWP)."""
        return self._swp.beta

    @property
    def generator(self) -> torch.Generator:
        """The CPU generator of the SWP draws."""
        return self._swp.generator

    def _perturbed_pass(self, closure: Callable[..., Any], first: Any) -> Any:
        drawn = [w for g in self.last_groups for w, m in zip(g.params, g.mask or ()) if m]
        undrawn = [w for g in self.last_groups for w, m in zip(g.params, g.mask or ()) if not m]
        losses = _per_sample(first, "at w") if self.gamma < 1.0 else None
        if not drawn:  # nothing perturbed: a plain step with g, no second pass
            return None
        # The undrawn tensors keep g: take their gradients away from the closure's zero_grad
        # (both calls below zero the gradients) and turn their weight gradients off.
        kept = [(w, w.grad) for w in undrawn]
        frozen = [w for w in undrawn if w.requires_grad]
        for w in undrawn:
            w.grad = None
        try:
            index = None
            if losses is not None:
                n = losses.shape[0]
                keep = max(1, math.ceil(self.gamma * n))
                if keep < n:
                    with torch.no_grad():
                        after = _per_sample(closure(), "at w + ε̂")
                    index = torch.topk(after - losses.detach(), keep, sorted=False).indices
            for w in frozen:
                w.requires_grad_(False)
            with torch.enable_grad():
                return closure() if index is None else closure(index)
        finally:
            for w in frozen:
                w.requires_grad_(True)
            for w, grad in kept:
                w.grad = grad

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        state = extra.get("generator") if set(extra) == {"generator"} else None
        try:
            torch.Generator().set_state(state)  # type: ignore[arg-type]
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"Invalid ESAM state_dict: generator state ({err})") from None

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.generator.set_state(extra["generator"])

    def __repr__(self) -> str:
        base = self.base_optimizer.__class__.__name__
        return f"ESAM(base_optimizer={base}, beta={self.beta}, gamma={self.gamma})"
