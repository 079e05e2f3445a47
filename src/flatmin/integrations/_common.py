"""What the trainer integrations share: finding SAM behind wrappers, RNG replay, fp16 unscaling.

A trainer that owns the optimizer step (Lightning's precision plugins, accelerate's
``AcceleratedOptimizer``) calls ``optimizer.step()`` once, after the gradients are in ``.grad``.
With a ``GradScaler`` it unscales once and steps once. The integrations therefore run SAM's two
passes *before* that call — first pass, :func:`unscale_first_pass_`, ``first_step``, second
pass — and let the trainer's ``optimizer.step()`` finish the step: ``SAM.step()`` without a
closure after ``first_step`` is ``second_step``. That is :func:`flatmin.optim.amp.sam_step_amp`
with the trainer's own scaler, unscale and update.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from flatmin.optim import ESAM, SAM, SAMEveryK
from flatmin.optim._rng import RNGState

__all__ = ["RNGSnapshot", "find_sam", "require_two_pass", "unscale_first_pass_"]


def find_sam(optimizer: Any) -> SAM | None:
    """The :class:`~flatmin.SAM` behind trainer wrappers (``.optimizer`` chains), or ``None``.

    Lightning's ``LightningOptimizer`` and accelerate's ``AcceleratedOptimizer`` both expose the
    wrapped optimizer as ``.optimizer`` (Lightning's wrapper even passes ``isinstance`` checks
    for the class it wraps, so unwrap first).
    """
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, SAM) else None


def require_two_pass(sam: SAM, where: str) -> None:
    """Refuse the SAM variants whose step is not "first pass, first_step, second pass, step".

    Raises:
        TypeError: ``sam`` is an ESAM (its ``step`` takes per-sample losses, not a closure), or
            a SAMEveryK / LookSAM (its in-between steps take one pass and ``plain_step()``, which
            a trainer's single ``optimizer.step()`` cannot express).
    """
    if isinstance(sam, ESAM):
        raise TypeError(
            f"Invalid optimizer: ESAM is not supported {where} (its step needs per-sample losses "
            "through ESAM.step(loss_fn), which the trainer's closure cannot provide); use SAM"
        )
    if isinstance(sam, SAMEveryK):
        raise TypeError(
            f"Invalid optimizer: {type(sam).__name__} is not supported {where} (its in-between "
            "steps run one pass and plain_step(), which the trainer's optimizer.step() cannot "
            "express); use SAM or WASAM"
        )


# One dropout key per SAM step: the snapshot the optimizers' own step driver uses.
RNGSnapshot = RNGState


@torch.no_grad()
def unscale_first_pass_(sam: SAM, scaler: Any) -> bool:
    """Unscale the first-pass gradients in place; return whether any of them is inf or NaN.

    ``GradScaler.unscale_`` may run once per update and the trainer runs it on the second pass,
    so the first pass is unscaled with the kernel ``unscale_`` itself uses. ε̂ is invariant to the
    gradient's scale, but an overflow must be caught before ``first_step`` moves the weights.
    """
    inv_scale = 1.0 / float(scaler.get_scale())
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for group in sam.param_groups:
        for w in group["params"]:
            if w.grad is not None:
                by_key[(w.grad.device, w.grad.dtype)].append(w.grad)
    found_any = False
    for (device, _), grads in by_key.items():
        found = torch.zeros(1, device=device)
        inv = torch.full((1,), inv_scale, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
        found_any = found_any or bool(found.item())
    return found_any
