r"""SAM with fp16 mixed precision and ``torch.amp.GradScaler``.

``GradScaler.step(optimizer)`` unscales once and steps once; SAM has two backward passes, and an
overflow in either must cancel the whole step. :func:`sam_step_amp` does, per SAM step::

    closure()                      # forward under autocast, scaler.scale(loss).backward()
    unscale g, check for inf/NaN   # by hand: GradScaler allows one unscale_ per update
    overflow? -> skip (weights never moved), scale backs off
    first_step()                   # w + ε̂ from the unscaled gradient
    closure()                      # second pass, BN statistics frozen
    scaler.step(opt)               # unscale_ + check; finite: second_step (restore, base step)
    overflow? -> restore w bit-exactly, no base step
    scaler.update()                # once per SAM step: grow or back off the scale

The sequence is the family's one step driver (:mod:`flatmin.optim._driver`) with a scaler, so it
holds for every member (SAMEveryK's one-pass steps, Momentum-SAM, multi-step ascent: every pass is
unscaled and checked). bf16 autocast needs no scaler: run ``opt.step(closure)`` with the forward
under ``torch.autocast(device_type, dtype=torch.bfloat16)``.

References:
    Micikevicius et al., "Mixed Precision Training", ICLR 2018, arXiv:1710.03740.
    Foret et al., "Sharpness-Aware Minimization", ICLR 2021, arXiv:2010.01412.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flatmin.optim._driver import StepResult, run_step
from flatmin.optim.sam import SAM

__all__ = ["AmpStepResult", "sam_step_amp"]


#: What :func:`sam_step_amp` did: ``(loss, skipped)``, the loss at ``w`` and whether the step
#: was skipped (the family's one step result, :class:`flatmin.optim._driver.StepResult`).
AmpStepResult = StepResult


def sam_step_amp(
    optimizer: SAM,
    scaler: torch.amp.GradScaler,
    closure: Callable[..., Any],
    *,
    model: nn.Module | None = None,
    same_rng: bool = False,
    per_replica: bool = False,
    update: bool = True,
) -> AmpStepResult:
    """One SAM step with a ``GradScaler``: unscale each pass, skip the step on any overflow.

    ``closure`` zeroes the gradients, runs the forward under ``torch.autocast``, calls
    ``scaler.scale(loss).backward()`` and returns the (unscaled) loss. It runs as often as the
    optimizer's step needs (twice for SAM; once on SAMEveryK's in-between steps and for
    Momentum-SAM). If the first pass overflows, the weights are never perturbed; if a later one
    does, they are restored bit-exactly from SAM's backup. Either way the base optimizer does not
    step (its state, e.g. momentum, is untouched), the non-finite gradients are cleared and the
    scale backs off once.
    With a disabled scaler this is ``optimizer.step(closure, ...)``.

    Args:
        optimizer: Any member of the SAM family.
        scaler: A ``torch.amp.GradScaler`` (or ``torch.cuda.amp.GradScaler``) used only by this
            optimizer between two updates.
        closure: As above.
        model: The model, to freeze BatchNorm statistics in the second pass (and the DDP module
            for ``per_replica``).
        same_rng: Both passes see the same dropout masks (as ``SAM.step``).
        per_replica: DDP per-replica perturbation (as ``SAM.step``).
        update: Call ``scaler.update()`` at the end (once per SAM step). Pass ``False`` when
            several optimizers share the scaler and you call ``update()`` yourself.

    Returns:
        The loss at ``w`` and whether the step was skipped for an overflow.

    Raises:
        TypeError: ``optimizer`` is not a :class:`~flatmin.optim.sam.SAM`.
        RuntimeError: ``optimizer`` is already between ``first_step`` and ``second_step``.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = flatmin.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> def closure():
        ...     opt.zero_grad()
        ...     with torch.autocast("cpu", dtype=torch.bfloat16):
        ...         loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     scaler.scale(loss).backward()
        ...     return loss
        >>> loss, skipped = sam_step_amp(opt, scaler, closure)
    """
    if not isinstance(optimizer, SAM):
        raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected flatmin.SAM)")
    return run_step(
        optimizer, closure, model=model, same_rng=same_rng, per_replica=per_replica,
        scaler=scaler, update_scaler=update, caller="sam_step_amp()",
    )  # fmt: skip
