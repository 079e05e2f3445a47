r"""Second-order SAM: differentiate through the perturbation ``ε̂(w)`` (Foret et al. §4, Fig. 4).

SAM's objective is ``L(w + ε̂(w))``. Its exact gradient is

.. math::

    \nabla_w L(w + \hat\epsilon(w))
      = \big(I + \tfrac{d\hat\epsilon}{dw}\big)^{\!\top} v, \qquad v = \nabla L|_{w+\hat\epsilon},

and plain SAM drops the second term. For ``ε̂ = ρ φ(g)`` with ``g = ∇L(w)`` (``φ(g) = g/‖g‖₂``
for p = 2) the chain rule gives ``dε̂/dw = ρ J_φ(g) H`` with ``H = ∇²L(w)`` symmetric, so

.. math::

    \big(\tfrac{d\hat\epsilon}{dw}\big)^{\!\top} v = H\,u, \qquad
    u = \rho\, J_\varphi(g)^\top v \;\big(= \tfrac{\rho}{\|g\|}(v - \hat g\,\hat g^\top v)
    \text{ for } p = 2\big),

**one Hessian-vector product at w** (a double backward, via :func:`flatmin._curvature.hvp`).
``u`` is a cheap vector-Jacobian product through the closed form of ``ε̂`` (no network
involved). ASAM's ``T = |w| + η`` also depends on ``w`` directly; that explicit term is added too.
For p = ∞, ``φ = sign`` has zero derivative and the term vanishes.

Cost per step: three forward/backward passes (at w, at w + ε̂, and at w again with
``create_graph=True``; the first pass's graph cannot be reused because perturbing ``w`` in place
invalidates it) plus the double backward for ``H u``. The third pass replays the first pass's
RNG state, so ``H`` belongs to the same stochastic loss as ``g``. The gradients are taken with
:func:`torch.autograd.grad`, so DDP's all-reduce hooks do not fire: single process only.

References:
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021, arXiv:2010.01412 (Section 4, Figure 4). Pearlmutter, "Fast Exact Multiplication
    by the Hessian", Neural Computation 1994.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatmin._curvature import hvp
from flatmin.optim._perturb import dual_exponent
from flatmin.optim._rng import RNGState
from flatmin.optim.bn import frozen_bn_stats
from flatmin.optim.sam import SAM

__all__ = ["perturbation", "second_order_step"]


def perturbation(
    params: Sequence[Sequence[Tensor]],
    grads: Sequence[Sequence[Tensor]],
    settings: Sequence[Mapping[str, Any]],
    eps: float = 1e-12,
) -> list[list[Tensor]]:
    r"""SAM's ``ε̂`` as a differentiable function of the gradients (and, for ASAM, the weights).

    The same rule as :mod:`flatmin.optim._perturb` (one ball per value of ``p`` over all groups;
    per-group ``rho``, ``adaptive``, ``eta``), written with ordinary differentiable ops instead of
    in-place kernels, so autograd can form ``J_φ(g)ᵀ v``.

    Args:
        params: Per group, the weights ``w`` (used only by adaptive groups).
        grads: Per group, the gradients ``g``, same shapes.
        settings: Per group, a mapping with ``rho``, ``p``, ``adaptive``, ``eta``.
        eps: Added to the normaliser, as in SAM.

    Returns:
        Per group, the perturbation of each tensor.
    """
    hs = [
        [(w.abs() + s["eta"]) * g if s["adaptive"] else g for w, g in zip(ws, gs)]
        for ws, gs, s in zip(params, grads, settings)
    ]
    denom: dict[float, Tensor] = {}
    for p in {float(s["p"]) for s in settings}:
        if math.isinf(p):
            continue
        q = dual_exponent(p)
        terms = [h.abs().pow(q).sum() for hg, s in zip(hs, settings) if s["p"] == p for h in hg]
        if terms:
            denom[p] = torch.stack(terms).sum().pow(1.0 / p) + eps
    out: list[list[Tensor]] = []
    for ws, hg, s in zip(params, hs, settings):
        p, rho, es = float(s["p"]), s["rho"], []
        for w, h in zip(ws, hg):
            if math.isinf(p):
                e = rho * h.sign()
            else:
                q = dual_exponent(p)
                direction = h if p == 2.0 else h.sign() * h.abs().pow(q - 1.0)
                e = rho * direction / denom[p]
            es.append(e * (w.abs() + s["eta"]) if s["adaptive"] else e)
        out.append(es)
    return out


def second_order_step(
    optimizer: SAM,
    compute_loss: Callable[[], Tensor],
    *,
    model: nn.Module | None = None,
    same_rng: bool = False,
) -> Tensor:
    r"""One SAM step with the exact gradient of ``L(w + ε̂(w))``, second-order term included.

    ``w ← base_step(w, v + H u + t)`` with ``v = ∇L(w + ε̂)``, ``u = ρ J_φ(g)ᵀ v`` and ``t`` the
    explicit ASAM term (module docstring); ``max_grad_norm`` clips this gradient as usual.

    Args:
        optimizer: The SAM optimizer (its groups' ``rho``, ``p``, ``adaptive``, ``eta``).
        compute_loss: Runs the forward and returns the loss; it must **not** call ``backward``
            (it runs twice, at ``w`` and at ``w + ε̂``).
        model: If given, BatchNorm running statistics are frozen during the second pass.
        same_rng: Replay the RNG state so both passes see the same dropout masks.

    Returns:
        The loss at ``w`` (detached).

    Raises:
        TypeError: ``optimizer`` is not a :class:`~flatmin.optim.sam.SAM`.
        RuntimeError: ``optimizer`` is between ``first_step`` and ``second_step``, or the loss is
            not a scalar that requires grad.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
        >>> opt = flatmin.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 4)
        >>> loss = second_order_step(opt, lambda: torch.nn.functional.mse_loss(model(x), y))
    """
    if not isinstance(optimizer, SAM):
        raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected flatmin.SAM)")
    if optimizer.perturbed:
        raise RuntimeError("second_order_step() called between first_step() and second_step()")
    first_rng = RNGState.capture()
    optimizer.zero_grad(set_to_none=True)
    # Pass 1 at w: g, then w + ε̂ (SAM's own kernels and backup).
    with torch.enable_grad():
        loss = compute_loss()
        _check_loss(loss)
        loss.backward()
    kept = [[w for w in g["params"] if w.grad is not None] for g in optimizer.param_groups]
    flat = [w for ws in kept for w in ws]
    optimizer.first_step(zero_grad=True)
    # Pass 2 at w + ε̂: v.
    try:
        if same_rng:
            first_rng.restore()
        with torch.enable_grad(), frozen_bn_stats(model):
            v = _grads(compute_loss(), flat, create_graph=False)
    finally:
        optimizer.restore()
    after_rng = RNGState.capture()
    # Pass 3 at w, same randomness as pass 1 (the same loss whose gradient defined ε̂): the
    # graph of g for H u. Pass 1's graph cannot serve: perturbing w in place invalidates it.
    first_rng.restore()
    with torch.enable_grad(), frozen_bn_stats(model):
        loss3 = compute_loss()
        g = _grads(loss3, flat, create_graph=True)
        w_leaves = [[w.detach().clone().requires_grad_(True) for w in ws] for ws in kept]
        g_iter = iter(g)
        g_leaves = [[next(g_iter).detach().clone().requires_grad_(True) for _ in ws] for ws in kept]
        eps_hat = perturbation(w_leaves, g_leaves, optimizer.param_groups, optimizer.eps)
    if not same_rng:
        after_rng.restore()  # the generators move on as after two passes
    total = list(v)
    outs = [e for es in eps_hat for e in es if e.requires_grad]
    if outs:
        n = len(flat)
        leaves = [t for ts in g_leaves for t in ts] + [t for ts in w_leaves for t in ts]
        outs_v = [vi for e, vi in zip((e for es in eps_hat for e in es), v) if e.requires_grad]
        vjp = torch.autograd.grad(outs, leaves, grad_outputs=outs_v, allow_unused=True)
        u = [torch.zeros_like(w) if x is None else x for w, x in zip(flat, vjp[:n])]
        # A gradient that is constant in w has a zero Hessian row: pass None for it.
        h_u = hvp(loss3, flat, u, grads=[gi if gi.requires_grad else None for gi in g])
        for k, (hu, t) in enumerate(zip(h_u, vjp[n:])):
            total[k] = total[k] + hu if t is None else total[k] + hu + t
    del loss3, g
    # Hand the gradient to SAM's protocol: with no gradient, first_step perturbs nothing, so
    # second_step (clipping, base step, and whatever a subclass adds) runs at w.
    optimizer.zero_grad(set_to_none=True)
    optimizer.first_step()
    with torch.no_grad():
        for w, gi in zip(flat, total):
            w.grad = gi.detach()
    optimizer.second_step()
    return loss.detach()


def _check_loss(loss: Tensor) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise RuntimeError("compute_loss() must return a scalar loss that requires grad")


def _grads(loss: Tensor, params: list[Tensor], *, create_graph: bool) -> list[Tensor]:
    _check_loss(loss)
    out = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(params, out)]
