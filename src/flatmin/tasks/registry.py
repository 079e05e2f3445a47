"""Task registry: dataset + model + default training recipe, with ``quick`` and ``full`` budgets.

A :class:`Task` is a frozen record; :meth:`Task.load` turns it into a :class:`TaskData` holding
everything a training loop needs::

    data = get_task("digits").load("quick", seed=0)
    model = data.make_model()
    opt = data.recipe.optimizer_class(model.parameters(), **data.recipe.optimizer_kwargs())
    sched = data.recipe.make_scheduler(opt, len(data.train))
    for epoch in range(data.recipe.epochs):
        for inputs, targets in data.train:
            opt.zero_grad()
            data.loss_fn(model(inputs), targets).backward()
            opt.step()
            sched.step()

Label-noise variants are named ``<task>-noisy<NN>`` (``NN`` percent of the training labels flipped
symmetrically with a fixed seed; validation and test untouched); they use the task's
``noisy_full`` recipe in the full budget (more epochs, so that SGD memorises the noise).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from flatmin.data import (
    IGNORE_INDEX,
    Dataset,
    GraphSplit,
    NodeSplit,
    Split,
    TensorSplit,
    load_dataset,
    stratified_folds,
    stratified_indices,
    with_label_noise,
)
from flatmin.data.batching import Batches

__all__ = [
    "BUDGETS",
    "Recipe",
    "Task",
    "TaskData",
    "correct_counts",
    "correct_fn",
    "cross_validation_split",
    "get_task",
    "list_tasks",
    "loss_fn",
    "register_task",
]

#: The budgets every task defines: ``quick`` (minutes on a CPU) and ``full`` (the benchmark's).
BUDGETS = ("quick", "full")
_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}
_SCHEDULES = ("cosine", "constant")
SUBSET_SEED = 0


@dataclass(frozen=True)
class Recipe:
    """Default training recipe of a task at one budget.

    The learning rate follows ``lr · f(t)`` with ``t`` the optimizer step: ``"cosine"`` is a linear
    warmup over ``warmup_epochs`` then ``f = ½(1 + cos(π · progress))`` down to 0 at the last step;
    ``"constant"`` is ``f = 1`` after the warmup.

    Attributes:
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adamw"``.
        lr: peak learning rate.
        momentum: SGD momentum (ignored by AdamW).
        weight_decay: decoupled for AdamW, L2 for SGD.
        batch_size: training batch size (graph tasks: graphs; node tasks: ignored, full batch).
        epochs: passes over the (possibly subset) training split.
        schedule: ``"cosine"`` or ``"constant"``.
        warmup_epochs: linear warmup length.
        train_subset: train on a fixed stratified subset of this many samples (``None``: all).
        val_subset: validate on a fixed stratified subset of this size (``None``: all).
        test_subset: test on a fixed stratified subset of this size (``None``: all).
        fused: use the optimizer's fused kernel (one kernel for all parameters; on a CPU 4-5×
            faster than the default ``foreach`` step, which matters for the small models and
            the 2M-parameter embeddings of the text tasks).
    """

    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: int = 0
    train_subset: int | None = None
    val_subset: int | None = None
    test_subset: int | None = None
    fused: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"Invalid optimizer: {self.optimizer!r} (expected {list(_OPTIMIZERS)})"
            )
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"Invalid schedule: {self.schedule!r} (expected {list(_SCHEDULES)})")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"Invalid recipe: lr={self.lr}, epochs={self.epochs}, bs={self.batch_size}"
            )

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        """The base optimizer class (pass it to ``flatmin.SAM`` as ``base_optimizer``)."""
        return _OPTIMIZERS[self.optimizer]

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :attr:`optimizer_class`."""
        kw: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer == "sgd":
            kw["momentum"] = self.momentum
        if self.fused:
            kw["fused"] = True
        return kw

    def lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """Multiplier of :attr:`lr` at optimizer step ``step`` (0-based)."""
        total = self.epochs * steps_per_epoch
        warm = self.warmup_epochs * steps_per_epoch
        if step < warm:
            return (step + 1) / warm
        if self.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def make_scheduler(
        self, optimizer: torch.optim.Optimizer, steps_per_epoch: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """A per-step ``LambdaLR`` following :meth:`lr_factor` (call ``.step()`` every step)."""
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: self.lr_factor(s, steps_per_epoch)
        )


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled targets (``-100`` marks nodes outside a node split)."""
    return F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX)


def correct_fn(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """``(number correct, number labelled)`` of a batch (accuracy: ratio of the sums)."""
    mask = targets != IGNORE_INDEX
    correct = (outputs.argmax(dim=-1)[mask] == targets[mask]).sum()
    return int(correct), int(mask.sum())


def correct_counts(
    outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`correct_fn` as two int64 tensors on the outputs' device (no host sync).

    A prediction never equals :data:`~flatmin.data.IGNORE_INDEX`, so unlabelled targets never
    count as correct and no boolean indexing (which would sync an accelerator) is needed.
    """
    mask = targets != IGNORE_INDEX
    return (outputs.argmax(dim=-1) == targets).sum(), mask.sum()


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_nbytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


def _split_to(split: Split, device: torch.device) -> Split:
    """``split`` with its tensors on ``device`` (graph-classification graphs stay on the host)."""

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    if isinstance(split, TensorSplit):
        return TensorSplit(split.inputs.to(device), split.targets.to(device),
                           move(split.clean_targets))  # fmt: skip
    if isinstance(split, NodeSplit):
        graph = replace(split.graph, x=split.graph.x.to(device),
                        edge_index=split.graph.edge_index.to(device))  # fmt: skip
        return NodeSplit(graph, split.targets.to(device), move(split.clean_targets))
    return replace(split, targets=split.targets.to(device), clean_targets=move(split.clean_targets))


@dataclass(frozen=True)
class TaskData:
    """A task materialised for one budget and seed.

    Attributes:
        task: the task record.
        budget: ``"quick"`` or ``"full"``.
        recipe: the recipe of that budget.
        seed: the run seed (model initialisation and training-batch order).
        dataset: the dataset after subsetting and label noise.
        train: shuffled training batches (a new permutation each pass, from a generator seeded
            with ``seed``); ``drop_last`` so BatchNorm never sees a batch of one.
        train_eval: the training split in fixed order (for train loss/accuracy or BN updates).
        val, test: evaluation batches in fixed order.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (cross-entropy, ``ignore_index=-100``).
        correct_fn: ``correct_fn(outputs, targets) -> (correct, counted)``.
    """

    task: Task
    budget: str
    recipe: Recipe
    seed: int
    dataset: Dataset
    train: Batches
    train_eval: Batches
    val: Batches
    test: Batches
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(default=loss_fn)
    correct_fn: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]] = field(default=correct_fn)
    device: torch.device = field(default=torch.device("cpu"))

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.dataset.num_classes

    def make_model(self, seed: int | None = None) -> nn.Module:
        """Build the task's model with parameters initialised from ``seed`` (default: run seed).

        Initialisation runs on the CPU under ``torch.random.fork_rng``, so the caller's global RNG
        state is left untouched and the same seed gives the same weights on every device; the
        model is then moved to :attr:`device`.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed if seed is None else seed)
            model = self.task.build_model(self.dataset)
        return model if self.device.type == "cpu" else model.to(self.device)

    def to(self, device: torch.device | str, *, resident: bool | None = None) -> TaskData:
        """The same data with its batches delivered on ``device`` (and models built there).

        The splits are copied to ``device`` once (``resident``; default: when the dataset takes
        at most half of the device's free memory, always off CUDA), so a step slices batches on
        the device with no host copy; otherwise each batch is copied when it is drawn. The
        training stream keeps its generator (a CPU generator: the batch order is the same on
        every device). On the CPU (or the current device) this returns ``self``.
        """
        device = torch.device(device)
        if device == self.device:
            return self
        if resident is None:
            resident = True
            if device.type == "cuda":
                free = torch.cuda.mem_get_info(device)[0]
                resident = _nbytes(self.dataset) <= free // 2
        ds = self.dataset
        if resident:
            ds = replace(ds, train=_split_to(ds.train, device), val=_split_to(ds.val, device),
                         test=_split_to(ds.test, device))  # fmt: skip

        def batches(old: Batches, split: Split) -> Batches:
            indices = None if isinstance(split, NodeSplit) else old.indices
            return Batches(
                split, old.batch_size, shuffle=old.shuffle, generator=old.generator,
                drop_last=old.drop_last, indices=indices, device=device, shard=old.shard,
            )  # fmt: skip

        return replace(
            self, dataset=ds, device=device, train=batches(self.train, ds.train),
            train_eval=batches(self.train_eval, ds.train), val=batches(self.val, ds.val),
            test=batches(self.test, ds.test),
        )  # fmt: skip


def _subset_split(split: Split, n: int | None) -> Split:
    """Fixed stratified subset of ``n`` samples (seed :data:`SUBSET_SEED`) of a split."""
    if n is None or isinstance(split, NodeSplit) or n >= len(split):
        return split
    keep = stratified_indices(split.targets, (0.0, n / len(split)), seed=SUBSET_SEED)[1]
    if isinstance(split, GraphSplit):
        graphs = tuple(split.graphs[i] for i in keep.tolist())
        return replace(split, graphs=graphs, targets=split.targets[keep])
    return replace(split, inputs=split.inputs[keep], targets=split.targets[keep])


def _concat(splits: tuple[Split, ...]) -> Split:
    first = splits[0]
    targets = torch.cat([s.targets for s in splits])
    if isinstance(first, GraphSplit):
        graphs = tuple(g for s in splits for g in s.graphs)  # type: ignore[union-attr]
        return GraphSplit(graphs, targets)
    if isinstance(first, TensorSplit):
        inputs = torch.cat([s.inputs for s in splits])  # type: ignore[union-attr]
        return TensorSplit(inputs, targets)
    raise TypeError(f"Invalid split for cross-validation: {type(first).__name__}")


def _take(split: Split, index: torch.Tensor) -> Split:
    if isinstance(split, GraphSplit):
        return GraphSplit(tuple(split.graphs[i] for i in index.tolist()), split.targets[index])
    if isinstance(split, TensorSplit):
        return TensorSplit(split.inputs[index], split.targets[index])
    raise TypeError(f"Invalid split for cross-validation: {type(split).__name__}")


def cross_validation_split(dataset: Dataset, folds: int, fold: int) -> Dataset:
    """Fold ``fold`` of a stratified ``folds``-fold cross-validation of all of ``dataset``.

    The train, validation and test splits are pooled (in that order) and dealt to ``folds``
    stratified folds (:func:`~flatmin.data.stratified_folds`, seed :data:`SUBSET_SEED`): fold
    ``fold`` is the test split, fold ``fold + 1 (mod folds)`` the validation split, the others
    the training split.
    """
    pooled = _concat((dataset.train, dataset.val, dataset.test))
    parts = stratified_folds(pooled.targets, folds, seed=SUBSET_SEED)
    val_fold = (fold + 1) % folds
    train_idx = torch.cat([p for i, p in enumerate(parts) if i not in (fold, val_fold)])
    train_idx = torch.sort(train_idx).values
    return replace(
        dataset,
        train=_take(pooled, train_idx),
        val=_take(pooled, parts[val_fold]),
        test=_take(pooled, parts[fold]),
    )


@dataclass(frozen=True)
class Task:
    """A benchmark task: dataset + model + default recipes.

    Attributes:
        name: registry name.
        domain: ``"vision"``, ``"text"`` or ``"graph"``.
        dataset: dataset registry name.
        model: short model description (shown by ``flatmin tasks``).
        build_model: ``build_model(dataset) -> nn.Module`` (shapes taken from the dataset).
        quick, full: recipes of the two budgets.
        noisy_full: full-budget recipe of the label-noise variants (default: ``full``).
        folds: ``k`` for stratified k-fold cross-validation (``None``: the dataset's fixed
            splits). Every sample of the dataset is pooled and dealt to ``k`` folds; run ``f``
            tests on fold ``f``, validates on fold ``f + 1 (mod k)`` and trains on the rest, so a
            run over all folds tests every sample exactly once (:meth:`load` with ``fold=``).
        label_noise: fraction of training labels flipped (``0`` for clean tasks).
        noise_seed: seed of the label flips (fixed: the same noisy labels for every run).
        description: one line.
    """

    name: str
    domain: str
    dataset: str
    model: str
    build_model: Callable[[Dataset], nn.Module]
    quick: Recipe
    full: Recipe
    noisy_full: Recipe | None = None
    folds: int | None = None
    label_noise: float = 0.0
    noise_seed: int = 0
    description: str = ""

    def recipe(self, budget: str = "quick") -> Recipe:
        """The recipe of ``budget`` (``"quick"`` or ``"full"``)."""
        if budget not in BUDGETS:
            raise ValueError(f"Invalid budget: {budget!r} (expected one of {BUDGETS})")
        if budget == "full" and self.label_noise > 0 and self.noisy_full is not None:
            return self.noisy_full
        return self.quick if budget == "quick" else self.full

    def with_label_noise(self, fraction: float) -> Task:
        """The variant of this task with ``fraction`` symmetric label noise on the train split."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"Invalid label-noise fraction: {fraction} (expected in (0, 1))")
        pct = round(100 * fraction)
        return replace(self, name=f"{self.name}-noisy{pct}", label_noise=fraction)

    def load(
        self, budget: str = "quick", *, seed: int = 0, dataset: Dataset | None = None,
        cache_dir: str | os.PathLike[str] | None = None, fold: int | None = None,
    ) -> TaskData:  # fmt: skip
        """Load the data (fetching it if needed) and build the batch streams for one run.

        For a cross-validated task (:attr:`folds`) the splits are those of fold ``fold``. The
        training split is then reduced to the recipe's fixed ``train_subset`` (stratified, seed
        0), and label noise (if any) flips exactly ``round(label_noise · n)`` of its labels;
        validation and test are never noised.

        Args:
            budget: ``"quick"`` or ``"full"``.
            seed: run seed (model init and batch order).
            dataset: an already loaded :class:`~flatmin.data.Dataset` of :attr:`dataset` to reuse.
            cache_dir: data cache directory.
            fold: the fold of a cross-validated task (``None``: fold 0; refused for a task with
                fixed splits).
        """
        recipe = self.recipe(budget)
        ds = load_dataset(self.dataset, cache_dir=cache_dir) if dataset is None else dataset
        if ds.name != self.dataset:
            raise ValueError(
                f"Invalid dataset: {ds.name!r} (task {self.name} uses {self.dataset!r})"
            )
        if self.folds is None:
            if fold is not None:
                raise ValueError(f"Invalid fold: {fold} (task {self.name} has fixed splits)")
        else:
            fold = 0 if fold is None else fold
            if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < self.folds:
                raise ValueError(
                    f"Invalid fold: {fold!r} (task {self.name} has folds 0..{self.folds - 1})"
                )
            ds = cross_validation_split(ds, self.folds, fold)
        ds = replace(
            ds,
            train=_subset_split(ds.train, recipe.train_subset),
            val=_subset_split(ds.val, recipe.val_subset),
            test=_subset_split(ds.test, recipe.test_subset),
        )
        if self.label_noise > 0:
            ds = with_label_noise(ds, self.label_noise, seed=self.noise_seed)
        gen = torch.Generator().manual_seed(seed)
        bs = recipe.batch_size
        eval_bs = max(bs, 256)
        drop = len(ds.train) > bs
        return TaskData(
            task=self, budget=budget, recipe=recipe, seed=seed, dataset=ds,
            train=Batches(ds.train, bs, shuffle=True, generator=gen, drop_last=drop),
            train_eval=Batches(ds.train, eval_bs), val=Batches(ds.val, eval_bs),
            test=Batches(ds.test, eval_bs),
        )  # fmt: skip


_REGISTRY: dict[str, Task] = {}
_NOISY = re.compile(r"^(?P<base>.+)-noisy(?P<pct>[0-9]{1,2})$")


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry (``ValueError`` on a duplicate name); returns it."""
    if task.name in _REGISTRY:
        raise ValueError(f"Invalid task name: {task.name!r} (already registered)")
    _REGISTRY[task.name] = task
    return task


def list_tasks(*, domain: str | None = None, include_noisy: bool = True) -> list[str]:
    """Names of the registered tasks (and the documented label-noise variants)."""
    from flatmin.tasks.catalog import NOISY_VARIANTS

    names = list(_REGISTRY)
    if include_noisy:
        names += list(NOISY_VARIANTS)
    return [n for n in names if domain is None or get_task(n).domain == domain]


def get_task(name: str) -> Task:
    """Return the task ``name``; ``<task>-noisy<NN>`` gives its ``NN`` % label-noise variant.

    Raises:
        ValueError: unknown name (the message lists the known tasks).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    m = _NOISY.match(name)
    if m and m["base"] in _REGISTRY and 0 < int(m["pct"]) < 100:
        return _REGISTRY[m["base"]].with_label_noise(int(m["pct"]) / 100)
    raise ValueError(
        f"Unknown task: {name!r} (known: {', '.join(_REGISTRY)}; "
        "append -noisyNN for NN % label noise)"
    )
