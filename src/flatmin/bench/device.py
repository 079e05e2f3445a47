"""Devices and numeric precision of benchmark runs, training and analysis.

``--device`` names where a run computes: ``cpu``, ``cuda`` (the current CUDA device), ``cuda:N``,
``mps``, or ``auto`` (CUDA when visible, else MPS, else the CPU). An accelerator that is not there
is a :class:`DeviceUnavailableError` (a ``ValueError``: the CLI exits 2) naming what was asked
and what this torch build sees.

``--precision`` is the arithmetic of the forward and backward passes; parameters, optimizer state
and averages stay float32 in every mode:

* ``fp32`` — plain float32 (the benchmark's recorded results).
* ``bf16`` — the forward pass under ``torch.autocast(device, dtype=torch.bfloat16)``; bf16 has
  float32's exponent range, so no loss scaling is needed.
* ``fp16`` — autocast to float16 with a ``torch.amp.GradScaler``; SAM goes through
  :func:`flatmin.optim.amp.sam_step_amp`, which unscales each of its two passes and skips the
  whole step when either overflows (Micikevicius et al. 2018, arXiv:1710.03740).

A run's configuration (its hash) names the device *type* and the precision only when they are
not the CPU / ``fp32`` defaults, so the records of CPU runs keep the hashes they always had.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from flatmin.bench.methods import BuildContext, get_method
from flatmin.optim.amp import sam_step_amp
from flatmin.optim.esam import ESAM
from flatmin.optim.sam import SAM

if TYPE_CHECKING:  # train imports this module
    from flatmin.bench.train import RunSpec

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_PRECISION",
    "PRECISIONS",
    "DeviceUnavailableError",
    "autocast",
    "check_precision",
    "check_support",
    "grad_scaler",
    "resolve_device",
    "scaled_step",
]

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_DEVICE = "cpu"
DEFAULT_PRECISION = "fp32"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceUnavailableError(ValueError):
    """The requested device does not exist on this machine or in this torch build."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device) -> torch.device:
    """The device that ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) stands for.

    ``cuda`` without an index becomes the current CUDA device (``cuda:0`` unless changed), so a
    run records which device it used.

    Raises:
        DeviceUnavailableError: CUDA or MPS is not available, or ``cuda:N`` is beyond the
            visible devices.
        ValueError: ``name`` is not a device name.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    text = str(name)
    if text == "auto":
        if torch.cuda.is_available():
            return resolve_device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(
            f"Invalid device: {text!r} (expected auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch {torch.__version__} is built without CUDA"
                if torch.version.cuda is None
                else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"
            )
            raise DeviceUnavailableError(f"Invalid device: {text!r} is not available ({why})")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise DeviceUnavailableError(
                f"Invalid device: {text!r} is not available ({count} CUDA device"
                f"{'s' if count != 1 else ''} visible: cuda:0..cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise DeviceUnavailableError(
                f"Invalid device: {text!r} is not available (torch.backends.mps.is_available() "
                "is False: MPS needs Apple silicon and a torch built with MPS)"
            )
        return torch.device("mps")
    raise ValueError(f"Invalid device: {text!r} (expected auto, cpu, cuda, cuda:N or mps)")


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`.

    Raises:
        ValueError: any other value.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision: {precision!r} (expected one of {PRECISIONS})")
    return precision


def autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """The context of a forward pass at ``precision``: ``nullcontext()`` for ``fp32``.

    ``fp32`` enters no autocast region at all, so its arithmetic is exactly that of code that
    never heard of autocast.

    Example:
        >>> with autocast(torch.device("cpu"), "bf16"):
        ...     y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
        >>> y.dtype
        torch.bfloat16
    """
    check_precision(precision)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A fresh ``torch.amp.GradScaler`` for ``fp16``; ``None`` for the other precisions."""
    check_precision(precision)
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def check_support(spec: RunSpec, world_size: int = 1) -> None:
    """Refuse a method/precision/process combination the training loop cannot run.

    fp16 loss scaling goes through :func:`flatmin.optim.amp.sam_step_amp` for SAM (and ASAM)
    and ``GradScaler.step`` for plain optimizers; the SAM variants that skip or reshape the
    second pass (every-k, LookSAM, ESAM) have no fp16 recipe yet. ESAM's per-sample passes run
    the bare model, so they would not be synchronised across processes.

    Raises:
        ValueError: an unsupported combination (the message says what works instead).
    """
    method = get_method(spec.method)
    trajectory = get_method(method.trajectory)
    if trajectory.build is None or (world_size == 1 and spec.precision != "fp16"):
        return
    probe = nn.Linear(1, 1)
    hyper = trajectory.resolve(spec.hyper)
    opt = trajectory.build(BuildContext(probe, torch.optim.SGD, {"lr": 0.1}, hyper, 1, 0))
    if world_size > 1 and isinstance(opt, ESAM):
        raise ValueError(
            f"Invalid method for several processes: {spec.method!r} (its data selection picks "
            "per-replica samples that DDP does not coordinate; run it in one process)"
        )
    if spec.precision == "fp16" and hasattr(opt, "first_step") and type(opt) is not SAM:
        raise ValueError(
            f"Invalid precision: 'fp16' for method {spec.method!r} (fp16 loss scaling supports "
            "the plain optimizers and SAM/ASAM; use --precision bf16, which needs no scaler)"
        )


def scaled_step(
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    closure: Callable[[], torch.Tensor],
    net: nn.Module,
    *,
    per_replica: bool = False,
) -> torch.Tensor:
    """One fp16 step: SAM's two scaled passes, or a plain optimizer's ``GradScaler`` step.

    ``closure`` runs the forward under autocast and ``scaler.scale(loss).backward()``.
    """
    if isinstance(opt, SAM):
        return sam_step_amp(opt, scaler, closure, model=net, per_replica=per_replica).loss
    loss = closure()
    scaler.step(opt)
    scaler.update()
    return loss
