"""Train-time image augmentation on batched tensors: random crop after padding, horizontal flip.

:class:`CropFlip` is the "basic augmentation" of the flat-minima papers (Foret et al. 2021,
arXiv 2010.01412; Kaddour et al. 2022, arXiv 2202.00661): pad each image by ``padding`` pixels,
cut a window of the original size at a random offset, and mirror it left-right with probability
½. A recipe that sets ``augment`` (:class:`flatmin.tasks.Recipe`) applies it to the training
stream only; validation, test and the training-set evaluation see the images as stored.

The random draws are separated from their application (:meth:`CropFlip.draw`,
:meth:`CropFlip.apply`) so that several processes sharing one batch can draw for the whole batch
and each apply its own slice: the shards of a step are then exactly the augmented batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["CropFlip", "Draws"]

#: Per-image draws of one batch: row offset, column offset (both in ``0 .. 2·padding``), flip.
Draws = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CropFlip:
    """Random crop with ``padding`` pixels of edge padding, then a random horizontal flip.

    The padding repeats the border pixels (torchvision's ``padding_mode="edge"``): the inputs
    are standardised, so a constant such as 0 would not be the background colour.

    Attributes:
        padding: pixels added on every side before cropping back to the original size (0: no
            crop).
        flip: mirror each image left-right with probability ½.

    Example:
        >>> aug = CropFlip(padding=2)
        >>> aug(torch.zeros(8, 1, 28, 28), torch.Generator().manual_seed(0)).shape
        torch.Size([8, 1, 28, 28])
    """

    padding: int = 2
    flip: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"Invalid padding: {self.padding!r} (expected an int >= 0)")
        if not isinstance(self.flip, bool):
            raise TypeError(f"Invalid flip: {self.flip!r} (expected a bool)")

    def draw(self, n: int, generator: torch.Generator) -> Draws:
        """The random offsets and flips of ``n`` images, drawn from ``generator``."""
        span = 2 * self.padding + 1
        rows = torch.randint(0, span, (n,), generator=generator)
        cols = torch.randint(0, span, (n,), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        return rows, cols, flips & self.flip

    def apply(self, images: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Crop and flip ``images`` ``(N, C, H, W)`` as ``draws`` (from :meth:`draw`) say."""
        if images.dim() != 4:
            raise ValueError(
                f"Invalid images: shape {tuple(images.shape)} (expected (N, C, H, W))"
            )
        rows, cols, flips = (d.to(images.device) for d in draws)
        n, _, h, w = images.shape
        out = images
        if self.padding:
            p = self.padding
            padded = F.pad(images, (p, p, p, p), mode="replicate")
            r = (rows[:, None] + torch.arange(h, device=images.device))[:, :, None]
            c = (cols[:, None] + torch.arange(w, device=images.device))[:, None, :]
            batch = torch.arange(n, device=images.device)[:, None, None]
            # Advanced indices around a slice put their dimensions first: (N, H, W, C).
            out = padded[batch, :, r, c].permute(0, 3, 1, 2).contiguous()
        return torch.where(flips[:, None, None, None], out.flip(3), out)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``apply(images, draw(len(images), generator))``."""
        return self.apply(images, self.draw(images.shape[0], generator))
