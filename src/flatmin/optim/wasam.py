r"""WASAM: SAM whose unperturbed iterates are averaged (Kaddour et al. 2022).

Algorithm, per mini-batch (``count`` counts optimizer steps by default)::

    ε̂ = ρ g / ‖g‖;  g_SAM = ∇L(w + ε̂)           # SAM's two passes
    w ← base_step(w, g_SAM)                       # second_step: back at w, then the base step
    if count ≥ start and (count − start) % every == 0:
        w̄ ← w̄ + (w − w̄) / (n + 1)                 # SWA of the unperturbed w, never of w + ε̂

The average lives in :attr:`WASAM.averaging`, a
:class:`~flatmin.optim.averaging.WeightAveraging`; its BN statistics, ``swap()`` and export work as
there.

References:
    Kaddour et al., "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv:2202.00661.
    Foret et al., arXiv:2010.01412 (SAM). Izmailov et al., arXiv:1803.05407 (SWA).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatmin.optim._checks import GroupCheck, check_bool
from flatmin.optim.averaging import BufferPolicy, Mode, WeightAveraging
from flatmin.optim.sam import SAM

__all__ = ["WASAM"]


class WASAM(SAM):
    """SAM plus weight averaging of the iterates after each base step (Kaddour et al. 2022).

    Behaves exactly as :class:`~flatmin.optim.sam.SAM` (same ``first_step`` / ``second_step`` /
    ``step(closure)``, same param groups, so LR schedulers attach to it). Averaging counts:

    * ``average_on_step=True`` (default): every :meth:`second_step` (and so every
      ``step(closure)``) ends with ``self.averaging.update()``, after the base optimizer has moved
      the restored, unperturbed weights; ``start`` / ``every`` count optimizer steps.
    * ``average_on_step=False``: WASAM never averages by itself; call
      ``wasam.averaging.update()`` yourself (e.g. once per epoch, as the SWA paper does);
      ``start`` / ``every`` count your calls.

    Averaging never changes the learning rate (use :mod:`flatmin.optim.schedules`). Evaluate the
    average with ``wasam.averaging.update_bn(loader)`` and ``with wasam.averaging.swap(): ...``.

    Args:
        model: The model (its parameters are optimized unless ``params`` is given; a DDP wrapper
            is averaged through ``.module``).
        base_optimizer: An optimizer class or instance, as for SAM.
        rho: SAM radius.
        start: First count at which to average.
        every: Averaging frequency in counts.
        mode: ``"swa"`` (the paper) or ``"ema"``.
        decay: EMA decay (``mode="ema"`` only).
        buffers: Buffer policy of the averager (``"average"``, ``"copy"``, ``"none"``).
        average_device: Storage device of the averages (e.g. ``"cpu"``).
        average_on_step: Average after each base step (see above).
        params: Parameters or param groups (default: ``model.parameters()``; ``None`` with a base
            optimizer instance, whose groups SAM adopts).
        **kw: SAM's options (``p``, ``adaptive``, ``eta``, ``eps``, ``foreach``) and the base
            optimizer's keyword arguments (``lr``, ``momentum``, ...).

    Raises:
        TypeError, ValueError: As :class:`SAM` and :class:`WeightAveraging`.

    References:
        Kaddour et al., "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv:2202.00661.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = WASAM(model, torch.optim.SGD, rho=0.05, start=2, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(3):
        ...     loss = opt.step(closure)
        >>> opt.averaging.n_averaged
        2
    """

    average_on_step: bool
    _options: ClassVar[dict[str, tuple[Any, GroupCheck]]] = {"average_on_step": (True, check_bool)}

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        rho: float = 0.05,
        start: int = 0,
        every: int = 1,
        mode: Mode = "swa",
        decay: float = 0.999,
        buffers: BufferPolicy = "average",
        average_device: torch.device | str | None = None,
        average_on_step: bool = True,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        **kw: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: {type(model).__name__} (expected a torch.nn.Module)")
        if params is None and not isinstance(base_optimizer, Optimizer):
            params = model.parameters()
        averaging = WeightAveraging(
            model,
            mode=mode,
            decay=decay,
            start=start,
            every=every,
            buffers=buffers,
            device=average_device,
        )
        super().__init__(params, base_optimizer, rho, average_on_step=average_on_step, **kw)
        self.averaging = averaging

    def _after_base_step(self) -> None:
        # After the base step the weights are the restored, unperturbed ones: average those.
        if self.average_on_step:
            self.averaging.update()

    def _extra_state(self) -> dict[str, Any]:
        return {"averaging": self.averaging.state_dict()}

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        if set(extra) != {"averaging"}:
            raise ValueError(
                f"Invalid WASAM state_dict: extra {sorted(extra)} (expected 'averaging')"
            )
        self.averaging.check_state_dict(extra["averaging"])

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.averaging.load_state_dict(extra["averaging"])

    def __repr__(self) -> str:
        base = self.base_optimizer.__class__.__name__
        return (
            f"WASAM(base_optimizer={base}, groups={len(self.param_groups)}, "
            f"averaging={self.averaging!r})"
        )
