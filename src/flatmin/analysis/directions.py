"""Directions in parameter space: seeded Gaussian directions and the direction between models.

A direction is a ``dict`` mapping each floating-point parameter name (``named_parameters``) to a
tensor of the same shape, device and dtype. Parameters outside the name filter, frozen parameters
(``requires_grad=False``) and, by default, 1-D tensors get zeros.

References:
    Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018
    (arXiv:1712.09913).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from flatmin.analysis._common import check_choice

__all__ = ["Direction", "direction_norm", "model_direction", "random_direction"]

#: A direction in weight space: one tensor per parameter name, shaped like the parameter.
Direction = dict[str, Tensor]
Norm = Literal["filter", "layer", "unit", "none"]
OneD = Literal["zero", "copy", "normalize"]


def _name_filter(include: str | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if include is None:
        return lambda name: True
    if isinstance(include, str):
        pattern = re.compile(include)
        return lambda name: pattern.search(name) is not None
    if callable(include):
        return include
    raise TypeError(f"Invalid include: {include!r} (expected a regex string, callable or None)")


def _scale_to(d: Tensor, w: Tensor) -> Tensor:
    """Scale ``d`` to the norm of ``w`` (zero where ``d`` is zero)."""
    dn = d.norm()
    return d * (w.norm() / dn) if dn > 0 else torch.zeros_like(d)


def random_direction(
    model: nn.Module,
    *,
    norm: Norm = "filter",
    one_d: OneD = "zero",
    include: str | Callable[[str], bool] | None = None,
    generator: torch.Generator | None = None,
) -> Direction:
    """Draw a Gaussian direction ``d ~ N(0, I)`` and normalise it.

    Normalisations (``w`` is the model's parameter tensor, ``d`` its direction):

    * ``"filter"`` (Li et al. 2018): for every output filter ``i`` (slice along dim 0) of a tensor
      with ≥ 2 dimensions, ``d_i ← d_i · ‖w_i‖ / ‖d_i‖``. This removes the scale symmetry of ReLU
      networks, so plots of differently scaled but equivalent networks coincide.
    * ``"layer"``: per tensor, ``d ← d · ‖w‖ / ‖d‖``.
    * ``"unit"``: the whole direction is scaled to unit ℓ2 norm (after the 1-D rule).
    * ``"none"``: the raw Gaussian.

    1-D tensors (biases, BatchNorm affine parameters) follow ``one_d``: ``"zero"`` (default, Li et
    al.'s ``ignore='biasbn'``) sets them to 0; ``"copy"`` sets ``d = w`` (Li et al.'s alternative);
    ``"normalize"`` treats the whole vector as a single filter (``d ← d ‖w‖/‖d‖``) under
    ``"filter"``/``"layer"`` and keeps the Gaussian under ``"unit"``/``"none"``. 0-D tensors are
    treated like 1-D ones.

    Args:
        model: The network; only read.
        norm: Normalisation, see above.
        one_d: Rule for tensors with fewer than 2 dimensions.
        include: Keep only parameters whose name matches this regex (``re.search``) or for which
            this callable returns true; the others get zeros.
        generator: Source of randomness (a CPU generator works for any device). ``None`` uses
            torch's default generator — pass one for reproducible directions.

    Returns:
        Name → direction tensor for every floating-point parameter.

    Raises:
        ValueError: for an unknown ``norm`` or ``one_d``.
        TypeError: for an ``include`` that is neither a string nor callable.

    References:
        Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets" (arXiv:1712.09913), Sec. 4.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> d = random_direction(net, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.allclose(d["weight"].norm(dim=1), net.weight.norm(dim=1)))
        True
    """
    check_choice("norm", norm, ("filter", "layer", "unit", "none"))
    check_choice("one_d", one_d, ("zero", "copy", "normalize"))
    keep = _name_filter(include)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out: Direction = {}
    with torch.no_grad():
        for name, w in model.named_parameters():
            if not w.is_floating_point():
                continue
            # Draw for every tensor (even filtered ones) so a name filter does not shift the stream.
            d = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=gen_device)
            d = d.to(w.device)
            if not keep(name) or not w.requires_grad:
                out[name] = torch.zeros_like(w)
                continue
            if w.ndim < 2:
                if one_d == "zero":
                    d = torch.zeros_like(w)
                elif one_d == "copy":
                    d = w.detach().clone()
                elif norm in ("filter", "layer"):
                    d = _scale_to(d, w)
            elif norm == "filter":
                wn = w.reshape(w.shape[0], -1).norm(dim=1)
                dn = d.reshape(d.shape[0], -1).norm(dim=1)
                scale = torch.where(dn > 0, wn / torch.where(dn > 0, dn, 1), 0)
                d = d * scale.reshape(-1, *([1] * (w.ndim - 1)))
            elif norm == "layer":
                d = _scale_to(d, w)
            out[name] = d
        if norm == "unit":
            total = direction_norm(out)
            if total > 0:
                out = {k: v / total for k, v in out.items()}
    return out


def model_direction(
    model_a: nn.Module, model_b: nn.Module, *, include: str | Callable[[str], bool] | None = None
) -> Direction:
    """Return the direction ``θ_b − θ_a`` between two models of the same architecture.

    Args:
        model_a: Start point ``θ_a``.
        model_b: End point ``θ_b``.
        include: Optional name filter as in :func:`random_direction`; other parameters get zeros.

    Raises:
        ValueError: if the parameter names or shapes differ.
    """
    keep = _name_filter(include)
    a = dict(model_a.named_parameters())
    b = dict(model_b.named_parameters())
    if list(a) != list(b):
        raise ValueError(f"Invalid models: parameter names differ ({list(a)} vs {list(b)})")
    out: Direction = {}
    with torch.no_grad():
        for name, pa in a.items():
            pb = b[name]
            if pa.shape != pb.shape:
                raise ValueError(
                    f"Invalid models: {name} has shape {tuple(pa.shape)} vs {tuple(pb.shape)}"
                )
            if not pa.is_floating_point():
                continue
            diff = pb.detach().to(pa.device, pa.dtype) - pa.detach()
            out[name] = diff if keep(name) else torch.zeros_like(diff)
    return out


def direction_norm(direction: Direction) -> float:
    """Global ℓ2 norm ``sqrt(Σ ‖d_i‖²)`` of a direction."""
    return float(sum(float(v.double().pow(2).sum()) for v in direction.values()) ** 0.5)
