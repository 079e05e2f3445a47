r"""Perturbation rules: where SAM's ``ε̂`` lives, once, for every member of the family.

A rule turns the gradient ``g`` (over **all** participating tensors, so the perturbation is one
point on one ball) into the ascent step ``ε̂``. With ``T`` a positive elementwise scale (``T = 1``
unless a rule or the group says otherwise), ``h = T g``, and 1/p + 1/q = 1:

.. math::

    \hat\epsilon = T \odot \rho\, \operatorname{sign}(h)\, |h|^{q-1} \big/ \big(\|h\|_q^q\big)^{1/p}

(Foret et al. 2021, eq. 2), so ``p = 2`` gives ``ρ h/‖h‖₂`` scaled by ``T`` and ``p = ∞`` gives
``ρ T sign(h)``. The geometries:

* :class:`LpBall` (the default): the ℓp ball, ``p`` per param group (ℓ2, ℓ∞, any ℓp); a group with
  ``adaptive=True`` is ASAM (Kwon et al. 2021): ``T = |w| + η``, i.e. ``ρ T² g / ‖T g‖₂`` for p = 2.
  The adaptive scale wraps every rule below too.
* :class:`Fisher`: Fisher-SAM (Kim et al. 2022), the ball in the metric of the diagonal Fisher
  ``f = 1 + η_F g²``: ``T = f^{-1/2}``, so ``ε̂ = ρ f⁻¹g / √(gᵀf⁻¹g)`` for p = 2.
* :class:`Subset`: only some tensors take part (norm and move), e.g. :func:`sam_on` (SAM-ON,
  Mueller et al. 2023: the normalization layers only).
* :class:`RandomSubset`: every tensor counts towards the norm, each is moved with probability
  ``β`` by ``ε̂/β`` (ESAM's stochastic weight perturbation, Du et al. 2022).

Every rule has three forms of the same formula: :meth:`PerturbationRule.perturbation`, written
with plain differentiable ops (the single-tensor reference, and what second-order SAM,
``analysis.sam_gradients`` and ``analysis.sharpness`` differentiate or evaluate), and the in-place
kernels of :meth:`PerturbationRule.perturb_`: the reference applied in place (``foreach=False``)
or a ``torch._foreach_*`` kernel (the default) that must agree with it in float64.

Cost of the foreach kernel (p = 2, no scale, the common case): the norm reads ``g`` once and
``w ← w + s·g`` is one fused ``addcmul`` on CPU (``_foreach_mul`` + ``_foreach_add_`` on
accelerators, which keeps the multi-tensor fast path); the scale ``s = ρ/‖g‖`` stays a 0-d tensor,
so there is no host sync.

Distributed note: every global reduction (the norm here, the dot products of the variants) goes
through the few functions in the "reductions" section below, the one place where a sharded
(DTensor) path would reduce its local partial sums across the mesh.

References:
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021, arXiv:2010.01412. Kwon et al., "ASAM", ICML 2021, arXiv:2102.11600. Kim et al.,
    "Fisher SAM: Information Geometry and Sharpness Aware Minimisation", ICML 2022,
    arXiv:2206.04920. Mueller et al., "Normalization Layers Are All That Sharpness-Aware
    Minimization Needs", NeurIPS 2023, arXiv:2306.04226. Du et al., "Efficient Sharpness-aware
    Minimization", ICLR 2022, arXiv:2110.03141.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatmin.optim._checks import check_real

__all__ = [
    "Fisher",
    "LpBall",
    "PerturbGroup",
    "PerturbationRule",
    "RandomSubset",
    "Subset",
    "add_scaled_",
    "dual_exponent",
    "normalization_parameters",
    "sam_on",
    "split_by_device_dtype",
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


# -- reductions: the one place a sharded (DTensor) path would all-reduce its partial sums --------
def _norm_dtype(groups: Sequence[PerturbGroup], uniform: bool = False) -> torch.dtype:
    # Low-precision parameters (bf16/fp16) get their norm accumulated in float32.
    if uniform:  # one dtype for all tensors: one look is enough
        wide = next(g.params[0] for g in groups if g.params).dtype == torch.float64
    else:
        wide = any(t.dtype == torch.float64 for g in groups for t in g.params)
    return torch.float64 if wide else torch.float32


def split_by_device_dtype(
    *lists: Sequence[Tensor], uniform: bool = False
) -> list[tuple[list[Tensor], ...]]:
    """Split aligned tensor lists by the (device, dtype) of the first list.

    ``torch._foreach_*`` ops want one device and dtype per call. ``uniform=True`` promises that
    all tensors already share one (SAM checks it once per set of parameters), which skips the
    per-tensor scan: on an accelerator that Python loop costs more than the kernels.
    """
    if uniform or not lists[0]:
        return [tuple(list(t) for t in lists)]
    index: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(lists[0]):
        index[(t.device, t.dtype)].append(i)
    return [tuple([t[i] for i in idx] for t in lists) for idx in index.values()]


def _sum_pow_q(hs: list[Tensor], q: float, dtype: torch.dtype, uniform: bool) -> Tensor:
    """Return Σ_i ‖h_i‖_q^q as one 0-d tensor, without a host sync."""
    partial = []
    for (sub,) in split_by_device_dtype(hs, uniform=uniform):
        norms = torch._foreach_norm(sub, q, dtype=dtype)
        partial.append(torch.stack(norms).pow(q).sum())
    if len(partial) == 1:
        return partial[0]
    device = partial[0].device
    return torch.stack([s.to(device) for s in partial]).sum()


def sum_sq(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ‖t‖² over ``tensors`` as a 0-d tensor on the first tensor's device (no host sync)."""
    device = tensors[0].device
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack([n.to(device) for n in norms]).square().sum()


def dot(a: Sequence[Tensor], b: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ as a 0-d tensor on the first tensor's device (no host sync)."""
    device = a[0].device
    return torch.stack(
        [
            torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)).to(device)
            for x, y in zip(a, b)
        ]
    ).sum()


def wide_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (the accumulation dtype of reductions)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _safe(denom: Tensor, eps: float) -> Tensor:
    # eps = 0 and a zero gradient: ε̂ is 0, not 0/0 (the numerator is 0 there).
    return torch.where(denom > 0, denom, torch.ones_like(denom)) if eps == 0 else denom


def _fused_addcmul(device: torch.device) -> bool:
    # On CPU the foreach ops loop over tensors anyway, so one fused addcmul per tensor (one pass
    # over memory) wins; on accelerators a broadcast 0-d operand leaves the multi-tensor fast path.
    return device.type == "cpu"


def add_scaled_(
    tensors: Sequence[Tensor],
    others: Sequence[Tensor],
    scale: Tensor,
    *,
    uniform: bool = False,
    scratch_others: bool = False,
) -> None:
    """``t ← t + s·o`` for every pair, with ``s`` a 0-d tensor: no host sync, no ``.item()``.

    On CPU one fused ``addcmul`` per tensor (one pass, no temporary). Elsewhere ``_foreach_mul``
    into one temporary plus ``_foreach_add_``, which keeps the multi-tensor fast path (a broadcast
    0-d operand would fall back to one kernel launch per tensor); with ``scratch_others`` the
    product goes into ``others`` in place instead, with no temporary at all.

    Args:
        tensors: Updated in place.
        others: Same shapes as ``tensors``.
        scale: A 0-d tensor on any device; it is moved to each tensor's device and dtype.
        uniform: All tensors share one device and dtype (see :func:`split_by_device_dtype`).
        scratch_others: ``others`` may be overwritten (e.g. gradients about to be cleared).
    """
    for ts, os in split_by_device_dtype(tensors, others, uniform=uniform):
        if not ts:
            continue
        s = scale.to(device=ts[0].device, dtype=ts[0].dtype)
        if _fused_addcmul(ts[0].device):
            torch._foreach_addcmul_(ts, os, [s] * len(ts))
        elif scratch_others:
            torch._foreach_mul_(os, s)
            torch._foreach_add_(ts, os)
        else:
            torch._foreach_add_(ts, torch._foreach_mul(os, s))


def _by_p(groups: Sequence[PerturbGroup]) -> dict[float, list[PerturbGroup]]:
    balls: dict[float, list[PerturbGroup]] = defaultdict(list)
    for group in groups:
        if group.params:
            balls[float(group.p)].append(group)
    return balls


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
        position = {id(g): i for i, g in enumerate(groups)}
        for p, ball in _by_p(groups).items():
            q = dual_exponent(p)
            dtype = _norm_dtype(ball)
            scaled: list[tuple[list[Tensor], list[Tensor | None]]] = []
            total: Tensor | None = None
            for group in ball:
                hs, ts = [], []
                for w, g in zip(group.params, group.grads):
                    t = self.scale(w, g, group)
                    h = g if t is None else t * g
                    hs.append(h)
                    ts.append(t)
                    if not math.isinf(p):
                        term = h.to(dtype).abs().pow(q).sum()
                        total = term if total is None else total + term.to(total.device)
                scaled.append((hs, ts))
            # (‖h‖_q^q)^(1/p); for p = inf the exponent is 0 and ε = ρ sign(h).
            denom = None if total is None else _safe(total.pow(1.0 / p) + eps, eps)
            for group, (hs, ts) in zip(ball, scaled):
                row = out[position[id(group)]]
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
    ) -> None:
        """``w ← w + ε̂(w)`` in place: the foreach kernel, or the reference for ``foreach=False``.

        Args:
            groups: The participating tensors per param group (after :meth:`select`).
            eps: Added to the normaliser so that a zero gradient gives ``ε = 0``, not NaN.
            foreach: Use the multi-tensor kernel.
            uniform: All tensors share one device and dtype (skips a per-tensor scan).
            consume_grads: The directions are cleared right after, so they may serve as scratch
                space (saves a temporary the size of the parameters on accelerators).
        """
        if not foreach:
            for group, es in zip(groups, self.perturbation(groups, eps)):
                for w, e in zip(group.params, es):
                    if e is not None:
                        w.add_(e)
            return
        for p, ball in _by_p(groups).items():
            self._perturb_ball_foreach_(p, ball, eps, uniform, consume_grads)

    def _perturb_ball_foreach_(
        self, p: float, ball: list[PerturbGroup], eps: float, uniform: bool, consume: bool
    ) -> None:
        q = dual_exponent(p)
        dtype = _norm_dtype(ball, uniform)
        hs_per_group: list[list[Tensor]] = []
        for group in ball:
            t = self.scales_foreach(group.params, group.grads, group)
            hs_per_group.append(
                group.grads if t is None else list(torch._foreach_mul(t, group.grads))
            )
        if math.isinf(p):
            inv = None
        else:
            all_hs = [h for hs in hs_per_group for h in hs]
            inv = 1.0 / _safe(_sum_pow_q(all_hs, q, dtype, uniform).pow(1.0 / p) + eps, eps)
        for group, hs in zip(ball, hs_per_group):
            params, grads = group.params, group.grads
            if group.mask is not None:
                params = [w for w, m in zip(params, group.mask) if m]
                grads = [g for g, m in zip(grads, group.mask) if m]
                hs = [h for h, m in zip(hs, group.mask) if m]
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
                t = self.scales_foreach(params, grads, group)
                assert t is not None  # has_scale said so
                torch._foreach_mul_(e, t)
            torch._foreach_add_(params, e)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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

    def has_scale(self, group: PerturbGroup) -> bool:  # noqa: D102
        return True

    def scale(self, w: Tensor, g: Tensor, group: PerturbGroup) -> Tensor | None:  # noqa: D102
        t = (1.0 + self.eta * g * g).rsqrt()
        return t * (w.abs() + group.eta) if group.adaptive else t

    def scales_foreach(  # noqa: D102
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


class _Wrapper(PerturbationRule):
    """A selection around another rule, whose geometry (scale) it keeps."""

    def __init__(self, inner: PerturbationRule | None) -> None:
        if inner is not None and not isinstance(inner, PerturbationRule):
            raise TypeError(f"Invalid inner rule: {inner!r} (expected a PerturbationRule)")
        self.inner = inner or LpBall()

    def has_scale(self, group: PerturbGroup) -> bool:
        return self.inner.has_scale(group)

    def scale(self, w: Tensor, g: Tensor, group: PerturbGroup) -> Tensor | None:
        return self.inner.scale(w, g, group)

    def scales_foreach(
        self, params: list[Tensor], grads: list[Tensor], group: PerturbGroup
    ) -> list[Tensor] | None:
        return self.inner.scales_foreach(params, grads, group)


class Subset(_Wrapper):
    """Only the given tensors take part: the norm and the move run over them alone.

    Every other tensor is left at ``w`` (and still receives the gradient at the perturbed point,
    which is SAM's update for all of them).

    Args:
        tensors: The tensors that are perturbed (kept by reference, compared by identity).
        inner: The geometry (default :class:`LpBall`).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        >>> rule = sam_on(model)  # only the LayerNorm's weight and bias
        >>> len(rule.tensors)
        2
    """

    def __init__(self, tensors: Iterable[Tensor], inner: PerturbationRule | None = None) -> None:
        super().__init__(inner)
        self.tensors = list(tensors)
        if not all(isinstance(t, Tensor) for t in self.tensors):
            raise TypeError("Invalid tensors: expected an iterable of tensors")
        self._ids = {id(t) for t in self.tensors}

    def select(self, groups: list[PerturbGroup]) -> list[PerturbGroup]:  # noqa: D102
        for group in groups:
            keep = [i for i, w in enumerate(group.params) if id(w) in self._ids]
            group.params = [group.params[i] for i in keep]
            group.grads = [group.grads[i] for i in keep]
        return self.inner.select(groups)

    def __repr__(self) -> str:
        return f"Subset({len(self.tensors)} tensors, inner={self.inner!r})"


_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def normalization_parameters(model: nn.Module) -> list[Tensor]:
    """The affine parameters of every normalization layer of ``model`` (BatchNorm, LayerNorm...)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, _NORM_LAYERS)
        for p in m.parameters(recurse=False)
    ]


def sam_on(model: nn.Module, inner: PerturbationRule | None = None) -> Subset:
    """SAM-ON: perturb only the normalization layers' parameters (Mueller et al. 2023).

    Raises:
        ValueError: ``model`` has no normalization layer with parameters.

    References:
        Mueller et al., "Normalization Layers Are All That Sharpness-Aware Minimization Needs",
        NeurIPS 2023, arXiv:2306.04226.
    """
    tensors = normalization_parameters(model)
    if not tensors:
        raise ValueError(f"Invalid model for SAM-ON: {type(model).__name__} has no normalization "
                         "layer with affine parameters")  # fmt: skip
    return Subset(tensors, inner)


class RandomSubset(_Wrapper):
    """ESAM's stochastic weight perturbation: each tensor moves with probability β, by ``ε̂/β``.

    Every participating tensor counts towards the norm. The draws are per tensor (as the authors'
    code does), from an explicit CPU generator, so drawing never syncs an accelerator.

    Args:
        beta: Probability in ``(0, 1]`` that a tensor is moved.
        generator: A CPU ``torch.Generator`` (default: a new one seeded with 0).
        inner: The geometry (default :class:`LpBall`).

    References:
        Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural
        Networks", ICLR 2022, arXiv:2110.03141.
    """

    def __init__(
        self,
        beta: float,
        generator: torch.Generator | None = None,
        inner: PerturbationRule | None = None,
    ) -> None:
        super().__init__(inner)
        self.beta = check_real("beta", beta, low=0.0, high=1.0, low_open=True)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"Invalid generator: {generator!r} (expected a CPU torch.Generator)")
        self.generator = generator

    def select(self, groups: list[PerturbGroup]) -> list[PerturbGroup]:  # noqa: D102
        groups = self.inner.select(groups)
        n = sum(len(g.params) for g in groups)
        draws = (torch.rand(n, generator=self.generator) < self.beta).tolist() if n else []
        start = 0
        for group in groups:
            group.mask = draws[start : start + len(group.params)]
            group.rho = group.rho / self.beta
            start += len(group.params)
        return groups

    def __repr__(self) -> str:
        return f"RandomSubset(beta={self.beta}, inner={self.inner!r})"
