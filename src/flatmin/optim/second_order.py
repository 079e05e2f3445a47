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
involved): the differentiable form of the optimizer's rule (:mod:`flatmin.optim.rules`).
ASAM's ``T = |w| + η`` also depends on ``w`` directly; that explicit term is added too. For
p = ∞, ``φ = sign`` has zero derivative and the term vanishes.

Cost per step: three forward/backward passes (at w, at w + ε̂, and at w again with
``create_graph=True``; the first pass's graph cannot be reused because perturbing ``w`` in place
invalidates it) plus the double backward for ``H u``. The third pass replays the first pass's
RNG state, so ``H`` belongs to the same stochastic loss as ``g``. The first two passes are the
family's step sequence (:mod:`flatmin.optim._driver`); the third is taken with
:func:`torch.autograd.grad`, so DDP's all-reduce hooks do not fire for it: single process only.

References:
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021, arXiv:2010.01412 (Section 4, Figure 4). Pearlmutter, "Fast Exact Multiplication
    by the Hessian", Neural Computation 1994.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from flatmin._curvature import hvp
from flatmin.optim._driver import run_step
from flatmin.optim._rng import RNGState
from flatmin.optim.bn import frozen_bn_stats
from flatmin.optim.sam import SAM

__all__ = ["second_order_step"]


def second_order_step(
    optimizer: SAM,
    compute_loss: Callable[[], Tensor],
    *,
    model: nn.Module | None = None,
    same_rng: bool = False,
) -> Tensor:
    r"""One SAM step with the exact gradient of ``L(w + ε̂(w))``, second-order term included.

    ``w ← base_step(w, v + H u + t)`` with ``v = ∇L(w + ε̂)``, ``u = ρ J_φ(g)ᵀ v`` and ``t`` the
    explicit term of a rule whose scale depends on ``w`` (ASAM; module docstring);
    ``max_grad_norm`` clips this gradient as usual. ``ε̂`` is the optimizer's rule
    (:mod:`flatmin.optim.rules`) in its differentiable form, so Fisher-SAM and SAM-ON work too.

    Args:
        optimizer: A SAM optimizer with one ascent along the gradient after a pass at ``w``
            (SAM, GSAM, WSAM, ...; not ESAM, Momentum-SAM, multi-step ascent, FriendlySAM or
            GCSAM).
        compute_loss: Runs the forward and returns the loss; it must **not** call ``backward``
            (it runs three times: at ``w``, at ``w + ε̂``, and at ``w`` for the Hessian).
        model: If given, BatchNorm running statistics are frozen during the passes after the first
            (BatchNorm models work: the Hessian product runs before the statistics are restored).
        same_rng: Replay the RNG state so the first two passes see the same dropout masks.

    Returns:
        The loss at ``w`` (detached).

    Raises:
        TypeError: ``optimizer`` is not a :class:`~flatmin.optim.sam.SAM` of the kind above.
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
    if (
        not optimizer._lead_pass
        or optimizer._ascent_steps != 1
        or type(optimizer)._perturbed_pass is not SAM._perturbed_pass
    ):
        raise TypeError(
            f"Invalid optimizer: second-order SAM needs one ascent after a pass at w "
            f"({type(optimizer).__name__} does not; expected flatmin.SAM or a variant like GSAM)"
        )
    if not optimizer._ascends_along_grad:
        raise TypeError(
            f"Invalid optimizer: {type(optimizer).__name__} ascends along a transform of the "
            "gradient, second-order SAM differentiates ε̂ along the gradient itself (expected "
            "flatmin.SAM or a variant like GSAM)"
        )
    first_rng = RNGState.capture()

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = compute_loss()
        _check_loss(loss)
        loss.backward()
        return loss

    def add_second_order_term() -> None:
        # Called by the driver after the pass at w + ε̂, with w restored: .grad holds v.
        groups = optimizer.last_groups
        flat = [w for g in groups for w in g.params]
        if not flat:
            return
        v = [torch.zeros_like(w) if w.grad is None else w.grad for w in flat]
        after_rng = RNGState.capture()
        # Pass 3 at w, same randomness as pass 1 (the loss whose gradient defined ε̂): the graph
        # of g for H u. Pass 1's graph cannot serve: perturbing w in place invalidated it. The
        # Hessian product runs inside the frozen-BN block: restoring the statistics on exit
        # modifies buffers that the graph saved.
        first_rng.restore()
        with torch.enable_grad(), frozen_bn_stats(model):
            loss3 = compute_loss()
            g = _grads(loss3, flat, create_graph=True)
            w_leaves = [w.detach().clone().requires_grad_(True) for w in flat]
            g_leaves = [gi.detach().clone().requires_grad_(True) for gi in g]
            leaf_groups, start = [], 0
            for group in groups:
                end = start + len(group.params)
                leaf_groups.append(
                    replace(group, params=w_leaves[start:end], grads=g_leaves[start:end])
                )
                start = end
            eps_hat = [e for es in optimizer.rule.perturbation(leaf_groups, optimizer.eps)
                       for e in es]  # fmt: skip
            total = list(v)
            moved = [k for k, e in enumerate(eps_hat) if e is not None and e.requires_grad]
            if moved:
                n = len(flat)
                outs = [e for e in eps_hat if e is not None and e.requires_grad]
                vjp = torch.autograd.grad(
                    outs,
                    g_leaves + w_leaves,
                    grad_outputs=[v[k] for k in moved],
                    allow_unused=True,
                )
                u = [torch.zeros_like(w) if x is None else x for w, x in zip(flat, vjp[:n])]
                # A gradient that is constant in w has a zero Hessian row: pass None for it.
                h_u = hvp(loss3, flat, u, grads=[gi if gi.requires_grad else None for gi in g])
                for k, (hu, t) in enumerate(zip(h_u, vjp[n:])):
                    total[k] = total[k] + hu if t is None else total[k] + hu + t
            del loss3, g
        if not same_rng:
            after_rng.restore()  # the generators move on as after two passes
        for w, gi in zip(flat, total):
            w.grad = gi.detach()

    result = run_step(
        optimizer, closure, model=model, same_rng=same_rng, before_base=add_second_order_term,
        caller="second_order_step()",
    )  # fmt: skip
    return result.loss.detach()


def _check_loss(loss: Tensor) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise RuntimeError("compute_loss() must return a scalar loss that requires grad")


def _grads(loss: Tensor, params: list[Tensor], *, create_graph: bool) -> list[Tensor]:
    _check_loss(loss)
    out = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(params, out)]
