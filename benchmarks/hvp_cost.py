"""Cost of one Hessian-vector product relative to one gradient: quickstart BN CNN, 8x8 digits.

Times, interleaved over repetitions (median of each):
  grad    forward + backward (torch.autograd.grad)
  hvp     forward + backward with create_graph + double backward (flatmin._curvature.hvp)
  func    torch.func forward-over-reverse (flatmin._curvature.functional_hvp)
Run: python benchmarks/hvp_cost.py [--reps 30] [--batch 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from flatmin._curvature import functional_hvp, hvp


def make_model() -> nn.Module:  # the CNN of examples/quickstart.py
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

    return nn.Sequential(
        block(1, 32), block(32, 32), nn.MaxPool2d(2),
        block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images[: args.batch], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[: args.batch])
    model = make_model().eval()  # eval: the functional backend must not write BN buffers
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]
    loss_fn = nn.functional.cross_entropy

    def grad_once() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    def hvp_once() -> None:
        hvp(loss_fn(model(x), y), params, v)

    def func_once() -> None:
        functional_hvp(model, loss_fn, (x, y), v)

    fns = {"grad": grad_once, "hvp": hvp_once, "func": func_once}
    for f in fns.values():  # warm-up
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    n = sum(p.numel() for p in params)
    print(f"model: {n} parameters, batch {args.batch}, threads {args.threads}, reps {args.reps}")
    for k, t in med.items():
        print(f"{k:5s} median {1e3 * t:8.2f} ms  ratio to grad {t / med['grad']:.2f}")


if __name__ == "__main__":
    main()
