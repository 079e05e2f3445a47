"""Rules that choose the tensors: SAM-ON's normalization layers, ESAM's random subset."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from flatmin.optim._checks import check_real
from flatmin.optim.rules._formula import LpBall, PerturbationRule, PerturbGroup

__all__ = ["RandomSubset", "Subset", "normalization_parameters", "sam_on"]


class _Wrapper(PerturbationRule):
    """A selection around another rule, whose geometry (scale) it keeps."""

    def __init__(self, inner: PerturbationRule | None) -> None:
        if inner is not None and not isinstance(inner, PerturbationRule):
            raise TypeError(f"Invalid inner rule: {inner!r} (expected a PerturbationRule)")
        self.inner = inner or LpBall()

    def has_scale(self, group: PerturbGroup) -> bool:
        return self.inner.has_scale(group)

    def scale(self, w: Tensor, g: Tensor, group: PerturbGroup) -> Tensor | None:
        return self.inner.scale(w, g, group)

    def scales_foreach(
        self, params: list[Tensor], grads: list[Tensor], group: PerturbGroup
    ) -> list[Tensor] | None:
        return self.inner.scales_foreach(params, grads, group)


class Subset(_Wrapper):
    """Only the given tensors take part: the norm and the move run over them alone.

    Every other tensor is left at ``w`` (and still receives the gradient at the perturbed point,
    which is SAM's update for all of them).

    Args:
        tensors: The tensors that are perturbed (kept by reference, compared by identity).
        inner: The geometry (default :class:`LpBall`).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        >>> rule = sam_on(model)  # only the LayerNorm's weight and bias
        >>> len(rule.tensors)
        2
    """

    def __init__(self, tensors: Iterable[Tensor], inner: PerturbationRule | None = None) -> None:
        super().__init__(inner)
        self.tensors = list(tensors)
        if not all(isinstance(t, Tensor) for t in self.tensors):
            raise TypeError("Invalid tensors: expected an iterable of tensors")
        self._ids = {id(t) for t in self.tensors}

    def select(self, groups: list[PerturbGroup]) -> list[PerturbGroup]:
        for group in groups:
            keep = [i for i, w in enumerate(group.params) if id(w) in self._ids]
            group.params = [group.params[i] for i in keep]
            group.grads = [group.grads[i] for i in keep]
        return self.inner.select(groups)

    def __repr__(self) -> str:
        return f"Subset({len(self.tensors)} tensors, inner={self.inner!r})"


_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def normalization_parameters(model: nn.Module) -> list[Tensor]:
    """The affine parameters of every normalization layer of ``model`` (BatchNorm, LayerNorm...)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, _NORM_LAYERS)
        for p in m.parameters(recurse=False)
    ]


def sam_on(model: nn.Module, inner: PerturbationRule | None = None) -> Subset:
    """SAM-ON: perturb only the normalization layers' parameters (Mueller et al. 2023).

    Raises:
        ValueError: ``model`` has no normalization layer with parameters.

    References:
        Mueller et al., "Normalization Layers Are All That Sharpness-Aware Minimization Needs",
        NeurIPS 2023, arXiv:2306.04226.
    """
    tensors = normalization_parameters(model)
    if not tensors:
        raise ValueError(f"Invalid model for SAM-ON: {type(model).__name__} has no normalization "
                         "layer with affine parameters")  # fmt: skip
    return Subset(tensors, inner)


class RandomSubset(_Wrapper):
    """ESAM's stochastic weight perturbation: each tensor moves with probability β, by ``ε̂/β``.

    Every participating tensor counts towards the norm. The draws are per tensor (as the authors'
    code does), from an explicit CPU generator, so drawing never syncs an accelerator.

    Args:
        beta: Probability in ``(0, 1]`` that a tensor is moved.
        generator: A CPU ``torch.Generator`` (default: a new one seeded with 0).
        inner: The geometry (default :class:`LpBall`).

    References:
        Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural
        Networks", ICLR 2022, arXiv:2110.03141.
    """

    def __init__(
        self,
        beta: float,
        generator: torch.Generator | None = None,
        inner: PerturbationRule | None = None,
    ) -> None:
        super().__init__(inner)
        self.beta = check_real("beta", beta, low=0.0, high=1.0, low_open=True)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"Invalid generator: {generator!r} (expected a CPU torch.Generator)")
        self.generator = generator

    def select(self, groups: list[PerturbGroup]) -> list[PerturbGroup]:
        groups = self.inner.select(groups)
        n = sum(len(g.params) for g in groups)
        draws = (torch.rand(n, generator=self.generator) < self.beta).tolist() if n else []
        start = 0
        for group in groups:
            group.mask = draws[start : start + len(group.params)]
            group.rho = group.rho / self.beta
            start += len(group.params)
        return groups

    def __repr__(self) -> str:
        return f"RandomSubset(beta={self.beta}, inner={self.inner!r})"
