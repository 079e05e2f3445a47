"""The task protocol: data + model factory + loss + training recipe, for one domain.

A :class:`Task` is a frozen record (public as ``flatmin.bench.Task``); :meth:`Task.load` turns it
into a :class:`TaskData` holding everything a training loop needs::

    data = task.load("quick", seed=0)
    model = data.make_model()
    opt = data.recipe.optimizer_class(model.parameters(), **data.recipe.optimizer_kwargs())
    sched = data.recipe.make_scheduler(opt, len(data.train))
    for epoch in range(data.recipe.epochs):
        for inputs, targets in data.train:
            opt.zero_grad()
            data.loss_fn(model(inputs), targets).backward()
            opt.step()
            sched.step()

The built-in tasks (:mod:`flatmin.tasks.catalog`) name a registered dataset; a user's own task
brings its data (``data=``: a :class:`~flatmin.data.Dataset`, e.g. from
:func:`~flatmin.data.tensor_dataset`, or a zero-argument callable returning one) and may bring its
own ``loss``. Label-noise variants are named ``<task>-noisy<NN>`` (``NN`` percent of the training
labels flipped symmetrically with a fixed seed; validation and test untouched); they use the
task's ``noisy_full`` recipe in the full budget (more epochs, so that SGD memorises the noise).
``<task>-noisy0`` is the clean control of that protocol (no flips, the ``noisy_full`` recipe),
``<task>-asym<NN>`` flips ``NN`` % of some classes to a fixed other class
(:func:`~flatmin.data.with_asymmetric_noise`), and ``<task>-x<F>`` trains ``F`` × the epochs of
every recipe (:meth:`Task.with_budget`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
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
    with_asymmetric_noise,
    with_label_noise,
)
from flatmin.data.augment import CropFlip
from flatmin.data.batching import Batches

__all__ = [
    "BUDGETS",
    "DataSource",
    "Recipe",
    "Task",
    "TaskData",
    "correct_counts",
    "correct_fn",
    "cross_validation_split",
    "loss_fn",
    "split_fold_name",
]

#: The budgets every task defines: ``quick`` (minutes on a CPU) and ``full`` (the benchmark's).
BUDGETS = ("quick", "full")
_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}
_SCHEDULES = ("cosine", "constant")
#: Kinds of label noise: flips to a uniform other class, or class-dependent flips.
NOISE_KINDS = ("symmetric", "asymmetric")
SUBSET_SEED = 0
_FOLD = re.compile(r"^(?P<base>.+)@fold(?P<fold>0|[1-9][0-9]*)$")


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
        augment: crop and flip the training batches (:class:`~flatmin.data.augment.CropFlip`;
            ``None``: none). Training batches only, drawn from the run seed (the same images for
            every method; SAM's two passes see one batch); validation, test and the training-set
            evaluation are never augmented. Needs image inputs ``(N, C, H, W)``.
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
    augment: CropFlip | None = None

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
        if self.augment is not None and not isinstance(self.augment, CropFlip):
            raise TypeError(f"Invalid augment: {self.augment!r} (expected a CropFlip or None)")

    def config(self) -> dict[str, Any]:
        """The recipe as plain JSON values (a run's hash covers them).

        ``augment`` appears only when set, so the runs of a recipe without augmentation keep
        the hashes they had before the option existed.
        """
        config = asdict(self)
        if self.augment is None:
            del config["augment"]
        return config

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
                augment=old.augment,
            )  # fmt: skip

        return replace(
            self, dataset=ds, device=device, train=batches(self.train, ds.train),
            train_eval=batches(self.train_eval, ds.train), val=batches(self.val, ds.val),
            test=batches(self.test, ds.test),
        )  # fmt: skip


def _index(split: Split, index: torch.Tensor) -> Split:
    """Samples ``index`` of a tensor or graph split (its clean labels with them)."""
    clean = None if split.clean_targets is None else split.clean_targets[index]
    if isinstance(split, GraphSplit):
        graphs = tuple(split.graphs[i] for i in index.tolist())
        return GraphSplit(graphs, split.targets[index], clean)
    if isinstance(split, TensorSplit):
        return TensorSplit(split.inputs[index], split.targets[index], clean)
    raise TypeError(f"Invalid split for indexing: {type(split).__name__} (expected samples)")


def _subset_split(split: Split, n: int | None) -> Split:
    """Fixed stratified subset of ``n`` samples (seed :data:`SUBSET_SEED`) of a split."""
    if n is None or isinstance(split, NodeSplit) or n >= len(split):
        return split
    keep = stratified_indices(split.targets, (0.0, n / len(split)), seed=SUBSET_SEED)[1]
    return _index(split, keep)


def _concat(splits: tuple[Split, ...]) -> Split:
    """The splits' samples in order (clean labels kept when any split has them)."""
    targets = torch.cat([s.targets for s in splits])
    clean = None
    if any(s.clean_targets is not None for s in splits):
        clean = torch.cat([s.targets if s.clean_targets is None else s.clean_targets
                           for s in splits])  # fmt: skip
    if all(isinstance(s, GraphSplit) for s in splits):
        graphs = tuple(g for s in splits for g in s.graphs)  # type: ignore[union-attr]
        return GraphSplit(graphs, targets, clean)
    if all(isinstance(s, TensorSplit) for s in splits):
        inputs = torch.cat([s.inputs for s in splits])  # type: ignore[union-attr]
        return TensorSplit(inputs, targets, clean)
    kinds = sorted({type(s).__name__ for s in splits})
    raise TypeError(f"Invalid splits for cross-validation: {kinds} (expected samples)")


def cross_validation_split(dataset: Dataset, folds: int, fold: int) -> Dataset:
    """Outer fold ``fold`` of a nested, stratified ``folds``-fold cross-validation of ``dataset``.

    The train, validation and test splits are pooled (in that order) and dealt to ``folds``
    stratified folds (:func:`~flatmin.data.stratified_folds`, seed :data:`SUBSET_SEED`): fold
    ``fold`` is the test split, and the other ``folds - 1`` folds (the outer training set) are
    split again, stratified, into the training split and an inner validation split of
    ``1 / (folds - 1)`` of them. Validation is therefore always carved from the outer training
    set: a sample that fold ``fold`` tests never validates fold ``fold``'s model or choices.
    """
    pooled = _concat((dataset.train, dataset.val, dataset.test))
    parts = stratified_folds(pooled.targets, folds, seed=SUBSET_SEED)
    outer = torch.sort(torch.cat([p for i, p in enumerate(parts) if i != fold])).values
    inner_train, inner_val = stratified_indices(
        pooled.targets[outer], (0.0, 1.0 / (folds - 1)), seed=SUBSET_SEED
    )
    return replace(
        dataset,
        train=_index(pooled, outer[inner_train]),
        val=_index(pooled, outer[inner_val]),
        test=_index(pooled, parts[fold]),
    )


def split_fold_name(name: str) -> tuple[str, int | None]:
    """``(task, fold)`` of a fold task's name (``"mutag@fold3"``: ``("mutag", 3)``).

    A name that is not a fold task's gives ``(name, None)``.
    """
    m = _FOLD.match(name)
    return (name, None) if m is None else (m["base"], int(m["fold"]))


DataSource = Dataset | Callable[[], Dataset]
"""A user task's data: a :class:`~flatmin.data.Dataset` or a zero-argument callable making one."""


@dataclass(frozen=True)
class Task:
    """A task: data, a model factory, a loss, a recipe per budget and a domain.

    Built-in tasks name a registered dataset (``dataset``); a user's own task brings its data
    (``data``) and is found by import path (``flatmin bench --task mypkg.tasks:my_task``,
    :func:`~flatmin.tasks.get_task`), see ``docs/own_task.md``. Example of a user task::

        my_task = Task(
            "blobs", "tabular", "blobs", "MLP", lambda ds: MLP(ds.num_classes),
            quick=Recipe("sgd", lr=0.1, weight_decay=5e-4, batch_size=32, epochs=10),
            data=lambda: tensor_dataset("blobs", train=(x, y), val=(xv, yv), test=(xt, yt)),
        )

    Attributes:
        name: the task's name (the registry name of a built-in task; the import path of a user
            task once resolved by :func:`~flatmin.tasks.get_task`).
        domain: the report's table for it (``"vision"``, ``"text"``, ``"graph"``, or any label).
        dataset: the name of the data: a registered dataset (``flatmin data list``), or the
            user's own name for ``data`` (a process loads each name once: tasks with different
            data need different names).
        model: short model description (shown by ``flatmin tasks`` and in the report).
        build_model: ``build_model(dataset) -> nn.Module`` (shapes taken from the dataset).
        quick, full: recipes of the two budgets (``full=None``: the same as ``quick``).
        noisy_full: full-budget recipe of the label-noise variants (default: ``full``).
        folds: ``k`` for nested stratified k-fold cross-validation (``None``: the dataset's
            fixed splits). Every sample is pooled and dealt to ``k`` folds; run ``f`` tests on
            fold ``f`` and trains and validates on a stratified split of the others
            (:func:`cross_validation_split`), so a run over all folds tests every sample once.
            The benchmark runs each outer fold as its own task (:meth:`fold`).
        label_noise: fraction of training labels flipped (``0`` for clean tasks).
        noise_kind: ``"symmetric"`` (:func:`~flatmin.data.with_label_noise`) or
            ``"asymmetric"`` (:func:`~flatmin.data.with_asymmetric_noise`: ``label_noise`` of
            each source class flipped to its fixed target class).
        noise_seed: seed of the label flips (fixed: the same noisy labels for every run).
        description: one line.
        data: the user's data (keyword only; ``None``: load the registered ``dataset``). A
            training split with ``clean_targets`` (labels before the user's own noise) turns on
            the memorisation columns of the report.
        loss: ``loss(outputs, targets) -> scalar mean`` (keyword only; default: cross-entropy
            ignoring ``-100`` targets). ESAM's per-sample losses call it on single samples
            (``torch.func.vmap``); accuracy is always the argmax's.
        outer_fold: ``(f, k)`` (keyword only): this task's splits are outer fold ``f`` of the
            nested ``k``-fold cross-validation of its data (the tasks made by :meth:`fold`).
    """

    name: str
    domain: str
    dataset: str
    model: str
    build_model: Callable[[Dataset], nn.Module]
    quick: Recipe
    full: Recipe | None = None
    noisy_full: Recipe | None = None
    folds: int | None = None
    label_noise: float = 0.0
    noise_seed: int = 0
    description: str = ""
    noise_kind: str = "symmetric"
    data: DataSource | None = field(default=None, kw_only=True, compare=False)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(
        default=loss_fn, kw_only=True, compare=False
    )
    outer_fold: tuple[int, int] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        for name in ("name", "domain", "dataset"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise TypeError(f"Invalid task {name}: {value!r} (expected a non-empty str)")
        for name in ("quick", "full", "noisy_full"):
            value = getattr(self, name)
            if not isinstance(value, Recipe) and (name == "quick" or value is not None):
                raise TypeError(f"Invalid task {name}: {value!r} (expected a Recipe)")
        for name in ("build_model", "loss"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Invalid task {name}: {getattr(self, name)!r} (not callable)")
        if self.data is not None and not (isinstance(self.data, Dataset) or callable(self.data)):
            raise TypeError(
                f"Invalid task data: {type(self.data).__name__} (expected a flatmin.data.Dataset "
                "or a zero-argument callable returning one)"
            )
        if self.folds is not None and (
            isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 3
        ):
            raise ValueError(f"Invalid folds: {self.folds!r} (expected an int >= 3 or None)")
        if self.outer_fold is not None:
            fk = self.outer_fold
            ok = isinstance(fk, tuple) and len(fk) == 2 and all(type(v) is int for v in fk)
            if self.folds is not None or not ok or fk[1] < 3 or not 0 <= fk[0] < fk[1]:
                raise ValueError(
                    f"Invalid outer_fold: {self.outer_fold!r} (expected (f, k) with k >= 3, "
                    "0 <= f < k, and folds=None)"
                )
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"Invalid label_noise: {self.label_noise} (expected in [0, 1))")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"Invalid noise_kind: {self.noise_kind!r} (expected {NOISE_KINDS})")

    def recipe(self, budget: str = "quick") -> Recipe:
        """The recipe of ``budget`` (``"quick"`` or ``"full"``)."""
        if budget not in BUDGETS:
            raise ValueError(f"Invalid budget: {budget!r} (expected one of {BUDGETS})")
        full = self.quick if self.full is None else self.full
        if budget == "full" and self.label_noise > 0 and self.noisy_full is not None:
            return self.noisy_full
        return self.quick if budget == "quick" else full

    def with_label_noise(self, fraction: float, kind: str = "symmetric") -> Task:
        """The variant with ``fraction`` label noise of ``kind`` on the train split.

        ``<name>-noisy<NN>`` (symmetric) or ``<name>-asym<NN>`` (asymmetric). ``fraction = 0``
        (symmetric only) is the clean control of the label-noise protocol, ``<name>-noisy0``:
        no label changes, but the ``noisy_full`` recipe in the full budget, so that a noise level
        is the only thing that differs from ``<name>-noisy<NN>``.
        """
        if kind not in NOISE_KINDS:
            raise ValueError(f"Invalid noise kind: {kind!r} (expected {NOISE_KINDS})")
        if not 0.0 <= fraction < 1.0 or (kind == "asymmetric" and fraction == 0):
            raise ValueError(f"Invalid label-noise fraction: {fraction} (expected in [0, 1))")
        pct = round(100 * fraction)
        if pct == 0:
            full = self.full if self.noisy_full is None else self.noisy_full
            return replace(self, name=f"{self.name}-noisy0", full=full)
        suffix = "noisy" if kind == "symmetric" else "asym"
        return replace(self, name=f"{self.name}-{suffix}{pct}", label_noise=fraction,
                       noise_kind=kind)  # fmt: skip

    def with_budget(self, factor: float) -> Task:
        """The variant ``<name>-x<F>`` training ``factor`` × the epochs of every recipe.

        Epochs and warmup epochs are scaled and rounded (at least one epoch); averaging starts
        are fractions of the epochs, so they scale with them. The learning rates and the rest of
        each recipe are unchanged.
        """
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"Invalid budget factor: {factor!r} (expected a number > 0)")

        def scaled(r: Recipe) -> Recipe:
            return replace(r, epochs=max(1, round(factor * r.epochs)),
                           warmup_epochs=round(factor * r.warmup_epochs))  # fmt: skip

        return replace(
            self, name=f"{self.name}-x{factor:g}", quick=scaled(self.quick),
            full=None if self.full is None else scaled(self.full),
            noisy_full=None if self.noisy_full is None else scaled(self.noisy_full),
        )  # fmt: skip

    def fold(self, fold: int) -> Task:
        """Outer fold ``fold`` of this cross-validated task, as a task with fixed splits.

        The fold task ``<name>@fold<fold>`` trains, validates and tests on exactly the splits
        that fold ``fold`` of :attr:`folds` uses (:func:`cross_validation_split`: the inner
        training and validation splits of the outer training folds, and test fold ``fold``), so
        the benchmark tunes and evaluates each outer fold on its own inner validation split
        (nested cross-validation) and pools the folds' test counts in the report.

        Raises:
            ValueError: the task has fixed splits, or ``fold`` is not in ``0 .. folds - 1``.
        """
        if self.folds is None:
            raise ValueError(f"Invalid fold: {fold!r} (task {self.name} has fixed splits)")
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < self.folds:
            raise ValueError(
                f"Invalid fold: {fold!r} (task {self.name} has folds 0..{self.folds - 1})"
            )
        return replace(
            self, name=f"{self.name}@fold{fold}", folds=None, outer_fold=(fold, self.folds)
        )

    def load_dataset(self, cache_dir: str | os.PathLike[str] | None = None) -> Dataset:
        """The task's whole dataset: the user's ``data``, else the registered ``dataset``.

        Raises:
            TypeError: ``data`` made something that is not a :class:`~flatmin.data.Dataset`.
        """
        if self.data is None:
            return load_dataset(self.dataset, cache_dir=cache_dir)
        ds = self.data if isinstance(self.data, Dataset) else self.data()
        if not isinstance(ds, Dataset):
            raise TypeError(
                f"Invalid data of task {self.name!r}: {type(ds).__name__} (expected a "
                "flatmin.data.Dataset, e.g. from flatmin.data.tensor_dataset)"
            )
        return ds

    def _splits(self, ds: Dataset, recipe: Recipe, fold: int | None) -> Dataset:
        """``ds`` cut to this run's splits: the fold, the recipe's subsets, the label noise."""
        if self.folds is None:
            if fold is not None:
                raise ValueError(f"Invalid fold: {fold} (task {self.name} has fixed splits)")
            if self.outer_fold is not None:
                ds = cross_validation_split(ds, self.outer_fold[1], self.outer_fold[0])
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
        if self.label_noise > 0 and self.noise_kind == "asymmetric":
            ds = with_asymmetric_noise(ds, self.label_noise, seed=self.noise_seed)
        elif self.label_noise > 0:
            ds = with_label_noise(ds, self.label_noise, seed=self.noise_seed)
        return ds

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
            dataset: an already loaded dataset of the task (:meth:`load_dataset`) to reuse.
            cache_dir: data cache directory.
            fold: the fold of a cross-validated task (``None``: fold 0; refused for a task with
                fixed splits).
        """
        recipe = self.recipe(budget)
        ds = self.load_dataset(cache_dir) if dataset is None else dataset
        if self.data is None and ds.name != self.dataset:
            raise ValueError(
                f"Invalid dataset: {ds.name!r} (task {self.name} uses {self.dataset!r})"
            )
        ds = self._splits(ds, recipe, fold)
        gen = torch.Generator().manual_seed(seed)
        bs = recipe.batch_size
        eval_bs = max(bs, 256)
        drop = len(ds.train) > bs
        return TaskData(
            task=self, budget=budget, recipe=recipe, seed=seed, dataset=ds,
            train=Batches(ds.train, bs, shuffle=True, generator=gen, drop_last=drop,
                          augment=recipe.augment),
            train_eval=Batches(ds.train, eval_bs), val=Batches(ds.val, eval_bs),
            test=Batches(ds.test, eval_bs), loss_fn=self.loss,
        )  # fmt: skip
