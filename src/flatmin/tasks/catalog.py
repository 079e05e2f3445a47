"""The built-in tasks: three domains, each with a quick and a full budget.

Budgets were sized on one CPU thread: a ``quick`` run takes at most about 10 s, a ``full`` run
about 20-60 s (``docs/data.md`` has the measured one-epoch times). The exception is
``fashion-mnist-full``, the GPU-size task (all 55k training images, a WRN-16-4): its ``full``
budget is sized for one GPU (the ``gpu`` suite), its ``quick`` budget is a one-epoch smoke run on
a 128-image subset. ``fashion-mnist-aug`` (crop + flip augmentation, a model that fits its
training set) takes about 2 minutes per ``full`` run.
"""

from __future__ import annotations

from torch import nn

from flatmin.data import Dataset
from flatmin.data.augment import CropFlip
from flatmin.tasks.models import (
    BagOfEmbeddings,
    GraphClassifier,
    NodeGCN,
    ResNetCNN,
    TransformerClassifier,
    WideResNet,
)
from flatmin.tasks.registry import register_task, register_variant
from flatmin.tasks.task import Recipe, Task

__all__ = ["NOISY_VARIANTS"]


def _cnn8(ds: Dataset) -> nn.Module:
    return ResNetCNN(ds.num_classes, width=16, blocks=(1, 1), stem_stride=1)


def _cnn28(ds: Dataset) -> nn.Module:
    return ResNetCNN(ds.num_classes, width=16, blocks=(1, 1), stem_stride=2, stem_pool=True)


def _cnn28_w64(ds: Dataset) -> nn.Module:
    return ResNetCNN(ds.num_classes, width=64, blocks=(1, 1), stem_stride=2, stem_pool=True)


def _wrn16_4(ds: Dataset) -> nn.Module:
    return WideResNet(ds.num_classes, depth=16, width=4, in_channels=1)


def _vocab(ds: Dataset) -> int:
    if ds.vocab is None:
        raise TypeError(f"Invalid dataset for a text model: {ds.name!r} has no vocabulary")
    return len(ds.vocab)


def _bag(ds: Dataset) -> nn.Module:
    return BagOfEmbeddings(_vocab(ds), ds.num_classes, dim=64, hidden=64)


def _transformer(ds: Dataset) -> nn.Module:
    max_len = int(ds.train.inputs.shape[1])  # type: ignore[union-attr]
    return TransformerClassifier(_vocab(ds), ds.num_classes, max_len=max_len, dim=64, layers=2)


def _gin(ds: Dataset) -> nn.Module:
    return GraphClassifier(ds.num_features, ds.num_classes, conv="gin", hidden=32, layers=3)


def _gcn(ds: Dataset) -> nn.Module:
    return GraphClassifier(ds.num_features, ds.num_classes, conv="gcn", hidden=32, layers=3)


def _node_gcn(ds: Dataset) -> nn.Module:
    return NodeGCN(ds.num_features, ds.num_classes, hidden=32, layers=2)


for _task in (
    # --- vision ----------------------------------------------------------------------------------
    Task(
        "digits", "vision", "digits", "ResNetCNN-8x8", _cnn8,
        quick=Recipe("sgd", lr=0.05, weight_decay=5e-4, batch_size=64, epochs=8),
        full=Recipe("sgd", lr=0.05, weight_decay=5e-4, batch_size=64, epochs=30),
        noisy_full=Recipe("sgd", lr=0.05, weight_decay=0.0, batch_size=64, epochs=80),
        description="scikit-learn digits, BN ResNet",
    ),
    Task(
        "mnist-5k", "vision", "mnist-5k", "ResNetCNN-28x28", _cnn28,
        quick=Recipe("sgd", lr=0.05, weight_decay=5e-4, batch_size=128, epochs=3),
        full=Recipe("sgd", lr=0.05, weight_decay=5e-4, batch_size=128, epochs=12),
        noisy_full=Recipe("sgd", lr=0.05, weight_decay=0.0, batch_size=128, epochs=40),
        description="MNIST-5k, BN ResNet",
    ),
    Task(
        "fashion-mnist", "vision", "fashion-mnist", "ResNetCNN-28x28", _cnn28,
        quick=Recipe("sgd", lr=0.05, weight_decay=5e-4, batch_size=128, epochs=2,
                     train_subset=3000, val_subset=2000, test_subset=2000),
        full=Recipe("sgd", lr=0.05, weight_decay=5e-4, batch_size=128, epochs=10,
                    train_subset=10000, val_subset=2000),
        noisy_full=Recipe("sgd", lr=0.05, weight_decay=0.0, batch_size=128, epochs=20,
                          train_subset=10000, val_subset=2000),
        description="Fashion-MNIST: 10k stratified train subset, 2k validation, full 10k test",
    ),
    # The clean regime of the flat-minima papers: an over-parameterised model (306k parameters,
    # 150 per image) that fits its augmented training set (the baseline: >= 99 % train accuracy,
    # measured on the un-augmented images), sized at about 2 min per baseline run on one thread.
    Task(
        "fashion-mnist-aug", "vision", "fashion-mnist", "ResNetCNN-28x28-w64", _cnn28_w64,
        quick=Recipe("sgd", lr=0.1, weight_decay=5e-4, batch_size=128, epochs=6,
                     train_subset=2000, val_subset=2000, test_subset=2000,
                     augment=CropFlip(padding=2)),
        full=Recipe("sgd", lr=0.1, weight_decay=5e-4, batch_size=128, epochs=120,
                    train_subset=2000, val_subset=2000, augment=CropFlip(padding=2)),
        description="Fashion-MNIST: 2k stratified train subset, random crop (2 px) + flip, "
                    "2k validation, full 10k test; a ResNetCNN 4x as wide",
    ),
    # Foret et al. 2021 (Table 7) train a WRN on Fashion-MNIST with SGD, lr 0.1, wd 5e-4; here a
    # WRN-16-4 at batch 128, without augmentation, for the budget of one GPU.
    Task(
        "fashion-mnist-full", "vision", "fashion-mnist", "WRN-16-4", _wrn16_4,
        quick=Recipe("sgd", lr=0.1, weight_decay=5e-4, batch_size=128, epochs=1,
                     train_subset=128, val_subset=128, test_subset=128),
        full=Recipe("sgd", lr=0.1, weight_decay=5e-4, batch_size=128, epochs=10),
        description="Fashion-MNIST, all 55k/5k/10k (train/validation/test), WRN-16-4 (GPU)",
    ),
    # --- text ------------------------------------------------------------------------------------
    Task(
        "rotten-tomatoes", "text", "rotten-tomatoes", "BagOfEmbeddings", _bag,
        quick=Recipe("adamw", lr=3e-3, weight_decay=1e-2, batch_size=64, epochs=4),
        full=Recipe("adamw", lr=3e-3, weight_decay=1e-2, batch_size=64, epochs=12),
        description="Rotten Tomatoes sentiment, bag of embeddings",
    ),
    Task(
        "rotten-tomatoes-transformer", "text", "rotten-tomatoes", "Transformer-2x64",
        _transformer,
        quick=Recipe("adamw", lr=1e-3, weight_decay=1e-2, batch_size=64, epochs=1,
                     train_subset=3000),
        full=Recipe("adamw", lr=1e-3, weight_decay=1e-2, batch_size=64, epochs=3,
                    train_subset=6000),
        description="Rotten Tomatoes sentiment, small transformer encoder",
    ),
    Task(
        "reuters-r8", "text", "reuters-r8", "BagOfEmbeddings", _bag,
        quick=Recipe("adamw", lr=3e-3, weight_decay=1e-2, batch_size=64, epochs=4),
        full=Recipe("adamw", lr=3e-3, weight_decay=1e-2, batch_size=64, epochs=12),
        description="Reuters R8 topics, bag of embeddings",
    ),
    Task(
        "reuters-r8-transformer", "text", "reuters-r8", "Transformer-2x64", _transformer,
        quick=Recipe("adamw", lr=1e-3, weight_decay=1e-2, batch_size=64, epochs=1,
                     train_subset=1500, val_subset=1000, test_subset=1000),
        full=Recipe("adamw", lr=1e-3, weight_decay=1e-2, batch_size=64, epochs=3),
        description="Reuters R8 topics, small transformer encoder",
    ),
    Task(
        "20newsgroups", "text", "20newsgroups", "BagOfEmbeddings", _bag,
        quick=Recipe("adamw", lr=3e-3, weight_decay=1e-2, batch_size=64, epochs=3,
                     train_subset=4000, val_subset=2000, test_subset=2000),
        full=Recipe("adamw", lr=3e-3, weight_decay=1e-2, batch_size=64, epochs=6),
        description="20 Newsgroups, bag of embeddings",
    ),
    # --- graphs ----------------------------------------------------------------------------------
    Task(
        "mutag", "graph", "mutag", "GIN-3x32", _gin,
        quick=Recipe("adamw", lr=1e-2, weight_decay=1e-4, batch_size=32, epochs=40),
        full=Recipe("adamw", lr=1e-2, weight_decay=1e-4, batch_size=32, epochs=100),
        folds=10,
        description="MUTAG graph classification, GIN, stratified 10-fold cross-validation",
    ),
    Task(
        "mutag-gcn", "graph", "mutag", "GCN-3x32", _gcn,
        quick=Recipe("adamw", lr=1e-2, weight_decay=1e-4, batch_size=32, epochs=40),
        full=Recipe("adamw", lr=1e-2, weight_decay=1e-4, batch_size=32, epochs=150),
        description="MUTAG graph classification, GCN",
    ),
    Task(
        "drosophila", "graph", "drosophila", "NodeGCN-2x32", _node_gcn,
        quick=Recipe("adamw", lr=1e-2, weight_decay=5e-4, batch_size=1, epochs=100),
        full=Recipe("adamw", lr=1e-2, weight_decay=5e-4, batch_size=1, epochs=300),
        description="Drosophila connectome cell types (node classification), GCN",
    ),
):  # fmt: skip
    register_task(_task)

NOISY_VARIANTS = tuple(
    register_variant(name)
    for name in ("digits-noisy40", "mnist-5k-noisy40", "fashion-mnist-noisy40")
)
"""Label-noise variants listed by ``flatmin tasks`` (any ``<task>-noisyNN`` works)."""
