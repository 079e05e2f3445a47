"""Your own task in flatmin's benchmark: your model, your tensors, the whole protocol.

A task is data (train / validation / test), a model factory, a loss, a recipe and a domain. This
file defines two, outside the flatmin package:

* ``my_task`` — a small MLP on 4-class Gaussian clusters in 16 dimensions;
* ``my_noisy_task`` — the same with 30 % of the training labels flipped by *you*, the true labels
  passed as ``clean_train_targets``: the report then shows how much of the noise each method
  memorises.

Run them from the directory that holds ``examples/`` (see ``docs/own_task.md``)::

    flatmin bench --task examples.own_task:my_task --methods baseline,swa,sam,wasam \\
        --seeds 3 --out runs/own
    flatmin train --task examples.own_task:my_task --method sam --rho 0.05 --out runs/own-sam

or from Python::

    import flatmin.bench
    result = flatmin.bench.run(tasks=["examples.own_task:my_task"],
                               methods=["baseline", "sam"], seeds=3, out="runs/own")
"""

from __future__ import annotations

import torch
from torch import nn

from flatmin.bench import Recipe, Task, tensor_dataset
from flatmin.data import Dataset

CLASSES, FEATURES = 4, 16


def _clusters(n: int, gen: torch.Generator, centers: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``n`` points around the class centres, labels ``0 .. CLASSES - 1``."""
    y = torch.arange(n) % CLASSES
    x = centers[y] + torch.randn(n, FEATURES, generator=gen)
    return x, y


def make_data(noise: float = 0.0) -> Dataset:
    """The clusters: 512 training, 256 validation and 512 test points (a fixed seed).

    With ``noise > 0`` that fraction of the training labels is replaced by another class; the
    true labels go in ``clean_train_targets``.
    """
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(CLASSES, FEATURES, generator=gen) * 0.8
    x, y = _clusters(512, gen, centers)
    val, test = _clusters(256, gen, centers), _clusters(512, gen, centers)
    if noise == 0.0:
        return tensor_dataset("clusters", train=(x, y), val=val, test=test)
    flip = torch.randperm(len(y), generator=gen)[: round(noise * len(y))]
    noisy = y.clone()
    noisy[flip] = (y[flip] + torch.randint(1, CLASSES, (len(flip),), generator=gen)) % CLASSES
    return tensor_dataset(
        "clusters-noisy", train=(x, noisy), val=val, test=test, clean_train_targets=y
    )


def make_model(ds: Dataset) -> nn.Module:
    """The model: built by the benchmark for every run, from the run's seed."""
    return nn.Sequential(
        nn.Linear(FEATURES, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, ds.num_classes)
    )


RECIPE = Recipe("sgd", lr=0.05, weight_decay=5e-4, batch_size=64, epochs=6)

my_task = Task(
    name="clusters-mlp",
    domain="tabular",
    dataset="clusters",
    model="MLP-16-64",
    build_model=make_model,
    quick=RECIPE,
    full=Recipe("sgd", lr=0.05, weight_decay=5e-4, batch_size=64, epochs=30),
    description="4 Gaussian clusters in 16-d, an MLP with BatchNorm",
    data=make_data,
)

my_noisy_task = Task(
    name="clusters-mlp-noisy30",
    domain="tabular",
    dataset="clusters-noisy",
    model="MLP-16-64",
    build_model=make_model,
    quick=RECIPE,
    description="the clusters with 30 % of the training labels flipped",
    data=lambda: make_data(noise=0.3),
)
