r"""SAM, WASAM and weight averaging in PyTorch Lightning (2.x), correct in every training mode.

Returning :class:`flatmin.SAM` from ``configure_optimizers`` of a plain ``LightningModule`` runs
two closures per step, but Lightning's paths around the optimizer train wrong:

* ``accumulate_grad_batches=k``: ε̂ would come from the gradient of all k micro-batches, the
  second pass from the last micro-batch only, scaled by 1/k (SAM refuses it: it finds the
  earlier micro-batches' gradients when Lightning's closure arrives).
* ``step(closure, model=...)``: the strategy consumes ``model=`` (BatchNorm is not frozen), and
  ``model=self.net`` fails an assertion inside Lightning.
* ``precision="16-mixed"``: the plugin runs the closure once and calls ``scaler.step(sam)``.
* Manual optimization with ``first_step``/``second_step`` through ``self.optimizers()`` would
  leave ``global_step`` at 0 (SAM refuses it on Lightning's wrapper), and ``opt.step()`` after
  ``first_step()`` starts a new step at w + ε̂.

:class:`SAMModule` (use it instead of ``LightningModule``) steps SAM so that one Lightning step
is one SAM step on the whole (accumulated) batch::

    g      = Σ_i ∇L_i(w) / k                  # Lightning's k micro-batches (pass 1, as usual)
    ε̂      = ρ g / ‖g‖                        # first_step
    g_SAM  = Σ_i ∇L_i(w + ε̂) / k              # pass 2: every micro-batch again, BN frozen,
                                              #   each with its pass-1 RNG state (dropout masks)
    w      ← base_step(w, g_SAM)              # second_step, through Lightning's optimizer.step

In manual optimization :meth:`SAMModule.sam_step` does the same for a closure and counts as an
optimizer step (``global_step``, ``max_steps``, checkpoints). With a ``GradScaler``
(``16-mixed``) the first pass is unscaled and checked by hand and the plugin's
``scaler.step``/``update`` finish the step, as :func:`flatmin.optim.amp.sam_step_amp` does; an
overflow in either pass skips the step and leaves the weights at w. :class:`WeightAveragingCallback`
keeps an SWA/EMA average (or a WASAM's) in checkpoints, swaps it in for validation and applies it
at the end.

References:
    Foret et al., "Sharpness-Aware Minimization", ICLR 2021, arXiv:2010.01412.
    Kaddour et al., "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv:2202.00661.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from torch import Tensor

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "flatmin.integrations.lightning needs Lightning 2.x: pip install 'flatmin[lightning]'"
    ) from err

from flatmin.integrations._common import (
    RNGSnapshot,
    find_sam,
    require_two_pass,
    unscale_first_pass_,
)
from flatmin.integrations._lightning_averaging import WeightAveragingCallback
from flatmin.optim import ESAM, SAM
from flatmin.optim._driver import remember_grad
from flatmin.optim.bn import frozen_bn_stats

__all__ = ["SAMModule", "WeightAveragingCallback"]


class _MicroBatch(NamedTuple):
    batch: Any
    batch_idx: int
    rng: RNGSnapshot | None


def _loss_of(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` output (a tensor, a mapping with ``"loss"``, or None)."""
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    raise TypeError(
        f"Invalid training_step output: {type(output).__name__} (expected a tensor, a dict with "
        "'loss', or None)"
    )


def _lightning_optimizers(module: pl.LightningModule) -> list[Any]:
    opts = module.optimizers(use_pl_optimizer=True)
    return list(opts) if isinstance(opts, list) else [opts]


def _refuse_on_wrapper(name: str) -> Callable[..., None]:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"{name}() called on Lightning's optimizer wrapper (self.optimizers()): Lightning "
            "does not count it as an optimizer step (global_step, max_steps, schedulers and "
            "checkpoints stay put) and opt.step() after first_step() starts a new step at the "
            "perturbed weights; call self.sam_step(closure) instead"
        )

    return refuse


def _guard_step(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def guarded(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if "model" in kwargs:
            raise TypeError(
                "optimizer.step(..., model=...) never reaches SAM under Lightning (the strategy "
                "consumes model=, and fails on anything but the LightningModule); SAMModule "
                "freezes BatchNorm in the second pass itself: drop model= (or the "
                "optimizer_step override), or use self.sam_step(closure) in manual optimization"
            )
        return step(closure=closure, **kwargs)

    return guarded


def _skipping_backward(trainer: pl.Trainer) -> bool:
    # Set by Lightning's StochasticWeightAveraging for its BN-update epoch (no public flag).
    return bool(getattr(trainer.fit_loop, "_skip_backward", False))


class SAMModule(pl.LightningModule):
    r"""A ``LightningModule`` whose optimizer steps are correct SAM steps in every training mode.

    Subclass it instead of ``LightningModule`` and return a :class:`~flatmin.SAM` (or
    :class:`~flatmin.WASAM`, or SAM with any perturbation options) from ``configure_optimizers``;
    with any other optimizer it behaves as a plain ``LightningModule``. Per step, with the k
    micro-batches of ``accumulate_grad_batches``:

    .. math::

        \hat\epsilon = \rho\,\frac{g}{\|g\|},\quad g = \frac1k\sum_i \nabla L_i(w), \qquad
        w \leftarrow \mathrm{base\_step}\Big(w,\ \frac1k\sum_i \nabla L_i(w + \hat\epsilon)\Big).

    * **Automatic optimization**: nothing to write. The second pass runs every micro-batch of
      the step again (``training_step`` through the strategy, so autocast and DDP apply),
      with BatchNorm running statistics frozen (:attr:`sam_freeze_bn`) and, per micro-batch, the
      RNG state of its first pass (:attr:`sam_same_rng`: same dropout masks). ``self.log`` is
      silent during the second pass, so logged metrics are those at w. Lightning's gradient
      clipping by norm clips the SAM gradient (clipping the first-pass gradient by norm leaves
      ε̂ unchanged); clipping by value would change ε̂ and is refused.
    * **Manual optimization**: call :meth:`sam_step` with a closure that computes the loss and
      calls ``self.manual_backward(loss)``; it counts as one optimizer step.
    * **Precision**: ``32``, ``bf16-mixed`` (autocast, no scaler), ``16-mixed`` (the plugin's
      ``GradScaler``; an overflow in either pass skips the step, the weights stay at w).
    * **Checkpoints**: SAM's ``state_dict`` holds the base optimizer's state (and a WASAM's
      average), so ``trainer.fit(ckpt_path=...)`` continues bit-identically.

    Refused with an error instead of training wrongly: ESAM (needs per-sample losses), SAMEveryK /
    LookSAM under ``16-mixed``, several optimizers in automatic optimization, a strategy that
    accumulates gradients itself (DeepSpeed), ``gradient_clip_algorithm="value"``,
    ``optimizer.step(..., model=...)``, and ``first_step()`` / ``second_step()`` called on
    ``self.optimizers()`` (they would not count as a step).

    If you override ``on_fit_start``, ``on_train_batch_start`` or ``on_train_epoch_start``, call
    ``super()``; do not override ``optimizer_step``.

    Attributes:
        sam_same_rng: Replay the RNG state of the first pass in the second (default ``True``).
        sam_freeze_bn: Keep BatchNorm running statistics unchanged by the second pass
            (default ``True``).

    Example:
        >>> import lightning.pytorch as pl, torch, flatmin
        >>> from flatmin.integrations.lightning import SAMModule
        >>> class Net(SAMModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
        ...                                        torch.nn.ReLU(), torch.nn.Linear(8, 2))
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return torch.nn.functional.cross_entropy(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return flatmin.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
        >>> trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
        >>> trainer.global_step
        2
    """

    sam_same_rng: bool = True
    sam_freeze_bn: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Micro-batches of the current accumulation window (automatic optimization only).
        self._sam_micro: list[_MicroBatch] = []
        self._sam_second_pass = False

    # -- set-up checks --------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Check the configuration against SAM and guard Lightning's optimizer wrappers."""
        super().on_fit_start()
        self._sam_micro = []
        trainer = self.trainer
        wrappers = _lightning_optimizers(self)
        sams = [find_sam(w) for w in wrappers]
        if not any(s is not None for s in sams):
            return
        scaler = self._sam_scaler()
        for sam in sams:
            # Without a scaler SAM.step(closure) runs the passes, so SAMEveryK / LookSAM work;
            # under 16-mixed SAMModule drives first_step itself.
            if isinstance(sam, ESAM) or (sam is not None and scaler is not None):
                require_two_pass(sam, "under Lightning" if scaler is None else "under 16-mixed")
        if self.automatic_optimization:
            if len(wrappers) > 1:  # Lightning refuses this itself; keep the message about SAM
                raise RuntimeError("SAMModule supports one optimizer in automatic optimization")
            if (
                trainer.accumulate_grad_batches > 1
                and trainer.strategy.handles_gradient_accumulation
            ):
                raise RuntimeError(
                    f"{type(trainer.strategy).__name__} accumulates gradients itself: SAM's second "
                    "pass cannot revisit the micro-batches; use accumulate_grad_batches=1 (and no "
                    "accumulation in the strategy's config), or a larger batch"
                )
            if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value":
                raise ValueError(
                    "Invalid gradient_clip_algorithm: 'value' with SAM (Lightning clips after "
                    "both passes, and clipping the first-pass gradient by value changes ε̂); use "
                    "'norm', or SAM(max_grad_norm=...)"
                )
        for wrapper, sam in zip(wrappers, sams):
            if sam is not None:
                # Lightning's wrapper exposes SAM's methods bound to itself; these two would
                # step outside Lightning's step accounting (see the module docstring).
                wrapper.first_step = _refuse_on_wrapper("first_step")
                wrapper.second_step = _refuse_on_wrapper("second_step")
                if not getattr(wrapper.step, "__wrapped__", None):
                    wrapper.step = _guard_step(wrapper.step)

    def on_train_epoch_start(self) -> None:
        """Start every epoch with an empty accumulation window (Lightning's windows do too)."""
        super().on_train_epoch_start()
        self._sam_micro = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Keep the micro-batch (and its RNG state) for the second pass of an accumulated step."""
        response = super().on_train_batch_start(batch, batch_idx)
        trainer = self.trainer
        if (
            self.automatic_optimization
            and trainer.accumulate_grad_batches > 1
            and not _skipping_backward(trainer)
            and find_sam(trainer.optimizers[0] if trainer.optimizers else None) is not None
        ):
            rng = RNGSnapshot.capture() if self.sam_same_rng else None
            self._sam_micro.append(_MicroBatch(batch, batch_idx, rng))
        return response

    def on_train_epoch_end(self) -> None:
        """Drop references to the batches of an unfinished window."""
        super().on_train_epoch_end()
        self._sam_micro = []

    # -- the step -------------------------------------------------------------------------------
    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """One SAM step over the accumulated batch (automatic optimization); see the class doc."""
        sam = find_sam(optimizer)
        if sam is None or optimizer_closure is None:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            return
        micro, self._sam_micro = self._sam_micro, []
        if _skipping_backward(self.trainer):
            # Lightning's StochasticWeightAveraging recomputes BN statistics of the average in an
            # extra epoch without backward; its last batch still reaches optimizer_step, where a
            # step would move the average with stale gradients. Run the forward only.
            optimizer_closure()
            return
        if self.trainer.accumulate_grad_batches > 1:
            if not micro or micro[-1].batch_idx != batch_idx:
                raise RuntimeError(
                    "SAMModule did not see the micro-batches of this accumulated step: "
                    "on_train_batch_start was overridden without calling super()"
                )
            replays, rng = micro[:-1], micro[-1].rng
        else:
            replays, rng = [], None
        self._sam_run(optimizer, sam, optimizer_closure, replays, rng)

    def sam_step(self, closure: Callable[[], Tensor], optimizer: Any | None = None) -> Tensor:
        """One SAM step in manual optimization, counted by Lightning as an optimizer step.

        Args:
            closure: Computes the loss and calls ``self.manual_backward(loss)`` (which scales it
                under ``16-mixed``), returns the loss. It runs twice (at w and at w + ε̂); the
                gradients are zeroed before each run. For gradient accumulation pass
                :func:`flatmin.optim.accumulation.accumulation_closure` with
                ``backward=self.manual_backward``.
            optimizer: The SAM optimizer (Lightning's wrapper or the optimizer itself); default:
                the only one.

        Returns:
            The loss at w, as the closure returned it.

        Raises:
            RuntimeError: Called in automatic optimization.
            TypeError: The optimizer is not a SAM, or a variant that cannot run here.
        """
        if self.automatic_optimization:
            raise RuntimeError(
                "sam_step() is for manual optimization (automatic_optimization=False); in "
                "automatic optimization SAMModule steps SAM by itself"
            )
        wrappers = _lightning_optimizers(self)
        if optimizer is None:
            if len(wrappers) != 1:
                raise TypeError(
                    f"sam_step() needs optimizer= with {len(wrappers)} optimizers configured"
                )
            optimizer = wrappers[0]
        sam = find_sam(optimizer)
        if sam is None:
            raise TypeError(
                f"Invalid optimizer: {type(optimizer).__name__} (expected a flatmin.SAM)"
            )
        # The raw optimizer steps outside Lightning's accounting: go through its wrapper.
        wrapper = next((w for w in wrappers if find_sam(w) is sam), optimizer)

        def first_pass() -> Tensor:
            sam.zero_grad()
            return closure()

        loss: Tensor = self._sam_run(wrapper, sam, first_pass, [], None)
        return loss

    def _sam_scaler(self) -> Any | None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _sam_run(
        self,
        optimizer: Any,
        sam: SAM,
        first_pass: Callable[[], Any],
        replays: list[_MicroBatch],
        rng: RNGSnapshot | None,
    ) -> Any:
        """Run SAM's passes through Lightning's ``optimizer.step`` (hooks, clipping, counting)."""
        if rng is None and self.sam_same_rng:
            rng = RNGSnapshot.capture()

        def second_pass() -> Any:
            with self._sam_second_pass_context():
                for micro in replays:
                    if micro.rng is not None:
                        micro.rng.restore()
                    self._sam_replay(micro, optimizer)
                if rng is not None:
                    rng.restore()
                return first_pass()

        if replays:
            # The earlier micro-batches' gradients are meant to be there: the first pass adds the
            # last one's to them. Tell step(closure) so that it does not warn of a stray backward.
            remember_grad(sam)
        scaler = self._sam_scaler()
        if scaler is None:
            # SAM.step calls this twice: at w, then (perturbed) at w + ε̂.
            def closure() -> Any:
                return second_pass() if sam.perturbed else first_pass()

            return optimizer.step(closure=closure)

        # 16-mixed: the plugin runs the closure once, unscales, clips, scaler.step(sam), update.
        # Both passes run inside the closure; scaler.step then calls SAM.step() == second_step.
        require_two_pass(sam, "under 16-mixed")
        skipped_first = False
        loss = None

        def two_passes() -> Any:
            nonlocal skipped_first, loss
            loss = first_pass()
            if loss is None:  # training_step returned None: Lightning skips the step
                return None
            if unscale_first_pass_(sam, scaler):
                skipped_first = True  # the plugin's unscale_ sees the inf too and skips
                return loss
            sam.first_step(zero_grad=True)
            second_pass()
            return loss

        try:
            optimizer.step(closure=two_passes)  # returns scaler.step's result, not the loss
        finally:
            # Perturbed still: an overflow at w + ε̂ (the scaler skipped second_step), or an error.
            skipped_second = sam.perturbed
            if skipped_second:
                sam.restore()
            if skipped_first or skipped_second:
                sam.zero_grad()  # non-finite gradients, as sam_step_amp leaves them
        return loss

    def _sam_replay(self, micro: _MicroBatch, optimizer: Any) -> None:
        """Forward and backward of an earlier micro-batch of this step, as Lightning ran it."""
        trainer = self.trainer
        loss = _loss_of(trainer.strategy.training_step(micro.batch, micro.batch_idx))
        if loss is not None:
            trainer.strategy.backward(loss / trainer.accumulate_grad_batches, optimizer)

    @contextlib.contextmanager
    def _sam_second_pass_context(self) -> Iterator[None]:
        self._sam_second_pass = True
        try:
            with frozen_bn_stats(self if self.sam_freeze_bn else None):
                yield
        finally:
            self._sam_second_pass = False

    @property
    def in_sam_second_pass(self) -> bool:
        """Whether ``training_step`` is running SAM's second pass (at w + ε̂)."""
        return self._sam_second_pass

    def log(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, silent during SAM's second pass (metrics are those at w)."""
        if self._sam_second_pass:
            return
        super().log(*args, **kwargs)
