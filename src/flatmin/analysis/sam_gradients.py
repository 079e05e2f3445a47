"""First- versus second-order SAM gradients (Foret et al. 2021, Fig. 5)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from flatmin._curvature import hvp, tensors_to_flat
from flatmin.analysis._common import (
    Batch,
    BNMode,
    LossFn,
    forward,
    model_device,
    preserved,
    set_eval_mode,
    to_device,
)
from flatmin.analysis.results import SAMGradientResult
from flatmin.optim.rules import LpBall, PerturbGroup

__all__ = ["sam_gradients"]


def sam_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    rho: float,
    *,
    bn_mode: BNMode = "eval",
) -> SAMGradientResult:
    r"""SAM's first-order gradient, the full (second-order) gradient and their cosine.

    With ``g = ∇L(w)`` and ``ε̂(w) = ρ g / ‖g‖₂`` (Foret et al. eq. 2),

    .. math::
        g_1 = \nabla L(w)\big|_{w+\hat\epsilon}, \qquad
        g_2 = \frac{d}{dw} L(w + \hat\epsilon(w))
            = g_1 + \Big(\frac{d\hat\epsilon}{dw}\Big)^{\!\top} g_1
            = g_1 + \frac{\rho}{\|g\|} H(w)\,\big(g_1 - \hat g\,\hat g^\top g_1\big),

    since ``dε̂/dw = (ρ/‖g‖)(I − ĝĝᵀ) H`` with ``ĝ = g/‖g‖`` and ``H`` symmetric. SAM drops the
    second term; the cosine between ``g_1`` and ``g_2`` shows how much that changes the direction.
    ``H(w) u`` is one double-backward product (:func:`flatmin._curvature.hvp`). If ``g = 0`` the
    perturbation is zero and ``g_2 = g_1 = 0`` (``ε̂`` is not differentiable there).

    Args:
        model: The network; restored exactly on return.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batch: One ``(inputs, targets)``.
        rho: Neighbourhood radius ``ρ`` ≥ 0.
        bn_mode: ``"eval"`` (running statistics) or ``"batch"`` (BatchNorm batch statistics, as
            during SAM training).

    Returns:
        :class:`SAMGradientResult` with flattened ``gradient``, ``first_order``,
        ``second_order`` (trainable parameters in ``parameters()`` order) and ``cosine``.

    Raises:
        ValueError: for a negative ``rho``.

    References:
        Foret, Kleiner, Mobahi, Neyshabur 2021, "Sharpness-Aware Minimization for Efficiently
        Improving Generalization" (arXiv:2010.01412), Sec. 2 and Fig. 5.

    Example:
        >>> net = nn.Linear(4, 3).double()
        >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        >>> res = sam_gradients(net, nn.functional.cross_entropy, (x, y), rho=0.05)
        >>> -1.0 <= res.cosine <= 1.0
        True
    """
    if not (isinstance(rho, (int, float)) and rho >= 0):
        raise ValueError(f"Invalid rho: {rho!r} (expected >= 0)")
    with preserved(model):
        set_eval_mode(model, bn_mode)
        inputs, targets = to_device(batch, model_device(model))
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("Invalid model: no parameter requires a gradient")
        params = [p for _, p in named]
        with torch.enable_grad():
            loss = loss_fn(forward(model, inputs), targets)
            raw = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, raw)]
        # ε̂ is the optimizers' rule (flatmin.optim.rules), on gradient leaves so that its
        # Jacobian comes from autograd: u = (dε̂/dg)ᵀ g_1, and g_2 = g_1 + H u.
        g_leaves = [g.clone().requires_grad_(True) for g in grads]
        with torch.enable_grad():
            group = PerturbGroup(list(params), g_leaves, float(rho), 2.0, False, 0.0)
            eps_hat = [e for e in LpBall().perturbation([group], eps=0.0)[0] if e is not None]
        # Evaluate at w + ε̂ through functional_call: writing into the parameters in place would
        # invalidate the graph of ∇L(w) that the Hessian-vector product below still needs.
        shifted = {
            k: (p.detach() + e.detach()).requires_grad_() for (k, p), e in zip(named, eps_hat)
        }
        args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        with torch.enable_grad():
            pert_loss = loss_fn(functional_call(model, shifted, tuple(args)), targets)
            first = torch.autograd.grad(pert_loss, list(shifted.values()), allow_unused=True)
        first_list = [torch.zeros_like(p) if g is None else g for p, g in zip(params, first)]
        # g = 0 exactly: ε̂ = 0 and is not differentiable (a norm at 0), so g_2 = g_1.
        if rho > 0 and any(bool(g.ne(0).any()) for g in grads):
            u = torch.autograd.grad(eps_hat, g_leaves, grad_outputs=first_list, allow_unused=True)
            u_list = [torch.zeros_like(p) if v is None else v for p, v in zip(params, u)]
            hu = hvp(loss, params, u_list, grads=list(raw))
            second_list = [g1 + h for g1, h in zip(first_list, hu, strict=True)]
        else:
            second_list = [g.clone() for g in first_list]
        gflat = tensors_to_flat(grads).detach().double()
        f1 = tensors_to_flat(first_list).detach().double()
        f2 = tensors_to_flat(second_list).detach().double()
        denom = float(f1.norm() * f2.norm())
        cosine = float(f1 @ f2) / denom if denom > 0 else float("nan")
        return SAMGradientResult(
            gradient=gflat.cpu().numpy(),
            first_order=f1.cpu().numpy(),
            second_order=f2.cpu().numpy(),
            cosine=cosine,
            loss=float(loss.detach()),
            perturbed_loss=float(pert_loss.detach()),
            settings={"rho": float(rho), "bn_mode": bn_mode, "n_params": int(gflat.numel())},
        )
