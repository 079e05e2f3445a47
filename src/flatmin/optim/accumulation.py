r"""Gradient accumulation with SAM: one perturbation for the whole (accumulated) batch.

SAM over k micro-batches ``B_1..B_k`` of a batch ``B`` must equal SAM on ``B``: accumulate the
first-pass gradient over **all** micro-batches, normalise it **once**, perturb, then accumulate
the second pass over the same micro-batches::

    g     = Σ_i c_i ∇L_{B_i}(w)            # k backward passes, c_i = |B_i| / |B| (or 1/k)
    ε̂     = ρ g / ‖g‖                       # first_step, once
    g_SAM = Σ_i c_i ∇L_{B_i}(w + ε̂)         # k backward passes at the perturbed weights
    w     ← base_step(w, g_SAM)             # second_step

Perturbing per micro-batch instead would be m-sharpness with m = |B_i|, a different objective.
The closure contract already allows it: a closure that loops over the micro-batches is one
"gradient evaluation", so ``SAM.step`` (and Lightning, and :func:`flatmin.optim.amp.sam_step_amp`)
work unchanged. :func:`accumulation_closure` builds that closure. By hand::

    for xb, yb in micro: (loss_fn(model(xb), yb) / k).backward()
    opt.first_step(zero_grad=True)
    for xb, yb in micro: (loss_fn(model(xb), yb) / k).backward()
    opt.second_step(zero_grad=True)

With BatchNorm the result differs from the full batch (statistics per micro-batch), exactly as
for plain accumulation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["accumulation_closure"]

B = TypeVar("B")


def accumulation_closure(
    optimizer: Optimizer,
    loss_fn: Callable[[B], Tensor],
    micro_batches: Sequence[B],
    *,
    weights: Sequence[float] | None = None,
    backward: Callable[[Tensor], Any] | None = None,
    ddp_model: nn.Module | None = None,
) -> Callable[[], Tensor]:
    """Return a closure that accumulates the gradient of a batch over its micro-batches.

    Each call zeroes the gradients and runs, for every micro-batch ``b_i``,
    ``backward(c_i · loss_fn(b_i))``; it returns ``Σ_i c_i · loss_fn(b_i)`` (detached). With
    mean-reduced losses and ``c_i = |b_i| / |B|`` this is the gradient of the full batch; the
    default ``c_i = 1/k`` is that for equal micro-batches. Pass it to ``SAM.step``, which calls
    it twice (same micro-batches, at ``w`` and at ``w + ε̂``).

    Args:
        optimizer: The optimizer whose gradients it zeroes (SAM).
        loss_fn: Maps one micro-batch to its (mean) loss; runs the forward, not the backward.
        micro_batches: A sequence (not a one-shot iterator: it is read twice per step).
        weights: The ``c_i``; defaults to ``1/k`` each.
        backward: Called on each weighted loss; defaults to ``loss.backward()``. With a
            ``GradScaler``: ``lambda loss: scaler.scale(loss).backward()``.
        ddp_model: The DDP module: every micro-batch but the last runs under ``no_sync()``, so
            gradients are all-reduced once per pass. Combined with ``per_replica=True`` the first
            pass is not synchronised at all.

    Returns:
        The closure.

    Raises:
        TypeError: ``micro_batches`` is not a sequence, or ``ddp_model`` has no ``no_sync()``.
        ValueError: no micro-batches, or ``weights`` has the wrong length or non-finite entries.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = flatmin.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> micro = list(zip(x.split(2), y.split(2)))
        >>> def loss_fn(b):
        ...     return torch.nn.functional.mse_loss(model(b[0]), b[1])
        >>> loss = opt.step(accumulation_closure(opt, loss_fn, micro))
    """
    if not isinstance(micro_batches, Sequence):
        raise TypeError(
            f"Invalid micro_batches: {type(micro_batches).__name__} (expected a sequence such as "
            "a list: SAM reads the micro-batches twice per step)"
        )
    k = len(micro_batches)
    if k == 0:
        raise ValueError("Invalid micro_batches: empty (expected at least one)")
    if weights is None:
        coefs = [1.0 / k] * k
    else:
        coefs = [float(c) for c in weights]
        if len(coefs) != k:
            raise ValueError(f"Invalid weights: {len(coefs)} entries for {k} micro-batches")
        if not all(math.isfinite(c) for c in coefs):
            raise ValueError(f"Invalid weights: {coefs} (expected finite values)")
    if ddp_model is not None and not callable(getattr(ddp_model, "no_sync", None)):
        raise TypeError(
            f"Invalid ddp_model: {type(ddp_model).__name__} has no no_sync() "
            "(expected a DistributedDataParallel module)"
        )
    run_backward: Callable[[Tensor], Any] = backward or Tensor.backward

    no_sync: Callable[[], Any] | None = getattr(ddp_model, "no_sync", None)

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses = []
        for i, (batch, c) in enumerate(zip(micro_batches, coefs)):
            # DDP all-reduces on the last micro-batch only: one all-reduce per pass.
            last = i == k - 1
            with contextlib.nullcontext() if no_sync is None or last else no_sync():
                loss = loss_fn(batch) * c
                run_backward(loss)
            losses.append(loss.detach())
        return torch.stack(losses).sum()

    return closure
