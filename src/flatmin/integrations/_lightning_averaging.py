"""``WeightAveragingCallback``: flatmin's weight averaging (or a WASAM's) inside Lightning.

Re-exported by :mod:`flatmin.integrations.lightning`; see the class docstring.
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning.pytorch as pl

from flatmin.integrations._common import find_sam
from flatmin.optim import WASAM, WeightAveraging
from flatmin.optim.bn import ForwardFn, bn_modules

__all__ = ["WeightAveragingCallback"]


class WeightAveragingCallback(pl.Callback):
    r"""SWA or EMA of the weights (or a WASAM's average) through training, checkpoints and the end.

    Keeps a :class:`flatmin.WeightAveraging` of the module (created at ``on_fit_start``, once the
    module is on its device) and counts one unit per optimizer step (``unit="step"``, the steps
    Lightning counts in ``global_step``) or per epoch (``unit="epoch"``); ``start`` / ``every``
    are in those units. Update rule: see :class:`flatmin.WeightAveraging`
    (``w̄ ← w̄ + (w − w̄)/(n+1)`` for SWA, ``w̄ ← β w̄ + (1 − β) w`` for EMA). With
    ``from_optimizer=True`` it uses the :class:`~flatmin.WASAM` optimizer's own average instead
    (WASAM averages after each of its steps and checkpoints it with the optimizer state).

    * Validation runs with the averaged weights (``swap_for_validation``).
    * Checkpoints hold the average and its counters (the ``state_dict`` of the callback); the
      module's ``state_dict`` keeps the live weights, so a resumed run continues exactly.
    * At the end of training the average is written into the module (``apply_on_train_end``),
      after recomputing BatchNorm statistics over the training data (``update_bn``;
      ``bn_forward(module, batch)`` runs the forward for a batch, default ``module(batch[0])``).

    Lightning's own ``StochasticWeightAveraging`` / ``EMAWeightAveraging`` work beside
    :class:`SAMModule` as well (they average after the SAM step, at w); this callback adds the
    WASAM case, checkpointed averages and flatmin's buffer policies.

    Args:
        unit: ``"step"`` or ``"epoch"``.
        from_optimizer: Use the WASAM optimizer's averager (no averaging options then).
        swap_for_validation: Validate with the averaged weights.
        apply_on_train_end: Put the averaged weights into the module when training ends.
        update_bn: Recompute BatchNorm statistics of the average before applying it.
        bn_forward: Forward function for :meth:`flatmin.WeightAveraging.update_bn`.
        **averaging: Options of :class:`flatmin.WeightAveraging` (``mode``, ``decay``,
            ``start``, ``every``, ``buffers``, ``device``, ``warmup_power``, ...).

    Raises:
        ValueError: ``unit`` is neither ``"step"`` nor ``"epoch"``.
        TypeError: ``from_optimizer=True`` with averaging options, or (at fit start) without a
            WASAM optimizer.

    Example:
        >>> cb = WeightAveragingCallback(mode="ema", decay=0.99)
        >>> cb.averaging is None  # created when fit starts
        True
    """

    def __init__(
        self,
        *,
        unit: str = "step",
        from_optimizer: bool = False,
        swap_for_validation: bool = True,
        apply_on_train_end: bool = True,
        update_bn: bool = True,
        bn_forward: ForwardFn | None = None,
        **averaging: Any,
    ) -> None:
        if unit not in ("step", "epoch"):
            raise ValueError(f"Invalid unit: {unit!r} (expected 'step' or 'epoch')")
        if from_optimizer and averaging:
            raise TypeError(
                f"from_optimizer=True uses the WASAM's averager; got options {sorted(averaging)}"
            )
        self.unit = unit
        self.from_optimizer = from_optimizer
        self.swap_for_validation = swap_for_validation
        self.apply_on_train_end = apply_on_train_end
        self.update_bn = update_bn
        self.bn_forward = bn_forward
        self._options = averaging
        self.averaging: WeightAveraging | None = None
        self._last_step = 0
        self._pending: dict[str, Any] | None = None
        self._swap: contextlib.AbstractContextManager[Any] | None = None

    @property
    def state_key(self) -> str:
        """Unique per configuration, so that several averaging callbacks checkpoint side by side."""
        return self._generate_state_key(
            unit=self.unit, from_optimizer=self.from_optimizer, **self._options
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Create the averager (or take the WASAM's) and load a checkpointed state."""
        if self.from_optimizer:
            sams = [find_sam(o) for o in trainer.optimizers]
            wasam = next((s for s in sams if isinstance(s, WASAM)), None)
            if wasam is None:
                raise TypeError(
                    "WeightAveragingCallback(from_optimizer=True) needs a flatmin.WASAM optimizer"
                )
            self.averaging = wasam.averaging
        else:
            self.averaging = WeightAveraging(pl_module, **self._options)
            if self._pending is not None and self._pending["averaging"] is not None:
                self.averaging.load_state_dict(self._pending["averaging"])
        if self._pending is not None:
            self._last_step = int(self._pending["last_step"])
        self._pending = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Count an optimizer step (if one happened since the last call)."""
        if trainer.global_step > self._last_step:
            self._last_step = trainer.global_step
            if self.unit == "step" and not self.from_optimizer and self.averaging is not None:
                self.averaging.update()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count an epoch."""
        if self.unit == "epoch" and not self.from_optimizer and self.averaging is not None:
            self.averaging.update()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the averaged weights in for validation."""
        if self.swap_for_validation and self.averaging is not None and self._swap is None:
            self._swap = self.averaging.swap()
            self._swap.__enter__()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the training weights back."""
        self._exit_swap()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Never leave the averaged weights in the module after an error."""
        self._exit_swap()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the average (with fresh BatchNorm statistics) into the module."""
        avg = self.averaging
        if not self.apply_on_train_end or avg is None or avg.n_averaged == 0:
            return
        if self.update_bn and bn_modules(pl_module):
            loader = trainer.train_dataloader
            if loader is None:
                raise RuntimeError("update_bn=True needs the training dataloader")
            avg.update_bn(loader, forward_fn=self.bn_forward, device=pl_module.device)
        pl_module.load_state_dict(avg.averaged_state_dict())

    def state_dict(self) -> dict[str, Any]:
        """The average, its counters and the last counted step."""
        own = None if self.from_optimizer or self.averaging is None else self.averaging
        return {
            "averaging": None if own is None else own.state_dict(),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpointed state until the averager exists (``on_fit_start``)."""
        self._pending = dict(state_dict)

    def _exit_swap(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.__exit__(None, None, None)
