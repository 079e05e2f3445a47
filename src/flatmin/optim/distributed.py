r"""SAM under ``torch.nn.parallel.DistributedDataParallel`` (DDP): global and per-replica modes.

DDP all-reduces (averages) gradients during ``backward``. SAM runs two backward passes per step,
so there are two ways to perturb:

* **global** (DDP's default, nothing to do): the first-pass gradient is averaged over all
  replicas, every replica computes the same ``ε̂``, and the step equals single-process SAM on the
  concatenated batch (for a model without BatchNorm, whose statistics are per replica)::

      loss = opt.step(closure)

* **per-replica** (m-sharpness with m = the per-replica batch, Foret et al. §4.1; one
  all-reduce fewer per step): the first forward *and* backward run under ``ddp_model.no_sync()``,
  so each replica perturbs with its own gradient ``g_k``; the second pass is synchronised, so the
  base step uses ``mean_k ∇L_k(w + ε̂_k)`` and the parameters stay identical on every rank::

      loss = opt.step(closure, model=ddp_model, per_replica=True)

The update rule of the per-replica mode, with K replicas and shard losses ``L_k``:

.. math::

    \hat\epsilon_k = \rho\, g_k / \|g_k\|_2, \quad
    w \leftarrow \mathrm{base\_step}\Big(w,\ \tfrac1K \sum_k \nabla L_k(w + \hat\epsilon_k)\Big).

References:
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021, arXiv:2010.01412 (m-sharpness). Andriushchenko & Flammarion, "Towards
    Understanding Sharpness-Aware Minimization", ICML 2022, arXiv:2206.06232.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["perturbation_pass"]


@contextmanager
def perturbation_pass(model: nn.Module | None, *, per_replica: bool) -> Iterator[None]:
    """Context for SAM's first forward and backward pass (the one that defines ``ε̂``).

    With ``per_replica=True`` it is ``model.no_sync()``: DDP skips the gradient all-reduce, so
    each replica's ``.grad`` holds its own shard's gradient. Otherwise it does nothing (global
    mode). The forward must run inside the block too: DDP decides at forward time whether the
    coming backward synchronises.

    Args:
        model: The ``DistributedDataParallel`` module (may be ``None`` if not ``per_replica``).
        per_replica: Perturb each replica with its own gradient.

    Raises:
        TypeError: ``per_replica`` is not a bool, or ``per_replica=True`` and ``model`` has no
            ``no_sync()`` (it is not wrapped in DDP).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> with perturbation_pass(model, per_replica=False):
        ...     model(torch.ones(1, 2)).sum().backward()
    """
    if not isinstance(per_replica, bool):
        raise TypeError(f"Invalid per_replica: {per_replica!r} (expected a bool)")
    if not per_replica:
        yield
        return
    no_sync = getattr(model, "no_sync", None)
    if not callable(no_sync):
        raise TypeError(
            "per_replica=True needs the DistributedDataParallel module as model "
            f"(got {type(model).__name__}, which has no no_sync())"
        )
    with no_sync():
        yield
