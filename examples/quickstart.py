"""Quick start: a small BatchNorm CNN on scikit-learn's digits, trained with SGD and with SAM.

Run: ``python examples/quickstart.py`` (about a minute on 2 CPU cores). Prints the test accuracy of
both runs. The loop is the whole recipe: SAM needs a closure (or first_step/second_step) because it
evaluates the gradient twice per step, at ``w`` and at ``w + ε̂``.
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import flatmin

EPOCHS, BATCH, LR = 30, 64, 0.05


def make_model() -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

    return nn.Sequential(
        block(1, 32),
        block(32, 32),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def load() -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:500], perm[500:]
    return x[train], y[train], x[test], y[test]


def train(method: str, seed: int = 0) -> float:
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load()
    model = make_model()
    kwargs = {"lr": LR, "momentum": 0.9, "weight_decay": 5e-4}
    if method == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **kwargs)
    else:
        opt = flatmin.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kwargs)
    steps = EPOCHS * ((len(y_tr) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(y_tr), generator=gen).split(BATCH):
            x, y = x_tr[idx], y_tr[idx]

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            if isinstance(opt, flatmin.SAM):
                opt.step(closure, model=model)  # model=: BN statistics updated once per step
            else:
                opt.step(closure)
            sched.step()
    model.eval()
    with torch.no_grad():
        return (model(x_te).argmax(1) == y_te).float().mean().item()


def main() -> None:
    torch.set_num_threads(2)
    for method in ("sgd", "sam"):
        start = time.perf_counter()
        acc = train(method)
        elapsed = time.perf_counter() - start
        print(f"{method.upper():4s} test accuracy: {100 * acc:.2f}%  ({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
