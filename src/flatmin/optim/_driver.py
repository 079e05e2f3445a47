r"""The one step sequence of the SAM family: passes, perturbation, restore, base step.

Every member (SAM, its variants, AMP, second-order SAM) runs a step through :func:`run_step`::

    if the step perturbs and the member has a lead pass:       # all but Momentum-SAM
        loss = closure()                  # at w (DDP per-replica: under no_sync)
        fp16: unscale, overflow? -> skip the step (nothing moved)
    for i in range(ascents):              # 1 for SAM, n for multi-step, 0 on a plain step
        first_step()                      # w <- w + ε̂  (backup of w on the first ascent)
        fp16, ESAM: scale the kept gradients back (the scaler unscales every gradient again)
        replay the RNG (same_rng); freeze BN statistics (if there was a lead pass)
        closure()                         # at the perturbed point (ESAM: data selection)
        any error -> restore w bit-exactly, re-raise
    second_step()                         # restore w, combine gradients, clip, base step
    (or, with a GradScaler: scaler.step -> second_step; overflow -> restore, skip)

A step that does not perturb (SAM every k, between SAM steps) is one pass and a plain base step.
The policies (when to perturb, which direction, how to combine the gradients, what happens at
the perturbed point) are the optimizer's hooks; this sequence exists only here.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from flatmin.optim._rng import RNGState
from flatmin.optim.bn import frozen_bn_stats
from flatmin.optim.distributed import perturbation_pass

if TYPE_CHECKING:
    from flatmin.optim.sam import SAM

__all__ = [
    "StepResult",
    "refuse_lightning_wrapper",
    "remember_grad",
    "run_step",
    "warn_on_pending_grad",
]


class StepResult(NamedTuple):
    """What a step did: the closure's value at ``w`` and whether the step was skipped.

    Public as :class:`flatmin.optim.AmpStepResult` (what :func:`~flatmin.optim.sam_step_amp`
    returns).
    """

    loss: Any
    skipped: bool


def _unscale_overflow(optimizer: SAM, scale: float) -> bool:
    """Divide the gradients by ``scale`` in place; return whether any is inf or NaN."""
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for group in optimizer.param_groups:
        for w in group["params"]:
            if w.grad is not None:
                by_device[w.grad.device].append(w.grad)
    found_any = False
    for device, grads in by_device.items():
        found = torch.zeros(1, device=device)
        inv_scale = torch.full((1,), 1.0 / scale, device=device)
        by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
        for g in grads:
            by_dtype[g.dtype].append(g)
        for same in by_dtype.values():
            # The kernel GradScaler.unscale_ uses: g *= inv_scale, found = 1 if any non-finite.
            torch._amp_foreach_non_finite_check_and_unscale_(same, found, inv_scale)
        found_any = found_any or bool(found.item())
    return found_any


def run_step(
    optimizer: SAM,
    closure: Callable[..., Any],
    *,
    model: nn.Module | None = None,
    same_rng: bool = False,
    per_replica: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    update_scaler: bool = True,
    before_base: Callable[[], None] | None = None,
    caller: str = "step(closure)",
) -> StepResult:
    """Run one step of ``optimizer`` with ``closure`` (see the module docstring).

    Args:
        optimizer: A member of the SAM family.
        closure: Zeroes the gradients, computes the loss, calls ``backward()`` and returns the
            loss (or per-sample losses). Runs under ``torch.enable_grad()``.
        model: Freezes BatchNorm statistics at the perturbed point; the DDP module for
            ``per_replica``.
        same_rng: Every pass of the step draws the same random numbers (dropout masks).
        per_replica: The lead pass runs under ``model.no_sync()`` (DDP m-sharpness).
        scaler: An enabled ``GradScaler``: unscale and check every pass; an overflow restores the
            weights and skips the step.
        update_scaler: Call ``scaler.update()`` at the end.
        before_base: Called after the weights are restored, before the gradient is combined and
            the base optimizer steps (second-order SAM adds its term there).
        caller: The public entry point, for the error message (``"sam_step_amp()"``, ...).

    Returns:
        The closure's first value (at ``w``; at the perturbed point for a member without a lead
        pass) and whether the step was skipped (fp16 overflow).

    Raises:
        RuntimeError: The optimizer is between ``first_step`` and ``second_step``.
    """
    if optimizer.perturbed:
        raise RuntimeError(f"{caller} called between first_step() and second_step()")
    optimizer._check_groups()  # before any pass: a bad value fails here and changes nothing
    warn_on_pending_grad(optimizer, closure)
    amp = scaler if scaler is not None and scaler.is_enabled() else None
    rng = RNGState.capture() if same_rng else None
    ascents = optimizer._ascents_this_step()
    lead = ascents == 0 or optimizer._lead_pass
    loss: Any = None
    try:
        if lead:
            with perturbation_pass(model, per_replica=per_replica and ascents > 0):
                loss = torch.enable_grad()(closure)()
            if ascents == 0:
                return _finish_plain(optimizer, loss, amp, update_scaler)
            if amp is not None and _overflow(optimizer, amp):
                return _skip(optimizer, loss, amp, update_scaler)
        for i in range(ascents):
            optimizer.first_step(zero_grad=optimizer._zero_grad_after_ascent)
            if amp is not None and not optimizer._zero_grad_after_ascent:
                # The kept gradients (ESAM's undrawn tensors) were unscaled for the ascent; the
                # scaler unscales every gradient again before the base step: scale them back.
                _rescale(optimizer, amp.get_scale())
            if rng is not None:
                rng.restore()
            # Without a lead pass (Momentum-SAM) the only pass is this one: its BN statistics stay.
            with frozen_bn_stats(model if lead else None):
                out = optimizer._perturbed_pass(closure, loss)
            if not lead and i == 0:
                loss = out
            if amp is not None and i < ascents - 1 and _overflow(optimizer, amp):
                optimizer.restore()
                return _skip(optimizer, loss, amp, update_scaler)
    except BaseException:
        optimizer._checked = False
        remember_grad(optimizer)  # what the failed pass left is not the user's backward
        if optimizer.perturbed:
            optimizer.restore()  # never leave the caller's weights at w + ε̂
        raise
    if amp is None:
        optimizer._second_step(before_base)
        return StepResult(loss, False)
    try:
        # unscale_ + inf check; when finite it calls optimizer.step() == second_step().
        amp.step(optimizer)
    finally:
        skipped = optimizer.perturbed
        if skipped:
            optimizer.restore()
    if skipped:
        optimizer.zero_grad()  # non-finite; a finite step leaves the gradient, as step() does
    if update_scaler:
        amp.update()
    return StepResult(loss, skipped)


def _overflow(optimizer: SAM, scaler: torch.amp.GradScaler) -> bool:
    """Unscale a pass's gradients by hand; on inf/NaN let the scaler record it, return True."""
    if not _unscale_overflow(optimizer, scaler.get_scale()):
        return False
    # The gradients are still non-finite, so unscale_ records the overflow for update().
    scaler.unscale_(optimizer)
    return True


@torch.no_grad()
def _rescale(optimizer: SAM, scale: float) -> None:
    """Multiply the gradients by ``scale`` in place (undo :func:`_unscale_overflow`)."""
    grads = [w.grad for g in optimizer.param_groups for w in g["params"] if w.grad is not None]
    if grads:
        torch._foreach_mul_(grads, scale)


def remember_grad(optimizer: SAM) -> None:
    """Note the gradient a step leaves, so the next step(closure) can tell a new one."""
    # A weak reference: the sentinel must not keep a gradient alive after zero_grad().
    optimizer._left_grad = next(
        ((w, weakref.ref(w.grad), w.grad._version) for g in optimizer.param_groups
         for w in g["params"] if w.grad is not None),
        None,
    )  # fmt: skip


# Where Lightning's automatic optimization keeps the closure it hands to ``optimizer.step``,
# wrapped by its precision plugin as partial(Precision._wrap_closure, module, optimizer, Closure).
# Matched by module name: flatmin.optim never imports a trainer.
_LIGHTNING_LOOPS = ("lightning.pytorch.loops.", "pytorch_lightning.loops.")
_LIGHTNING_WRAPPERS = ("lightning.pytorch.core.", "pytorch_lightning.core.")


def _from_lightning_loop(closure: Any) -> bool:
    parts = [closure, *closure.args] if isinstance(closure, functools.partial) else [closure]
    return any(type(part).__module__.startswith(_LIGHTNING_LOOPS) for part in parts)


def refuse_lightning_wrapper(optimizer: Any, name: str) -> None:
    """Refuse ``first_step``/``second_step`` called on Lightning's optimizer wrapper.

    Raises:
        RuntimeError: ``optimizer`` is Lightning's ``LightningOptimizer`` (``self.optimizers()``).
    """
    if type(optimizer).__module__.startswith(_LIGHTNING_WRAPPERS):
        raise RuntimeError(
            f"{name}() called on Lightning's optimizer wrapper (self.optimizers()): Lightning does "
            "not count it as an optimizer step (global_step, max_steps, LR schedulers and "
            "checkpoints stay put). Subclass flatmin.integrations.lightning.SAMModule instead of "
            "LightningModule and call self.sam_step(closure) (docs/integrations/lightning.md)"
        )


def warn_on_pending_grad(optimizer: SAM, closure: Any = None) -> None:
    """Warn once when ``step(closure)`` finds a gradient computed before it was called.

    Raises:
        RuntimeError: The closure comes from Lightning's automatic optimization: the gradient is
            that of earlier micro-batches (``accumulate_grad_batches > 1``), which a plain
            ``LightningModule`` mixes into SAM's first pass only.
    """
    lightning = closure is not None and _from_lightning_loop(closure)
    if optimizer._pending_grad_warned and not lightning:
        return
    found = None
    if optimizer._left_grad is not None:
        w, grad, version = optimizer._left_grad
        if w.grad is not None and (w.grad is not grad() or w.grad._version != version):
            found = w.grad
    else:
        found = next(
            (w.grad for g in optimizer.param_groups for w in g["params"] if w.grad is not None),
            None,
        )
    # Only here, on the unusual path, a device sync: zeroed gradients are not a pass.
    if found is None or not bool(found.ne(0).any()):
        return
    name = type(optimizer).__name__
    if lightning:
        raise RuntimeError(
            f"{name}.step(closure) was called by Lightning with the gradients of earlier "
            "micro-batches in .grad (accumulate_grad_batches > 1): with a plain LightningModule, "
            "ε̂ would come from all of them and the second pass from the last micro-batch alone, "
            "a wrong SAM step. Subclass flatmin.integrations.lightning.SAMModule instead of "
            "LightningModule (it runs both passes over the whole accumulated batch), or set "
            "accumulate_grad_batches=1"
        )
    optimizer._pending_grad_warned = True
    warnings.warn(
        f"{name}.step(closure) found gradients computed before it was "
        "called. step(closure) runs every pass itself (the closure at w, then at the "
        "perturbed point), so a backward() before it is an extra pass whose gradient is "
        "added to the first (davda54/sam's usage). Remove that backward, or drive the "
        "step by hand with first_step()/second_step(). (Warned once.)",
        UserWarning,
        stacklevel=3,
    )


def _finish_plain(
    optimizer: SAM, loss: Any, scaler: torch.amp.GradScaler | None, update: bool
) -> StepResult:
    """One pass done, no perturbation this step: the base step (through the scaler if any)."""
    if scaler is None:
        optimizer._plain_step()
        return StepResult(loss, False)
    optimizer._plain_pending = True
    try:
        scaler.step(optimizer)  # finite: optimizer.step() takes the pending plain step
    finally:
        skipped = optimizer._plain_pending
        optimizer._plain_pending = False
    if skipped:
        optimizer.zero_grad()
    if update:
        scaler.update()
    return StepResult(loss, skipped)


def _skip(optimizer: SAM, loss: Any, scaler: torch.amp.GradScaler, update: bool) -> StepResult:
    optimizer.zero_grad()
    if update:
        scaler.update()
    return StepResult(loss, True)
