"""BatchNorm helpers for optimizers that run a second forward pass (SAM and its variants).

SAM's second forward pass runs at the perturbed weights ``w + ε̂``. In training mode every
BatchNorm layer would then update its running statistics a second time per step, with statistics
of a network that is never deployed. :func:`frozen_bn_stats` keeps them exactly as the first pass
left them, while the pass itself still normalises with the batch statistics (as SAM intends).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["bn_modules", "frozen_bn_stats"]


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
