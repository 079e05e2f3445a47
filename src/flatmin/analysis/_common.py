"""Shared plumbing of the analysis layer: model-state guard, data handling, evaluation, BatchNorm.

Every public analysis function runs inside :func:`preserved`, which snapshots the parameters,
buffers, per-module ``training`` flags and BatchNorm ``momentum`` and restores them bit-exactly in a
``finally`` block, so the caller's model is unchanged even when an exception escapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from itertools import islice
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatmin.optim.bn import bn_modules

Batch = tuple[Any, Tensor]
Batches = Iterable[Batch]
LossFn = Callable[[Tensor, Tensor], Tensor]
BNMode = Literal["eval", "batch"]

_BN_MODES = ("eval", "batch")


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Snapshot the model's parameters, buffers, modes and BN momenta; restore them on exit."""
    with torch.no_grad():
        params = [(p, p.detach().clone()) for p in model.parameters()]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in params:
                p.copy_(saved)
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes:
            m.training = training
        for bn, momentum in momenta:
            bn.momentum = momentum


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {choices})")


def check_max_batches(max_batches: int | None) -> None:
    """Validate ``max_batches`` (``None`` or a positive int)."""
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"Invalid max_batches: {max_batches!r} (expected None or an int >= 1)")


def set_eval_mode(model: nn.Module, bn_mode: BNMode) -> None:
    """Put ``model`` in eval mode; with ``bn_mode="batch"`` BatchNorm layers use batch statistics.

    Dropout and other stochastic layers are always off, so results never touch the global RNG.
    """
    check_choice("bn_mode", bn_mode, _BN_MODES)
    model.eval()
    if bn_mode == "batch":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train()


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_batch(batch: Any, index: int | None = None) -> None:
    """Raise unless ``batch`` is a pair ``(inputs, targets)`` (a tuple or a list of two).

    Unpacking anything else fails far from the cause ("too many values to unpack"), or, for a
    tensor of two rows, silently takes its rows as inputs and targets.

    Raises:
        TypeError: ``batch`` is a tensor or not a tuple/list.
        ValueError: ``batch`` holds other than two values.
    """
    which = "batch" if index is None else f"batch {index}"
    if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)):
        raise TypeError(
            f"Invalid {which}: {type(batch).__name__} (expected a pair (inputs, targets); "
            "pass [(x, y)] for a single batch)"
        )
    if len(batch) != 2:
        raise ValueError(
            f"Invalid {which}: {len(batch)} values (expected a pair (inputs, targets))"
        )


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move ``(inputs, targets)`` to ``device`` (inputs may be a tensor or a tuple of tensors)."""
    check_batch(batch)
    inputs, targets = batch
    if isinstance(inputs, Tensor):
        inputs = inputs.to(device)
    elif isinstance(inputs, (tuple, list)):
        inputs = type(inputs)(x.to(device) if isinstance(x, Tensor) else x for x in inputs)
    return inputs, targets.to(device)


def forward(model: nn.Module, inputs: Any) -> Tensor:
    """Call ``model(inputs)``, unpacking a tuple/list of inputs as positional arguments."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size(targets: Tensor) -> int:
    """Number of examples in a batch (first dimension of the targets)."""
    return int(targets.shape[0]) if targets.ndim > 0 else 1


def materialize(batches: Batches, max_batches: int | None) -> list[Batch]:
    """Take at most ``max_batches`` batches as a list (so they can be reused at every point)."""
    check_max_batches(max_batches)
    out = list(islice(iter(batches), max_batches))
    if not out:
        raise ValueError("Invalid batches: the iterable yielded no batch")
    for i, batch in enumerate(out):
        check_batch(batch, i)
    return out


def as_datasets(data: Mapping[str, Batches] | Batches) -> dict[str, Batches]:
    """Normalise ``data`` to ``{name: batches}`` (a bare iterable becomes ``{"data": batches}``)."""
    if isinstance(data, Mapping):
        if not data:
            raise ValueError("Invalid data: empty mapping (expected name -> batches)")
        return dict(data)
    return {"data": data}


def reusable(batches: Batches) -> Batches:
    """Return ``batches`` unchanged if it can be iterated again, else a list of its items."""
    if iter(batches) is batches:  # a one-shot iterator or generator
        return list(batches)
    return batches


def count_errors(outputs: Tensor, targets: Tensor) -> tuple[float, int] | None:
    """Misclassified count and number of labels, or ``None`` if the outputs are not class scores.

    Class scores are ``outputs`` of shape ``(N, C, ...)`` with integer ``targets`` of shape
    ``(N, ...)``; the prediction is the ``argmax`` over dim 1. Float targets (regression, soft
    labels) give ``None``, reported as a NaN error.
    """
    if outputs.ndim < 2 or targets.is_floating_point():
        return None
    if targets.shape != outputs.shape[:1] + outputs.shape[2:]:
        return None
    wrong = (outputs.argmax(1) != targets).sum().item()
    return float(wrong), targets.numel()


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: LossFn, batches: Batches, max_batches: int | None
) -> tuple[float, float]:
    """Mean loss and error over ``batches`` with the model in its current mode.

    The loss is ``Σ_b n_b L_b / Σ_b n_b`` (``loss_fn`` is assumed to average over its batch); the
    error is the fraction of misclassified labels, or NaN when the outputs are not class scores.
    """
    device = model_device(model)
    total_loss = 0.0
    total_n = 0
    wrong = 0.0
    labels = 0
    classify = True
    for batch in islice(batches, max_batches):
        inputs, targets = to_device(batch, device)
        outputs = forward(model, inputs)
        n = batch_size(targets)
        total_loss += float(loss_fn(outputs, targets)) * n
        total_n += n
        counted = count_errors(outputs, targets)
        if counted is None:
            classify = False
        else:
            wrong += counted[0]
            labels += counted[1]
    if total_n == 0:
        raise ValueError("Invalid batches: the iterable yielded no batch")
    error = wrong / labels if classify and labels else float("nan")
    return total_loss / total_n, error


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Batches, max_batches: int | None) -> None:
    """Recompute BN running statistics as a cumulative average over ``batches`` (in place).

    Like :func:`torch.optim.swa_utils.update_bn`: statistics are reset, ``momentum=None`` gives the
    cumulative moving average, BN layers run in training mode and every other layer in eval mode
    (so dropout stays off). The caller restores momentum and modes (see :func:`preserved`).
    """
    layers = bn_modules(model)
    if not layers:
        return
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in layers:
        m.train()
    device = model_device(model)
    seen = 0
    for batch in islice(batches, max_batches):
        inputs, _ = to_device(batch, device)
        forward(model, inputs)
        seen += 1
    if seen == 0:
        raise ValueError("Invalid bn_batches: the iterable yielded no batch")
