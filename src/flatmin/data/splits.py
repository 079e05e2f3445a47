"""Split containers, seeded stratified splits, symmetric and class-dependent label noise.

Every split is a frozen dataclass of tensors. Image and text splits are :class:`TensorSplit`
(``inputs[i]`` is sample ``i``); graph-classification splits are :class:`GraphSplit` (one small
graph per sample); node classification uses :class:`NodeSplit` (one graph, ``targets`` set to
:data:`IGNORE_INDEX` on nodes outside the split, so ``cross_entropy(..., ignore_index=-100)`` and
the same training loop work unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = [
    "DIGIT_FLIPS",
    "IGNORE_INDEX",
    "Dataset",
    "Graph",
    "GraphSplit",
    "NodeSplit",
    "Split",
    "TensorSplit",
    "asymmetric_flips",
    "stratified_folds",
    "stratified_indices",
    "with_asymmetric_noise",
    "with_label_noise",
]

IGNORE_INDEX = -100
"""Target value of nodes outside a node-classification split (PyTorch's default ignore_index)."""


@dataclass(frozen=True)
class TensorSplit:
    """Samples stacked along dim 0: images ``(N, C, H, W)`` float or token ids ``(N, L)`` long.

    ``clean_targets`` holds the labels before label noise (``None`` when no noise was applied).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    clean_targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@dataclass(frozen=True)
class Graph:
    """One graph: node features ``x`` ``(n, f)`` and directed ``edge_index`` ``(2, m)``.

    Undirected graphs list every edge in both directions.
    """

    x: torch.Tensor
    edge_index: torch.Tensor

    @property
    def num_nodes(self) -> int:
        """Number of nodes."""
        return int(self.x.shape[0])


@dataclass(frozen=True)
class GraphSplit:
    """Graph-classification samples: ``graphs[i]`` has label ``targets[i]``."""

    graphs: tuple[Graph, ...]
    targets: torch.Tensor
    clean_targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.graphs)


@dataclass(frozen=True)
class NodeSplit:
    """Node classification on one graph; ``targets`` is ``IGNORE_INDEX`` outside the split."""

    graph: Graph
    targets: torch.Tensor
    clean_targets: torch.Tensor | None = None

    def __len__(self) -> int:
        """Number of labelled nodes in this split."""
        return int((self.targets != IGNORE_INDEX).sum())


#: Any split of a dataset: tensors, graphs or the labelled nodes of one graph.
Split = TensorSplit | GraphSplit | NodeSplit


@dataclass(frozen=True)
class Dataset:
    """A dataset with fixed train/val/test splits.

    Attributes:
        name: registry name.
        domain: ``"vision"``, ``"text"`` or ``"graph"``.
        train, val, test: the splits (validation carved from the training data).
        num_classes: number of classes.
        class_names: class ``k`` is ``class_names[k]``.
        vocab: text only; token id ``i`` is ``vocab[i]`` (0 = padding, 1 = unknown).
    """

    name: str
    domain: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    vocab: tuple[str, ...] | None = None

    @property
    def num_features(self) -> int:
        """Graph node-feature width (graphs only)."""
        split = self.train
        if isinstance(split, GraphSplit):
            return int(split.graphs[0].x.shape[1])
        if isinstance(split, NodeSplit):
            return int(split.graph.x.shape[1])
        raise TypeError(f"num_features is defined for graph datasets, not {self.domain!r}")


def stratified_indices(
    labels: torch.Tensor, fractions: tuple[float, ...], *, seed: int
) -> tuple[torch.Tensor, ...]:
    """Split ``range(len(labels))`` into parts stratified by label.

    Within each class the indices are permuted with a ``torch.Generator`` seeded by ``seed``; part
    ``j > 0`` takes ``round(fractions[j] * n_c)`` of them and part 0 keeps the rest, so every class
    is represented in proportion and the result depends only on ``labels`` and ``seed``.

    Args:
        labels: 1-D integer tensor.
        fractions: one fraction per part; ``fractions[0]`` is implied (the remainder).
        seed: seed of the permutation.

    Returns:
        One sorted ``long`` index tensor per part.
    """
    if labels.ndim != 1:
        raise ValueError(f"Invalid labels shape: {tuple(labels.shape)} (expected 1-D)")
    if any(f < 0 for f in fractions) or sum(fractions[1:]) >= 1:
        raise ValueError(f"Invalid fractions: {fractions} (expected >= 0, parts 1.. sum < 1)")
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        start = 0
        for j in range(1, len(fractions)):
            k = round(fractions[j] * idx.numel())
            parts[j].append(idx[start : start + k])
            start += k
        parts[0].append(idx[start:])
    return tuple(torch.sort(torch.cat(p)).values for p in parts)


def stratified_folds(labels: torch.Tensor, k: int, *, seed: int) -> tuple[torch.Tensor, ...]:
    """Split ``range(len(labels))`` into ``k`` disjoint folds stratified by label.

    Within each class the indices are permuted with a ``torch.Generator`` seeded by ``seed`` and
    dealt round-robin to the folds, continuing where the previous class stopped, so every index is
    in exactly one fold, each fold holds every class in proportion, and fold sizes differ by at
    most one.

    Args:
        labels: 1-D integer tensor.
        k: number of folds (``2 <= k <= len(labels)``).
        seed: seed of the permutation.

    Returns:
        ``k`` sorted ``long`` index tensors.
    """
    if labels.ndim != 1:
        raise ValueError(f"Invalid labels shape: {tuple(labels.shape)} (expected 1-D)")
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= labels.numel():
        raise ValueError(f"Invalid number of folds: {k!r} (expected 2 <= k <= {labels.numel()})")
    gen = torch.Generator().manual_seed(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    position = 0
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        for i in idx[torch.randperm(idx.numel(), generator=gen)].tolist():
            folds[position % k].append(i)
            position += 1
    return tuple(torch.sort(torch.tensor(f, dtype=torch.long)).values for f in folds)


def _flip(targets: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    labelled = torch.nonzero(targets != IGNORE_INDEX).flatten()
    gen = torch.Generator().manual_seed(seed)
    k = round(fraction * labelled.numel())
    chosen = labelled[torch.randperm(labelled.numel(), generator=gen)[:k]]
    # A uniform draw from the other num_classes - 1 classes: every chosen label really changes.
    shift = torch.randint(1, num_classes, (k,), generator=gen)
    noisy = targets.clone()
    noisy[chosen] = (targets[chosen] + shift) % num_classes
    return noisy


def with_label_noise(dataset: Dataset, fraction: float, *, seed: int = 0) -> Dataset:
    """Return ``dataset`` with symmetric label noise on the training split only.

    Exactly ``round(fraction * n_train)`` training labels, chosen uniformly without replacement
    with a generator seeded by ``seed``, are replaced by a label drawn uniformly from the *other*
    ``num_classes - 1`` classes. Validation and test splits are returned unchanged (same objects),
    and the original training labels are kept in ``train.clean_targets``.

    Args:
        dataset: the clean dataset.
        fraction: fraction of training labels to corrupt, in ``[0, 1]``.
        seed: seed of the corruption (fixed per task, independent of the training seed).

    References:
        Zhang et al. 2017, "Understanding deep learning requires rethinking generalization",
        arXiv 1611.03530 (memorisation of random labels).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"Invalid label-noise fraction: {fraction} (expected in [0, 1])")
    if dataset.num_classes < 2:
        raise ValueError(f"Invalid num_classes for label noise: {dataset.num_classes} (need >= 2)")
    train = dataset.train
    noisy = _flip(train.targets, fraction, dataset.num_classes, seed)
    clean = train.clean_targets if train.clean_targets is not None else train.targets
    return replace(dataset, train=replace(train, targets=noisy, clean_targets=clean))


#: Patrini et al.'s class-dependent flips of the ten digits: 2 → 7, 3 → 8, 5 ↔ 6, 7 → 1.
DIGIT_FLIPS: dict[int, int] = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}


def asymmetric_flips(dataset: Dataset) -> dict[int, int]:
    """The class-dependent flips of ``dataset``: source class → the class it is mislabelled as.

    The ten digits (class names ``"0"`` … ``"9"``) get :data:`DIGIT_FLIPS` (confusions of
    similar-looking digits); any other dataset the cyclic map ``c → (c + 1) mod K``.
    """
    k = dataset.num_classes
    if tuple(dataset.class_names) == tuple(str(d) for d in range(10)):
        return dict(DIGIT_FLIPS)
    return {c: (c + 1) % k for c in range(k)}


def with_asymmetric_noise(
    dataset: Dataset, fraction: float, *, flips: dict[int, int] | None = None, seed: int = 0
) -> Dataset:
    """Return ``dataset`` with class-dependent label noise on the training split only.

    Within every source class ``c`` of ``flips`` exactly ``round(fraction · n_c)`` training
    labels, chosen uniformly without replacement (generator seeded by ``seed``, drawn class by
    class in increasing order), become ``flips[c]``; the other classes keep their labels, so the
    share of flipped labels overall is below ``fraction``. Validation and test are returned
    unchanged and the original training labels are kept in ``train.clean_targets``.

    Args:
        dataset: the clean dataset.
        fraction: fraction of each source class to mislabel, in ``[0, 1)`` (at ``>= 0.5`` the
            wrong class would be the majority).
        flips: source class → target class (default: :func:`asymmetric_flips`).
        seed: seed of the corruption (fixed per task).

    References:
        Patrini et al. 2017, "Making deep neural networks robust to label noise: a loss
        correction approach", arXiv 1609.03683 (the MNIST flips 2→7, 3→8, 5↔6, 7→1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"Invalid label-noise fraction: {fraction} (expected in [0, 1))")
    flips = asymmetric_flips(dataset) if flips is None else flips
    k = dataset.num_classes
    for src, dst in flips.items():
        if not (0 <= src < k and 0 <= dst < k) or src == dst:
            raise ValueError(f"Invalid flip: {src} -> {dst} (expected two classes of 0..{k - 1})")
    train = dataset.train
    clean = train.clean_targets if train.clean_targets is not None else train.targets
    gen = torch.Generator().manual_seed(seed)
    noisy = train.targets.clone()
    for src in sorted(flips):
        idx = torch.nonzero(train.targets == src).flatten()
        chosen = idx[torch.randperm(idx.numel(), generator=gen)[: round(fraction * idx.numel())]]
        noisy[chosen] = flips[src]
    return replace(dataset, train=replace(train, targets=noisy, clean_targets=clean))
