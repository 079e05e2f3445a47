"""A user's own data as a :class:`~flatmin.data.Dataset`: tensors or map-style datasets.

Example:
    >>> import torch
    >>> from flatmin.data import tensor_dataset
    >>> x, y = torch.randn(30, 4), torch.arange(30) % 3
    >>> ds = tensor_dataset("toy", train=(x[:20], y[:20]), val=(x[20:25], y[20:25]),
    ...                     test=(x[25:], y[25:]))
    >>> ds.num_classes, len(ds.train)
    (3, 20)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flatmin.data.splits import Dataset, TensorSplit

__all__ = ["SplitSource", "tensor_dataset"]

SplitSource = tuple[torch.Tensor, torch.Tensor] | Any
"""``(inputs, targets)`` tensors, or a map-style dataset whose items are ``(input, target)``."""


def _as_split(name: str, source: SplitSource) -> TensorSplit:
    """``source`` as a :class:`TensorSplit` (map-style datasets are stacked item by item)."""
    if isinstance(source, tuple) and len(source) == 2 and all(
        isinstance(t, torch.Tensor) for t in source
    ):
        inputs, targets = source
    elif hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        items = [source[i] for i in range(len(source))]
        if not items:
            raise ValueError(f"Invalid {name} split: the dataset is empty")
        if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            raise TypeError(
                f"Invalid {name} split: items like {items[0]!r} (expected (input, target) pairs)"
            )
        inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
        targets = torch.as_tensor([int(t) for _, t in items])
    else:
        raise TypeError(
            f"Invalid {name} split: {type(source).__name__} (expected (inputs, targets) tensors "
            "or a map-style dataset of (input, target) items)"
        )
    if targets.ndim != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(
            f"Invalid {name} targets: shape {tuple(targets.shape)}, {targets.dtype} (expected "
            "1-D integer class labels)"
        )
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"Invalid {name} split: {inputs.shape[0]} inputs but {targets.shape[0]} targets"
        )
    if targets.numel() == 0:
        raise ValueError(f"Invalid {name} split: no samples")
    return TensorSplit(inputs, targets.long())


def tensor_dataset(
    name: str,
    *,
    train: SplitSource,
    val: SplitSource,
    test: SplitSource,
    clean_train_targets: torch.Tensor | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    domain: str = "custom",
) -> Dataset:
    """A :class:`~flatmin.data.Dataset` from the user's own splits (a ``Task``'s ``data``).

    Args:
        name: the data's name.
        train: ``(inputs, targets)`` tensors (sample ``i`` is ``inputs[i]``), or a map-style
            dataset (``len`` and ``[i] -> (input, target)``, stacked once).
        val: the validation split, as ``train``.
        test: the test split, as ``train``.
        clean_train_targets: the true labels of a training set whose ``targets`` are noisy:
            the report then shows the memorisation columns (train accuracy on the true labels,
            share of the flipped labels reproduced).
        num_classes: number of classes (default: the largest label + 1).
        class_names: one per class (default: ``"0"``, ``"1"``, ...).
        domain: informational (the task's ``domain`` picks the report's table).

    Raises:
        TypeError, ValueError: a split that is not tensors or a dataset, non-integer or
            mismatched targets, labels outside ``[0, num_classes)``.
    """
    splits = {k: _as_split(k, v) for k, v in (("train", train), ("val", val), ("test", test))}
    if clean_train_targets is not None:
        clean = torch.as_tensor(clean_train_targets).long()
        if clean.shape != splits["train"].targets.shape:
            raise ValueError(
                f"Invalid clean_train_targets: shape {tuple(clean.shape)} (expected "
                f"{tuple(splits['train'].targets.shape)}, one per training sample)"
            )
        splits["train"] = TensorSplit(splits["train"].inputs, splits["train"].targets, clean)
    labels = torch.cat([s.targets for s in splits.values()])
    if clean_train_targets is not None:
        labels = torch.cat([labels, splits["train"].clean_targets])  # type: ignore[list-item]
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        raise ValueError(
            f"Invalid labels: range [{int(labels.min())}, {int(labels.max())}] (expected in "
            f"[0, {k}))"
        )
    names = tuple(str(c) for c in range(k)) if class_names is None else tuple(class_names)
    if len(names) != k:
        raise ValueError(f"Invalid class_names: {len(names)} names for {k} classes")
    return Dataset(name, domain, splits["train"], splits["val"], splits["test"], k, names)
