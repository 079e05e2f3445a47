"""BatchNorm helpers: SAM's second pass, and statistics for averaged weights.

SAM's second forward pass runs at the perturbed weights ``w + ε̂``. In training mode every
BatchNorm layer would then update its running statistics a second time per step, with statistics
of a network that is never deployed. :func:`frozen_bn_stats` keeps them exactly as the first pass
left them, while the pass itself still normalises with the batch statistics (as SAM intends).

Averaged weights (SWA, WASAM, FGE members) need statistics of their own:
:func:`recompute_bn_stats` recomputes them over a loader of any batch structure
(:func:`call_model`), all-reduced across ranks under DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "ForwardFn",
    "bn_modules",
    "call_model",
    "frozen_bn_stats",
    "recompute_bn_stats",
]

ForwardFn = Callable[[nn.Module, Any], Any]


def bn_modules(model: nn.Module) -> list[_BatchNorm]:
    """Return the BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_bn_stats(model: nn.Module | None) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged inside the block, bit for bit.

    Snapshots ``running_mean``, ``running_var`` and ``num_batches_tracked`` of every BatchNorm
    layer and copies them back on exit (also on error). Copying back, instead of setting
    ``momentum = 0``, is exact for ``momentum=None`` (cumulative averaging, which reads
    ``num_batches_tracked``) and for non-finite batch statistics (``0 · nan`` is ``nan``), works
    under ``torch.compile`` (no attribute changes that trigger recompilation) and puts nothing on
    the user's modules. Costs one copy of the (small) BN buffers.

    Args:
        model: The model, or ``None`` for a no-op.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> with frozen_bn_stats(model):
        ...     _ = model(torch.randn(8, 4))  # running stats unchanged afterwards
    """
    if model is None:
        yield
        return
    saved = []
    for module in bn_modules(model):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buf = getattr(module, name, None)
            if isinstance(buf, torch.Tensor):
                saved.append((buf, buf.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)


def _move(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device) for v in obj)
    return obj


def call_model(
    model: nn.Module,
    batch: Any,
    forward_fn: ForwardFn | None = None,
    device: torch.device | str | None = None,
) -> Any:
    """Run ``model`` on one batch of any structure (shared by ``update_bn`` and FGE).

    ``forward_fn(model, batch)`` wins when given (and receives the batch untouched). Otherwise a
    tensor is passed as is, a tuple/list contributes its first element (``(inputs, targets)``) and
    a mapping is unpacked as keyword arguments (``model(**batch)``); ``device`` moves the selected
    inputs first.

    Raises:
        TypeError: The batch is none of the above and no ``forward_fn`` was given.
    """
    if forward_fn is not None:
        return forward_fn(model, batch)
    dev = None if device is None else torch.device(device)
    if isinstance(batch, Tensor):
        return model(_move(batch, dev))
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise TypeError("Invalid batch: an empty tuple/list (expected (inputs, ...))")
        return model(_move(batch[0], dev))
    if isinstance(batch, Mapping):
        return model(**_move(dict(batch), dev))
    raise TypeError(
        f"Invalid batch type: {type(batch).__name__} (expected a tensor, a tuple/list whose first "
        "element is the input, or a dict of keyword arguments; or pass forward_fn)"
    )


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Recompute BatchNorm running statistics of ``model`` in place, over ``loader``.

    Every BN layer with running statistics is reset and the model runs in train mode with
    ``momentum=None`` (a cumulative average over batches, as
    :func:`torch.optim.swa_utils.update_bn` does). BN momenta and the train/eval mode of every
    submodule are restored afterwards; the new statistics stay. Under ``torch.distributed`` with
    several processes the statistics are all-reduced, weighted by each rank's number of batches,
    so every rank ends with what one process over all ranks' batches would compute (every rank
    must call it).

    Args:
        model: The network (its BN layers are updated).
        loader: Any iterable of batches; see :func:`call_model` for the structures understood.
        forward_fn: ``forward_fn(model, batch)`` runs the forward pass for any batch structure.
        max_batches: Use at most this many batches (per rank).
        device: Move default-dispatched inputs to this device.

    Raises:
        ValueError: ``max_batches < 1``, or no batch at all reached the BN layers.
        TypeError: A batch has an unsupported structure and no ``forward_fn`` was given.
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"Invalid max_batches: {max_batches!r} (expected None or an int >= 1)")
    bns = bn_modules(model)
    if not bns:
        return
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            call_model(model, batch, forward_fn, device)
        _all_reduce_bn_stats(bns)
        if any(int(m.num_batches_tracked) == 0 for m in bns):  # type: ignore[arg-type]
            raise ValueError("update_bn() saw no batch: the loader is empty")
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for module, training in modes.items():
            module.training = training


def _all_reduce_bn_stats(bns: list[_BatchNorm]) -> None:
    """Combine cumulative BN statistics across ranks as one process over all batches would.

    With ``momentum=None`` each rank holds the mean over its ``B_r`` batches of the per-batch mean
    and unbiased variance. One process over the union of the batches would hold
    ``Σ_r B_r · stat_r / Σ_r B_r`` — the sums are all-reduced in float64, in one call.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = bns[0].running_mean.device  # type: ignore[union-attr]
    parts = []
    for m in bns:
        nb = m.num_batches_tracked.to(device, torch.float64)  # type: ignore[union-attr]
        parts.append(nb.reshape(1))
        parts.append(m.running_mean.to(device, torch.float64) * nb)  # type: ignore[union-attr]
        parts.append(m.running_var.to(device, torch.float64) * nb)  # type: ignore[union-attr]
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    offset = 0
    with torch.no_grad():
        for m in bns:
            mean, var = m.running_mean, m.running_var
            if mean is None or var is None:  # excluded by the caller (track_running_stats)
                continue
            k = mean.numel()
            total = flat[offset]
            denom = total if total > 0 else torch.ones_like(total)
            mean.copy_(flat[offset + 1 : offset + 1 + k] / denom)
            var.copy_(flat[offset + 1 + k : offset + 1 + 2 * k] / denom)
            m.num_batches_tracked.copy_(total.round().to(torch.long))  # type: ignore[union-attr]
            offset += 1 + 2 * k
