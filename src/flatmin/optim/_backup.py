"""The copy of ``w`` that a SAM step keeps while the weights sit at ``w + ε̂``.

Restoring copies the saved values back (bit-exact; never ``w − ε̂``, which rounds). Buffers are
cached per parameter and the last set of parameters is remembered by identity, so a step with a
stable set allocates nothing and scans nothing per tensor. A sharded (DTensor) path would copy
local shards here as well; nothing else in the family touches the backup.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["WeightBackup"]


def copy_(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    """Bit-exact ``dst ← src``, with one ``_foreach_copy_`` or a per-tensor loop."""
    if not dst:
        return
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


class WeightBackup:
    """Saved weights of the tensors a step moved, and the way back."""

    def __init__(self) -> None:
        self._buffers: dict[Tensor, Tensor] = {}
        # (ids of params, buffers, uniform device/dtype) of the last save: reused when stable.
        self._plan: tuple[list[int], list[Tensor], bool] | None = None
        #: The moved tensors and their saved values (empty when nothing is saved).
        self.saved: tuple[list[Tensor], list[Tensor]] = ([], [])

    def _buffers_for(self, params: list[Tensor]) -> tuple[list[Tensor], bool]:
        ids = list(map(id, params))
        cached = self._plan
        if cached is not None and cached[0] == ids:
            return cached[1], cached[2]
        # A new set of tensors: check it once (a parameter's gradient layout is fixed by its
        # module, e.g. Embedding(sparse=True)), then build and cache its buffers.
        if any(w.grad is not None and w.grad.is_sparse for w in params):
            raise RuntimeError(
                "SAM does not support sparse gradients; use a dense embedding "
                "(sparse=False) for the parameters that SAM perturbs"
            )
        buffers = []
        for w in params:
            buf = self._buffers.get(w)
            if buf is None or buf.shape != w.shape or buf.dtype != w.dtype:
                buf = self._buffers[w] = torch.empty_like(w, memory_format=torch.preserve_format)
            buffers.append(buf)
        uniform = len({(w.device, w.dtype) for w in params}) <= 1
        self._plan = (ids, buffers, uniform)
        return buffers, uniform

    def save(self, params: list[Tensor], *, foreach: bool, extend: bool = False) -> bool:
        """Save ``params`` before they move; return whether they share one device and dtype.

        Args:
            params: The tensors about to move.
            foreach: Copy with one multi-tensor kernel.
            extend: A later ascent of the same step (multi-step): keep what is saved and add
                only the tensors that have not moved yet.
        """
        if not extend:
            buffers, uniform = self._buffers_for(params) if params else ([], True)
            copy_(buffers, params, foreach)
            self.saved = (params, buffers)
            return uniform
        saved, buffers = self.saved
        known = set(map(id, saved))
        new = [w for w in params if id(w) not in known]
        if new:
            self.saved = (saved + new, buffers + [w.detach().clone() for w in new])
        return len({(w.device, w.dtype) for w in params}) <= 1

    def restore(self, *, foreach: bool) -> None:
        """Copy the saved values back and forget them."""
        params, buffers = self.saved
        copy_(params, buffers, foreach)
        self.saved = ([], [])

    @contextmanager
    def original(self, *, foreach: bool) -> Iterator[None]:
        """The saved values in the tensors inside the block; the moved values back afterwards."""
        params, buffers = self.saved
        with torch.no_grad():
            current = [w.detach().clone() for w in params]
            copy_(params, buffers, foreach)
        try:
            yield
        finally:
            with torch.no_grad():
                copy_(params, current, foreach)

    def forget_plan(self) -> None:
        """Drop the cached parameter set (after a load: the groups are new objects)."""
        self._plan = None
