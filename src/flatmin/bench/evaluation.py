"""Evaluation in the training loop: poolable counts, ESAM's per-sample losses, final splits."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from flatmin.data import IGNORE_INDEX
from flatmin.data.batching import Batches, GraphBatch
from flatmin.tasks import TaskData
from flatmin.tasks import loss_fn as _registry_loss_fn

__all__ = [
    "Counts",
    "LossFn",
    "PerSampleLosses",
    "evaluate",
    "evaluate_counts",
    "final_counts",
    "per_sample_losses",
    "pool_counts",
    "split_metrics",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Counts:
    """Summed loss, correct predictions and labelled samples of one evaluation (poolable)."""

    loss: float = 0.0
    correct: int = 0
    n: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.loss + other.loss, self.correct + other.correct, self.n + other.n)

    @property
    def acc(self) -> float:
        """Accuracy (NaN without samples)."""
        return self.correct / self.n if self.n else math.nan

    @property
    def mean_loss(self) -> float:
        """Loss per labelled sample (NaN without samples)."""
        return self.loss / self.n if self.n else math.nan


@torch.no_grad()
def evaluate_counts(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    correct_fn: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]],
) -> Counts:
    """Summed loss and correct predictions over labelled targets, in eval mode (restored)."""
    was_training = model.training
    model.eval()
    total = Counts()
    try:
        for inputs, targets in batches:
            out = model(inputs)
            c, n = correct_fn(out, targets)
            if n:
                total = total + Counts(float(loss_fn(out, targets)) * n, c, n)
    finally:
        model.train(was_training)
    return total


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    correct_fn: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]],
) -> tuple[float, float]:
    """Mean loss and accuracy over labelled targets, in eval mode (the mode is restored).

    Returns:
        ``(loss, accuracy)`` with the loss averaged per labelled sample (NaN without samples).
    """
    counts = evaluate_counts(model, batches, loss_fn, correct_fn)
    return counts.mean_loss, counts.acc


def _graph_subset(g: GraphBatch, index: torch.Tensor) -> GraphBatch:
    """The graphs ``index`` of a merged batch, as a new batch (graph ``j`` is ``index[j]``)."""
    new_id = torch.full((g.num_graphs,), -1, dtype=torch.long, device=g.batch.device)
    new_id[index] = torch.arange(index.numel(), device=g.batch.device)
    node_graph = new_id[g.batch]
    keep = node_graph >= 0
    renumber = torch.cumsum(keep.long(), 0) - 1
    edges = g.edge_index[:, keep[g.edge_index[0]]]  # edges never cross graphs
    return GraphBatch(g.x[keep], renumber[edges], node_graph[keep], int(index.numel()))


class PerSampleLosses:
    """ESAM's per-sample cross-entropy of one batch (see :func:`per_sample_losses`).

    The labelled samples are found only when needed — node classification alone has unlabelled
    targets — so building one per step costs no host sync.
    """

    def __init__(
        self, model: nn.Module, inputs: Any, targets: torch.Tensor, outputs: list[torch.Tensor],
        loss_fn: LossFn = _registry_loss_fn,
    ) -> None:  # fmt: skip
        self.model, self.inputs, self.targets, self.outputs = model, inputs, targets, outputs
        self.loss_fn = loss_fn
        self.node_level = isinstance(inputs, GraphBatch) and targets.numel() != inputs.num_graphs
        self._labelled: torch.Tensor | None = None

    @property
    def labelled(self) -> torch.Tensor:
        """Indices of the labelled targets (the samples)."""
        if self._labelled is None:
            self._labelled = torch.nonzero(self.targets != IGNORE_INDEX).flatten()
        return self._labelled

    def per_sample(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task's loss of every sample: cross-entropy, or a user's loss mapped per sample."""
        if self.loss_fn is _registry_loss_fn:
            return F.cross_entropy(out, targets, reduction="none")
        loss_fn = self.loss_fn
        return torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, targets)

    def losses(self, out: torch.Tensor) -> torch.Tensor:
        """Per-sample losses of the whole batch's outputs ``out``."""
        if not self.node_level:  # every image, document or graph is labelled
            return self.per_sample(out, self.targets)
        rows = self.labelled
        return self.per_sample(out[rows], self.targets[rows])

    def __call__(self, index: torch.Tensor | None) -> torch.Tensor:
        """Per-sample losses of the whole batch (``None``) or of samples ``index``."""
        if index is None:
            out = self.model(self.inputs)
            self.outputs.append(out.detach())
            return self.losses(out)
        rows = self.labelled[index]
        if self.node_level:
            out = self.model(self.inputs)[rows]
        elif isinstance(self.inputs, GraphBatch):
            out = self.model(_graph_subset(self.inputs, rows))
        else:
            out = self.model(self.inputs[rows])
        return self.per_sample(out, self.targets[rows])


def per_sample_losses(
    model: nn.Module, inputs: Any, targets: torch.Tensor, outputs: list[torch.Tensor],
    loss_fn: LossFn = _registry_loss_fn,
) -> PerSampleLosses:  # fmt: skip
    """ESAM's ``loss_fn(index)``: per-sample cross-entropy of the batch or of samples ``index``.

    Samples are the labelled targets: images or documents (a sub-batch is sliced), graphs (a
    sub-batch of graphs is re-merged), or the labelled nodes of a node-classification graph (the
    whole graph is run and the selected nodes' losses kept). The outputs of the whole-batch call
    are appended to ``outputs`` (for the running train accuracy). A task's own ``loss_fn`` is
    applied to each sample alone (``torch.func.vmap``).
    """
    return PerSampleLosses(model, inputs, targets, outputs, loss_fn)


_SPLITS = ("test", "val", "train", "train_clean", "noise_memorised")
_ACC_KEY = {
    "test": "test_acc",
    "val": "val_acc",
    "train": "train_acc",
    "train_clean": "train_acc_clean",
    "noise_memorised": "noise_memorised",
}


def _eval_splits(data: TaskData) -> Iterator[tuple[str, Batches]]:
    """The evaluation streams of the final weights (see :func:`final_counts`)."""
    yield "test", data.test
    yield "val", data.val
    yield "train", data.train_eval
    train = data.dataset.train
    clean = train.clean_targets
    if clean is None:
        return
    bs, device = data.train_eval.batch_size, data.train_eval.device
    yield "train_clean", Batches(replace(train, targets=clean), bs, device=device)
    # Accuracy w.r.t. the *noisy* label on the flipped samples only (the others are ignored):
    # the fraction of the label noise that the model reproduces, i.e. has memorised.
    flipped = torch.where(train.targets != clean, train.targets, IGNORE_INDEX)
    yield "noise_memorised", Batches(replace(train, targets=flipped), bs, device=device)


def final_counts(
    model: nn.Module, data: TaskData, only: tuple[str, ...] | None = None
) -> dict[str, Counts]:
    """Counts of the final weights on every evaluation split (or ``only`` those)."""
    return {
        name: evaluate_counts(model, batches, data.loss_fn, data.correct_fn)
        for name, batches in _eval_splits(data)
        if only is None or name in only
    }


def split_metrics(counts: dict[str, Counts]) -> dict[str, float | None]:
    """Accuracies and losses of pooled counts (``None`` for a split that does not exist)."""
    out: dict[str, float | None] = {}
    for name in _SPLITS:
        c = counts.get(name)
        out[_ACC_KEY[name]] = None if c is None else c.acc
        if name in ("test", "val", "train") and c is not None:
            out[f"{name}_loss"] = c.mean_loss
    return out


def pool_counts(parts: Iterable[dict[str, Counts]]) -> dict[str, Counts]:
    """Counts summed split by split (over the folds of a cross-validated run)."""
    total: dict[str, Counts] = {}
    for part in parts:
        for k, c in part.items():
            total[k] = total.get(k, Counts()) + c
    return total
