"""The formula of ``ε̂`` (reference / differentiable form and foreach kernel) and its geometries."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatmin.optim._checks import check_real
from flatmin.optim._vec import (
    Key,
    add_scaled_,
    global_sum,
    is_sharded,
    local_shards,
    reduction_keys,
    split_by_device_dtype,
    sum_pow_q,
)

__all__ = [
    "Fisher",
    "LpBall",
    "PerturbGroup",
    "PerturbationRule",
    "add_perturbation_",
    "compile_perturbation",
    "dual_exponent",
]


@dataclass
class PerturbGroup:
    """The tensors of one param group that take part in a perturbation, and its settings.

    ``grads`` are the directions the rule ascends along (usually ``.grad``). ``mask`` (one bool per
    tensor, or ``None`` for all) selects the tensors that are moved; every tensor of the group
    counts towards the norm either way.
    """

    params: list[Tensor]
    grads: list[Tensor]
    rho: float
    p: float
    adaptive: bool
    eta: float
    mask: list[bool] | None = None

    def moved(self) -> list[int]:
        """Return the indices of the tensors that the perturbation moves."""
        if self.mask is None:
            return list(range(len(self.params)))
        return [i for i, m in enumerate(self.mask) if m]


def dual_exponent(p: float) -> float:
    """Return q with 1/p + 1/q = 1 (q = 1 for p = inf)."""
    return 1.0 if math.isinf(p) else p / (p - 1.0)


def _norm_dtype(groups: Sequence[PerturbGroup], uniform: bool = False) -> torch.dtype:
    # Low-precision parameters (bf16/fp16) get their norm accumulated in float32.
    if uniform:  # one dtype for all tensors: one look is enough
        wide = next(g.params[0] for g in groups if g.params).dtype == torch.float64
    else:
        wide = any(t.dtype == torch.float64 for g in groups for t in g.params)
    return torch.float64 if wide else torch.float32


def _by_p(groups: Sequence[PerturbGroup]) -> dict[float, list[PerturbGroup]]:
    balls: dict[float, list[PerturbGroup]] = defaultdict(list)
    for group in groups:
        if group.params:
            balls[float(group.p)].append(group)
    return balls


def _local(ball: list[PerturbGroup], uniform: bool) -> tuple[list[PerturbGroup], list[Key] | None]:
    """The groups on their local shards and the reduction key per tensor (``None``: plain)."""
    if not any(is_sharded(g.params, uniform=uniform) for g in ball):
        return ball, None
    local, keys = [], []
    for group in ball:
        params, grads = local_shards(group.params, group.grads)
        keys += reduction_keys(group.params)
        local.append(dataclasses.replace(group, params=params, grads=grads))
    return local, keys


def _safe(denom: Tensor, eps: float) -> Tensor:
    # eps = 0 and a zero gradient: ε̂ is 0, not 0/0 (the numerator is 0 there).
    return torch.where(denom > 0, denom, torch.ones_like(denom)) if eps == 0 else denom


# -- the rules ------------------------------------------------------------------------------------
class PerturbationRule:
    """Base rule, the ℓp ball with ASAM's scale where a group asks for it (see :class:`LpBall`).

    Subclasses change the scale ``T`` (:meth:`scale`, :meth:`scales_foreach`) or which tensors take
    part (:meth:`select`); the formula itself, its reference and its kernel live here only.
    """

    # -- what a subclass changes ---------------------------------------------------------------
    def select(self, groups: list[PerturbGroup]) -> list[PerturbGroup]:
        """Choose the tensors that take part (norm) and that move (``mask``); default: all."""
        return groups

    def has_scale(self, group: PerturbGroup) -> bool:
        """Whether ``T`` differs from 1 for this group (the p = 2 fast path needs ``T = 1``)."""
        return group.adaptive

    def scale(self, w: Tensor, g: Tensor, group: PerturbGroup) -> Tensor | None:
        """``T`` for one tensor (differentiable ops), or ``None`` for ``T = 1``."""
        return w.abs() + group.eta if group.adaptive else None

    def scales_foreach(
        self, params: list[Tensor], grads: list[Tensor], group: PerturbGroup
    ) -> list[Tensor] | None:
        """``T`` for a list of tensors with ``torch._foreach_*`` ops (as :meth:`scale`)."""
        if not group.adaptive:
            return None
        t = list(torch._foreach_abs(params))
        torch._foreach_add_(t, group.eta)
        return t

    # -- the formula: reference / differentiable form ------------------------------------------
    def perturbation(self, groups: Sequence[PerturbGroup], eps: float) -> list[list[Tensor | None]]:
        """``ε̂`` per tensor, with plain differentiable ops (``None`` for the tensors not moved).

        This is the single-tensor reference of the kernels and the form that autograd
        differentiates (second-order SAM) and the analysis evaluates. The groups are used as
        given (call :meth:`select` first where a selection applies).

        Args:
            groups: The tensors and their settings; ``params`` only enter through the scale ``T``.
            eps: Added to the normaliser; a zero gradient gives ``ε̂ = 0`` (also for ``eps = 0``).
        """
        out: list[list[Tensor | None]] = [[None] * len(g.params) for g in groups]
        # Positions, not identities: what torch.compile traces must not depend on id().
        balls: dict[float, list[int]] = defaultdict(list)
        for k, group in enumerate(groups):
            if group.params:
                balls[float(group.p)].append(k)
        for p, index in balls.items():
            ball = [groups[k] for k in index]
            q = dual_exponent(p)
            dtype = _norm_dtype(ball)
            scaled: list[tuple[list[Tensor], list[Tensor | None]]] = []
            terms: list[Tensor] = []
            for group in ball:
                hs, ts = [], []
                for w, g in zip(group.params, group.grads):
                    t = self.scale(w, g, group)
                    h = g if t is None else t * g
                    hs.append(h)
                    ts.append(t)
                    if not math.isinf(p):
                        terms.append(h.to(dtype).abs().pow(q).sum())
                scaled.append((hs, ts))
            # Σ over all tensors (for sharded tensors: of every shard, reduced over the mesh).
            total = global_sum(terms)
            # (‖h‖_q^q)^(1/p); for p = inf the exponent is 0 and ε = ρ sign(h).
            denom = None if total is None else _safe(total.pow(1.0 / p) + eps, eps)
            for k, group, (hs, ts) in zip(index, ball, scaled):
                row = out[k]
                for i in group.moved():
                    w, h, t = group.params[i], hs[i], ts[i]
                    if math.isinf(p):
                        e = h.sign() * group.rho
                    else:
                        direction = h if p == 2.0 else h.sign() * h.abs().pow(q - 1.0)
                        assert denom is not None  # p < inf: at least one term
                        e = direction * group.rho / denom.to(w)
                    row[i] = e if t is None else e * t
        return out

    # -- the in-place kernels ------------------------------------------------------------------
    def perturb_(
        self,
        groups: Sequence[PerturbGroup],
        eps: float,
        *,
        foreach: bool = True,
        uniform: bool = False,
        consume_grads: bool = False,
        compiled: Compiled | None = None,
    ) -> None:
        """``w ← w + ε̂(w)`` in place: the foreach kernel, or the reference for ``foreach=False``.

        Args:
            groups: The participating tensors per param group (after :meth:`select`).
            eps: Added to the normaliser so that a zero gradient gives ``ε = 0``, not NaN.
            foreach: Use the multi-tensor kernel.
            uniform: All tensors share one device and dtype (skips a per-tensor scan).
            consume_grads: The directions are cleared right after, so they may serve as scratch
                space (saves a temporary the size of the parameters on accelerators).
            compiled: A :func:`compile_perturbation` to run instead, where it applies: plain
                tensors without a random mask (DTensors and ESAM's draws take the kernels).
        """
        if compiled is not None and not any(
            g.mask is not None or is_sharded(g.params, uniform=uniform) for g in groups
        ):
            compiled(self, groups, eps)
            return
        if not foreach:
            add_perturbation_(self, groups, eps)
            return
        for p, ball in _by_p(groups).items():
            self._perturb_ball_foreach_(p, ball, eps, uniform, consume_grads)

    def _perturb_ball_foreach_(
        self, p: float, ball: list[PerturbGroup], eps: float, uniform: bool, consume: bool
    ) -> None:
        q = dual_exponent(p)
        dtype = _norm_dtype(ball, uniform)
        # DTensors: the same kernel on the local shards (the scales are elementwise), and the
        # norm's partial sums reduced over the mesh.
        ball, keys = _local(ball, uniform)
        # T once per group and step: it scales h here and ε̂ below (same tensors, same T).
        ts_per_group: list[list[Tensor] | None] = []
        hs_per_group: list[list[Tensor]] = []
        for group in ball:
            t = self.scales_foreach(group.params, group.grads, group)
            ts_per_group.append(t)
            hs_per_group.append(
                group.grads if t is None else list(torch._foreach_mul(t, group.grads))
            )
        if math.isinf(p):
            inv = None
        else:
            all_hs = [h for hs in hs_per_group for h in hs]
            total = sum_pow_q(all_hs, q, dtype, uniform, keys)
            inv = 1.0 / _safe(total.pow(1.0 / p) + eps, eps)
        for k, (group, hs) in enumerate(zip(ball, hs_per_group)):
            params, t = group.params, ts_per_group[k]
            ts_per_group[k] = None  # released with the group's ε̂, not kept to the end
            if group.mask is not None:
                params = [w for w, m in zip(params, group.mask) if m]
                hs = [h for h, m in zip(hs, group.mask) if m]
                t = None if t is None else [ti for ti, m in zip(t, group.mask) if m]
            if not params:
                continue
            scaled = self.has_scale(group)
            if inv is not None and p == 2.0 and not scaled:
                # Fused: one pass over w and g, no temporary the size of the parameters.
                add_scaled_(params, hs, inv * group.rho, uniform=uniform, scratch_others=consume)
                continue
            if inv is None:  # p = inf: ε = ρ sign(h)
                e = list(torch._foreach_sign(hs))
                torch._foreach_mul_(e, group.rho)
            else:
                # For p = 2 here h is already a temporary (scaled), so scale it in place.
                if p == 2.0:
                    e = list(hs)
                else:
                    e = list(torch._foreach_pow(torch._foreach_abs(hs), q - 1.0))
                    torch._foreach_mul_(e, torch._foreach_sign(hs))
                for (sub,) in split_by_device_dtype(e, uniform=uniform):
                    torch._foreach_mul_(sub, (inv * group.rho).to(sub[0]))
            if scaled:
                assert t is not None  # has_scale said so
                torch._foreach_mul_(e, t)
            torch._foreach_add_(params, e)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: ``add_perturbation_`` compiled: ``(rule, groups, eps) -> None``.
Compiled = Callable[[PerturbationRule, Sequence[PerturbGroup], float], None]


def add_perturbation_(rule: PerturbationRule, groups: Sequence[PerturbGroup], eps: float) -> None:
    """``w ← w + ε̂`` by the reference form (``foreach=False``; what ``compile`` compiles)."""
    for group, es in zip(groups, rule.perturbation(groups, eps)):
        for w, e in zip(group.params, es):
            if e is not None:
                w.add_(e)


def compile_perturbation(options: Mapping[str, Any] | None = None) -> Compiled:
    """:func:`add_perturbation_` through ``torch.compile``: the reference form, fused.

    The compiler turns the per-tensor reference (one reduction and one update per tensor, plus
    the stack of partial norms of the foreach kernel) into a few fused kernels; the formula is
    the reference's, so the result agrees with it up to the order of the summation (tested to
    1e-6 in float32). Compilation happens at the first step and again when the set of tensors
    (count, shapes, dtypes) changes; ``rho`` and the other group values are not baked in.

    Args:
        options: Keyword arguments of ``torch.compile`` (``backend``, ``mode``, ``options``,
            ``dynamic``); default: inductor with its defaults.
    """
    return torch.compile(add_perturbation_, **dict(options or {}))


class LpBall(PerturbationRule):
    """The ℓp ball of SAM, ``p`` per param group (ℓ2, ℓ∞, ℓp), ASAM where ``adaptive=True``.

    The default rule of every optimizer in the family; ``p``, ``adaptive`` and ``eta`` are read
    from each param group (so schedulers and per-group values work).

    Example:
        >>> w = torch.tensor([3.0, 4.0])
        >>> group = PerturbGroup([w], [w.clone()], rho=1.0, p=2, adaptive=False, eta=0.0)
        >>> LpBall().perturbation([group], eps=0.0)[0][0]
        tensor([0.6000, 0.8000])
    """


class Fisher(PerturbationRule):
    r"""Fisher-SAM: the ℓp ball in the metric of the diagonal empirical Fisher ``1 + η_F g²``.

    .. math::

        f = 1 + \eta_F\, g \odot g, \quad T = f^{-1/2}, \quad
        \hat\epsilon = \rho\, \frac{f^{-1} g}{\sqrt{g^\top f^{-1} g}} \ (p = 2),

    so coordinates with a large gradient (high Fisher information) move less. A group with
    ``adaptive=True`` multiplies ASAM's ``|w| + η`` into ``T``.

    Args:
        eta: ``η_F >= 0``; ``0`` gives plain SAM.

    References:
        Kim et al., "Fisher SAM: Information Geometry and Sharpness Aware Minimisation",
        ICML 2022, arXiv:2206.04920.

    Example:
        >>> g = torch.tensor([1.0, 0.0, 3.0])
        >>> group = PerturbGroup([torch.zeros(3)], [g], rho=1.0, p=2, adaptive=False, eta=0.0)
        >>> e = Fisher(eta=1.0).perturbation([group], eps=0.0)[0][0]
        >>> torch.allclose(e, (g / (1 + g**2)) / (g**2 / (1 + g**2)).sum().sqrt())
        True
    """

    def __init__(self, eta: float = 1.0) -> None:
        self.eta = check_real("Fisher eta", eta, low=0.0)

    def has_scale(self, group: PerturbGroup) -> bool:
        return True

    def scale(self, w: Tensor, g: Tensor, group: PerturbGroup) -> Tensor | None:
        t = (1.0 + self.eta * g * g).rsqrt()
        return t * (w.abs() + group.eta) if group.adaptive else t

    def scales_foreach(
        self, params: list[Tensor], grads: list[Tensor], group: PerturbGroup
    ) -> list[Tensor] | None:
        t = list(torch._foreach_mul(grads, grads))
        torch._foreach_mul_(t, self.eta)
        torch._foreach_add_(t, 1.0)
        torch._foreach_rsqrt_(t)
        asam = super().scales_foreach(params, grads, group)
        if asam is not None:
            torch._foreach_mul_(t, asam)
        return t

    def __repr__(self) -> str:
        return f"Fisher(eta={self.eta})"
