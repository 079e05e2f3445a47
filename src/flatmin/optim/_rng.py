"""Replay the global RNG state, so that both SAM passes draw the same random numbers.

``nn.Dropout`` and friends draw from the global CPU generator (and the CUDA generators on GPU).
Foret et al.'s JAX code uses one dropout key per step, so the gradient at ``w + ε̂`` sees the same
masks as the gradient at ``w``. :class:`RNGState` snapshots the generators before the first pass
and puts them back before the second; afterwards the generators stand where one pass left them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RNGState"]


@dataclass(frozen=True)
class RNGState:
    """A snapshot of the CPU generator and, when CUDA is initialised, of every CUDA generator."""

    cpu: Tensor
    cuda: tuple[Tensor, ...] | None

    @classmethod
    def capture(cls) -> RNGState:
        """Snapshot the global generators now (CUDA only if it is already initialised)."""
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = tuple(torch.cuda.get_rng_state_all())
        return cls(torch.random.get_rng_state(), cuda)

    def restore(self) -> None:
        """Put the global generators back to this snapshot."""
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(list(self.cuda))
