"""Reductions and fused updates over lists of tensors, without host syncs.

Every global reduction of the SAM family (the norm of ``ε̂``, the dot products and norms of the
variants) and every scaled update goes through here: the one place where a sharded (DTensor /
FSDP2) path would reduce its local partial sums across the mesh.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["add_scaled_", "dot", "split_by_device_dtype", "sum_pow_q", "sum_sq", "wide_dtype"]


def split_by_device_dtype(
    *lists: Sequence[Tensor], uniform: bool = False
) -> list[tuple[list[Tensor], ...]]:
    """Split aligned tensor lists by the (device, dtype) of the first list.

    ``torch._foreach_*`` ops want one device and dtype per call. ``uniform=True`` promises that
    all tensors already share one (SAM checks it once per set of parameters), which skips the
    per-tensor scan: on an accelerator that Python loop costs more than the kernels.
    """
    if uniform or not lists[0]:
        return [tuple(list(t) for t in lists)]
    index: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(lists[0]):
        index[(t.device, t.dtype)].append(i)
    return [tuple([t[i] for i in idx] for t in lists) for idx in index.values()]


def sum_pow_q(hs: list[Tensor], q: float, dtype: torch.dtype, uniform: bool) -> Tensor:
    """Return Σ_i ‖h_i‖_q^q as one 0-d tensor, without a host sync."""
    partial = []
    for (sub,) in split_by_device_dtype(hs, uniform=uniform):
        norms = torch._foreach_norm(sub, q, dtype=dtype)
        partial.append(torch.stack(norms).pow(q).sum())
    if len(partial) == 1:
        return partial[0]
    device = partial[0].device
    return torch.stack([s.to(device) for s in partial]).sum()


def sum_sq(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ‖t‖² over ``tensors`` as a 0-d tensor on the first tensor's device (no host sync)."""
    device = tensors[0].device
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack([n.to(device) for n in norms]).square().sum()


def dot(a: Sequence[Tensor], b: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ as a 0-d tensor on the first tensor's device (no host sync)."""
    device = a[0].device
    return torch.stack(
        [
            torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)).to(device)
            for x, y in zip(a, b)
        ]
    ).sum()


def wide_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (the accumulation dtype of reductions)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _fused_addcmul(device: torch.device) -> bool:
    # On CPU the foreach ops loop over tensors anyway, so one fused addcmul per tensor (one pass
    # over memory) wins; on accelerators a broadcast 0-d operand leaves the multi-tensor fast path.
    return device.type == "cpu"


def add_scaled_(
    tensors: Sequence[Tensor],
    others: Sequence[Tensor],
    scale: Tensor,
    *,
    uniform: bool = False,
    scratch_others: bool = False,
) -> None:
    """``t ← t + s·o`` for every pair, with ``s`` a 0-d tensor: no host sync, no ``.item()``.

    On CPU one fused ``addcmul`` per tensor (one pass, no temporary). Elsewhere ``_foreach_mul``
    into one temporary plus ``_foreach_add_``, which keeps the multi-tensor fast path (a broadcast
    0-d operand would fall back to one kernel launch per tensor); with ``scratch_others`` the
    product goes into ``others`` in place instead, with no temporary at all.

    Args:
        tensors: Updated in place.
        others: Same shapes as ``tensors``.
        scale: A 0-d tensor on any device; it is moved to each tensor's device and dtype.
        uniform: All tensors share one device and dtype (see :func:`split_by_device_dtype`).
        scratch_others: ``others`` may be overwritten (e.g. gradients about to be cleared).
    """
    for ts, os in split_by_device_dtype(tensors, others, uniform=uniform):
        if not ts:
            continue
        s = scale.to(device=ts[0].device, dtype=ts[0].dtype)
        if _fused_addcmul(ts[0].device):
            torch._foreach_addcmul_(ts, os, [s] * len(ts))
        elif scratch_others:
            torch._foreach_mul_(os, s)
            torch._foreach_add_(ts, os)
        else:
            torch._foreach_add_(ts, torch._foreach_mul(os, s))
