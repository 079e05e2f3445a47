r"""SAM and WASAM under the Hugging Face ``Trainer``: two passes per optimizer step, done right.

The ``Trainer`` runs ``training_step`` (forward + backward) on each of the k micro-batches of an
optimizer step, then clips, calls ``optimizer.step()`` once (through accelerate, with its
``GradScaler`` under fp16), steps the LR scheduler and zeroes the gradients. :class:`SAMTrainer`
turns that into one SAM step on the whole accumulated batch::

    g      = Σ_i ∇L_i(w)                 # the Trainer's k training_steps (pass 1, as usual)
    ε̂      = ρ g / ‖g‖                   # first_step, after the last micro-batch
    g_SAM  = Σ_i ∇L_i(w + ε̂)             # pass 2: every micro-batch again (same loss scaling,
                                         #   BN frozen, each with its pass-1 RNG state)
    clip(g_SAM); w ← base_step(w, g_SAM)  # the Trainer's clipping and optimizer.step()

``optimizer.step()`` without a closure after ``first_step`` is SAM's ``second_step`` (restore w
bit-exactly, base step), so the Trainer's own step finishes the SAM step, and its gradient
clipping (``max_grad_norm``) clips the SAM gradient. Under fp16 the first pass is unscaled and
checked by hand; an overflow in either pass skips the step with the weights at w, as
:func:`flatmin.optim.amp.sam_step_amp` does. Checkpoints (``save_steps``) hold SAM's state with
the base optimizer's (and a WASAM's average), so ``train(resume_from_checkpoint=...)`` continues
exactly; :meth:`SAMTrainer.save_averaged_model` writes the average as a normal
``save_pretrained`` model.

References:
    Foret et al., "Sharpness-Aware Minimization", ICLR 2021, arXiv:2010.01412.
    Kaddour et al., "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv:2202.00661.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "flatmin.integrations.transformers needs transformers and accelerate: "
        "pip install 'flatmin[transformers]'"
    ) from err

from flatmin.integrations._common import (
    RNGSnapshot,
    find_sam,
    require_two_pass,
    unscale_first_pass_,
)
from flatmin.optim import SAM, WASAM
from flatmin.optim.bn import bn_modules, frozen_bn_stats

__all__ = ["SAMTrainer"]

_WHERE = "under the Hugging Face Trainer"


class _MicroBatch(NamedTuple):
    inputs: Any
    num_items_in_batch: Any
    rng: RNGSnapshot | None


class _FinishSkippedStep(TrainerCallback):
    """Right after ``optimizer.step()``: if the scaler skipped SAM's second step, go back to w."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sam = find_sam(kwargs.get("optimizer"))
        if sam is not None and sam.perturbed:
            sam.restore()
            sam.zero_grad()


class SAMTrainer(Trainer):
    r"""A ``transformers.Trainer`` whose optimizer steps are SAM (or WASAM) steps.

    The optimizer is the Trainer's own (``args.optim``, learning rate, weight-decay groups,
    ``optimizer_cls_and_kwargs``) wrapped in :class:`flatmin.SAM` with the options ``sam``, or
    in :class:`flatmin.WASAM` when ``averaging`` is given; the LR scheduler attaches to it as
    usual. A SAM or WASAM passed through ``optimizers=(optimizer, scheduler)`` is used as is.
    Update per optimizer step, with the Trainer's micro-batch losses ``L_i`` (already scaled for
    gradient accumulation):

    .. math::

        \hat\epsilon = \rho\,\frac{g}{\|g\|},\ g = \sum_i \nabla L_i(w), \qquad
        w \leftarrow \mathrm{base\_step}\Big(w,\ \mathrm{clip}\Big(\sum_i \nabla L_i(w +
        \hat\epsilon)\Big)\Big).

    What works: gradient accumulation (both passes over every micro-batch), ``bf16`` and
    ``fp16`` through accelerate (fp16 overflow in either pass skips the step at w),
    ``max_grad_norm`` (clips the SAM gradient), ``save_steps`` and resume (SAM's, the base
    optimizer's and the average's state are in ``optimizer.pt``; the Trainer restores the RNG),
    models with BatchNorm (frozen in the second pass), dropout (same masks in both passes).

    Refused: ESAM and SAMEveryK / LookSAM (their steps do not fit the Trainer's single
    ``optimizer.step()``), DeepSpeed (its engine owns backward and step), a non-SAM optimizer.

    Args:
        *args: As for ``transformers.Trainer``.
        sam: Options of :class:`flatmin.SAM` (``rho``, ``adaptive``, ``p``, ...); default
            ``{"rho": 0.05}``.
        averaging: Options of :class:`flatmin.WASAM`'s averager (``mode``, ``decay``,
            ``start``, ``every``, ``buffers``, ``average_device``); ``None``: plain SAM.
        same_rng: Replay each micro-batch's first-pass RNG state in its second pass.
        freeze_bn: Keep BatchNorm running statistics unchanged by the second pass.
        **kwargs: As for ``transformers.Trainer``.

    Raises:
        TypeError: An unsupported optimizer (see above), or ``averaging`` together with an
            optimizer passed in ``optimizers``.

    Example:
        >>> import tempfile, torch
        >>> from transformers import TrainingArguments
        >>> class Tiny(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(3, 2)
        ...     def forward(self, x, labels):
        ...         return {"loss": torch.nn.functional.cross_entropy(self.lin(x), labels)}
        >>> data = [{"x": torch.randn(3), "labels": torch.tensor(i % 2)} for i in range(16)]
        >>> args = TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=4,
        ...                          gradient_accumulation_steps=2, max_steps=2, use_cpu=True,
        ...                          report_to=[], save_strategy="no", disable_tqdm=True)
        >>> trainer = SAMTrainer(model=Tiny(), args=args, train_dataset=data, sam={"rho": 0.1})
        >>> trainer.train().global_step  # the Trainer prints its metrics first
        {...}
        2
    """

    def __init__(
        self,
        *args: Any,
        sam: Mapping[str, Any] | None = None,
        averaging: Mapping[str, Any] | None = None,
        same_rng: bool = True,
        freeze_bn: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sam_options: dict[str, Any] = {"rho": 0.05, **(sam or {})}
        self.averaging_options = None if averaging is None else dict(averaging)
        if self.averaging_options is not None and self.optimizer is not None:
            raise TypeError(
                "averaging= builds a WASAM around the Trainer's optimizer; with optimizers=(...) "
                "pass a flatmin.WASAM instead"
            )
        self.same_rng = same_rng
        self.freeze_bn = freeze_bn
        self._sam_micro: list[_MicroBatch] = []
        # First in line: no other callback may see the weights of a skipped step at w + ε̂.
        self.callback_handler.callbacks.insert(0, _FinishSkippedStep())

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer wrapped in SAM (or WASAM), or a checked user-given SAM."""
        self._sam_micro = []  # a new run: nothing left of an interrupted accumulation window
        if self.optimizer is None:
            base = super().create_optimizer(model)
            target = self.model if model is None else model
            if self.averaging_options is not None:
                if target is None:
                    raise RuntimeError("averaging= needs the Trainer's model")
                self.optimizer = WASAM(target, base, **self.sam_options, **self.averaging_options)
            else:
                self.optimizer = SAM(None, base, **self.sam_options)
        sam = find_sam(self.optimizer)
        if sam is None:
            raise TypeError(
                f"Invalid optimizer: {type(self.optimizer).__name__} (SAMTrainer needs a "
                "flatmin.SAM; pass sam= options, or use transformers.Trainer)"
            )
        require_two_pass(sam, _WHERE)
        return self.optimizer

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Pass 1 on this micro-batch; after the last of the step, ``first_step`` and pass 2."""
        sam = find_sam(self.optimizer)
        if sam is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.distributed_type == "DEEPSPEED":
            raise RuntimeError("SAMTrainer does not support DeepSpeed (its engine owns the step)")
        rng = RNGSnapshot.capture() if self.same_rng else None
        self._sam_micro.append(_MicroBatch(inputs, num_items_in_batch, rng))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.sync_gradients:
            return loss  # more micro-batches to come in this step
        micro, self._sam_micro = self._sam_micro, []
        scaler = self.accelerator.scaler
        if scaler is not None and scaler.is_enabled() and unscale_first_pass_(sam, scaler):
            # Overflow at w: the gradients stay non-finite, so the scaler skips the step (and
            # backs off) exactly as for one pass; the weights were never moved.
            return loss
        sam.first_step(zero_grad=True)
        try:
            with frozen_bn_stats(model if self.freeze_bn else None):
                for i, mb in enumerate(micro):
                    if mb.rng is not None:
                        mb.rng.restore()
                    last = i == len(micro) - 1
                    sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                    with sync:
                        super().training_step(model, mb.inputs, mb.num_items_in_batch)
        except BaseException:
            sam.restore()  # never leave the weights at w + ε̂
            raise
        return loss

    def save_averaged_model(self, output_dir: str | None = None, *, update_bn: bool = True) -> None:
        """Save the WASAM average as a normal model (``save_pretrained`` + the processing class).

        BatchNorm statistics of the average are recomputed over the training data first when the
        model has BatchNorm layers (``update_bn``).

        Raises:
            RuntimeError: The optimizer is not a WASAM, or nothing has been averaged yet.
        """
        wasam = find_sam(self.optimizer)
        if not isinstance(wasam, WASAM):
            raise RuntimeError("save_averaged_model() needs a WASAM optimizer (pass averaging=)")
        avg = wasam.averaging
        if avg.n_averaged == 0:
            raise RuntimeError("save_averaged_model(): nothing averaged yet (see averaging start)")
        if update_bn and self.model is not None and bn_modules(self.model):
            avg.update_bn(self.get_train_dataloader(), device=self.args.device)
        with avg.swap():
            self.save_model(output_dir)
