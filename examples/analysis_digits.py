"""Loss-landscape analysis of SGD, SWA and SAM solutions on scikit-learn's digits.

Trains the same small BatchNorm CNN three ways (SGD; SWA = the average of the SGD iterates of the
last epochs at a constant learning rate, with recomputed BN statistics; SAM), then uses
``flatmin.analysis`` to draw a tour of its figures (the figures in docs/analysis.md come from the
benchmark's own label-noise runs instead: ``flatmin bench --suite full``, flatness study):

* rays ``w + t·d`` along a filter-normalised random direction (Izmailov et al. 2018, Fig. 4);
* the line ``θ(α) = (1 − α)θ_SGD + α θ_other`` for α in [−0.5, 1.5] with BN statistics recomputed at
  every point, and the asymmetry ``L(θ(+a)) − L(θ(−a))`` (Kaddour et al. 2022);
* Hessian eigenvalue densities by stochastic Lanczos quadrature, top eigenvalue, Hutchinson trace;
* worst-case sharpness and the cosine of first- and second-order SAM gradients (Foret et al. 2021).

Run: ``python examples/analysis_digits.py`` (about two minutes on 2 CPU cores). Figures go to
``runs/analysis_digits/analysis_*.png``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import flatmin
from flatmin.analysis import (
    asymmetry,
    evaluate_ray,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    interpolate,
    plot_path,
    plot_paths,
    plot_spectrum,
    random_direction,
    sam_gradients,
    sharpness,
)

EPOCHS, SWA_EPOCHS, BATCH, LR, SWA_LR = 12, 4, 64, 0.05, 0.02
FIGURES = Path("runs") / "analysis_digits"
LOSS = nn.CrossEntropyLoss()


def make_model() -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

    return nn.Sequential(
        block(1, 16), block(16, 16), nn.MaxPool2d(2),  # 8x8 -> 4x4
        block(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def load() -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:500], perm[500:]
    return x[train], y[train], x[test], y[test]


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 256) -> list[tuple[torch.Tensor, ...]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def train(method: str, x_tr: torch.Tensor, y_tr: torch.Tensor, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = make_model()
    kwargs = {"lr": LR, "momentum": 0.9, "weight_decay": 5e-4}
    if method == "sam":
        opt: torch.optim.Optimizer = flatmin.SAM(
            model.parameters(), torch.optim.SGD, rho=0.05, **kwargs
        )
    else:
        opt = torch.optim.SGD(model.parameters(), **kwargs)
    averager = _averager(model) if method == "swa" else None
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(EPOCHS):
        # SGD and SAM: cosine decay; SWA: cosine decay to SWA_LR, then constant (Izmailov et al.).
        decay_epochs = EPOCHS - SWA_EPOCHS if method == "swa" else EPOCHS
        floor = SWA_LR if method == "swa" else 0.0
        frac = min(epoch / decay_epochs, 1.0)
        for group in opt.param_groups:
            group["lr"] = floor + (LR - floor) * 0.5 * (1 + np.cos(np.pi * frac))
        model.train()
        for idx in torch.randperm(len(y_tr), generator=gen).split(BATCH):
            x, y = x_tr[idx], y_tr[idx]

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = LOSS(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        if averager is not None and epoch >= EPOCHS - SWA_EPOCHS:
            if isinstance(averager, torch.optim.swa_utils.AveragedModel):
                averager.update_parameters(model)
            else:
                averager.update()  # type: ignore[attr-defined]
    if averager is None:
        return model
    return _finish_swa(averager, model, x_tr)


def _averager(model: nn.Module) -> object:
    try:  # flatmin's averager when present, else torch's
        from flatmin.optim.averaging import WeightAveraging

        return WeightAveraging(model, mode="swa")
    except ImportError:
        return torch.optim.swa_utils.AveragedModel(model)


def _finish_swa(averager: object, model: nn.Module, x_tr: torch.Tensor) -> nn.Module:
    loader = [x_tr[i : i + 256] for i in range(0, len(x_tr), 256)]
    if isinstance(averager, torch.optim.swa_utils.AveragedModel):
        torch.optim.swa_utils.update_bn(loader, averager)
        return averager.module
    averager.update_bn(loader)  # type: ignore[attr-defined]
    swa = copy.deepcopy(model)
    swa.load_state_dict(averager.averaged_state_dict())  # type: ignore[attr-defined]
    return swa


def main() -> None:
    torch.set_num_threads(2)
    FIGURES.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load()
    train_b, test_b = batches(x_tr, y_tr), batches(x_te, y_te)
    data = {"train": train_b, "test": test_b}
    start = time.perf_counter()
    models = {m: train(m, x_tr, y_tr).eval() for m in ("sgd", "swa", "sam")}
    print(f"trained SGD, SWA, SAM in {time.perf_counter() - start:.0f} s")

    # Rays along one filter-normalised direction per model (same seed -> comparable draws).
    ts = np.linspace(-1.0, 1.0, 17)
    rays = {}
    for name, model in models.items():
        d = random_direction(model, generator=torch.Generator().manual_seed(1))
        rays[name.upper()] = evaluate_ray(model, LOSS, data, d, ts)
        i0 = len(ts) // 2
        print(f"{name.upper()}: train loss {rays[name.upper()].loss['train'][i0]:.4f}, "
              f"test error {100 * rays[name.upper()].error['test'][i0]:.2f}%")  # fmt: skip
    plot_path(rays["SWA"], title="SWA: ray w + t·d (filter-normalised)").savefig(
        FIGURES / "analysis_ray_swa.png", dpi=90
    )
    plot_paths(rays, dataset="test", metric="error", title="test error along rays").savefig(
        FIGURES / "analysis_rays_test_error.png", dpi=90
    )

    # Interpolation SGD -> SWA and SGD -> SAM with BN statistics recomputed at every point.
    alphas = np.linspace(-0.5, 1.5, 17)
    lines = {
        f"SGD→{other.upper()}": interpolate(
            models["sgd"], models[other], LOSS, data, alphas, bn="recompute", bn_batches=train_b
        )
        for other in ("swa", "sam")
    }
    # Kaddour et al.'s view: train loss and test error along the same lines, side by side.
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    plot_paths(lines, dataset="train", metric="loss", logy=True, ax=ax_loss,
               title="train loss along θ(α) = (1−α)θ_SGD + αθ'")  # fmt: skip
    plot_paths(lines, dataset="test", metric="error", ax=ax_err, title="test error along θ(α)")
    fig.savefig(FIGURES / "analysis_interpolation.png", dpi=90)
    for name in ("swa", "sam"):
        asym = asymmetry(models[name], models["sgd"], LOSS, data, a=0.1, bn="recompute",
                         bn_batches=train_b)  # fmt: skip
        lm, l0, lp = asym.loss["train"]
        print(f"{name.upper()}→SGD asymmetry: L(−0.1)={lm:.4f} L(0)={l0:.4f} L(+0.1)={lp:.4f}")

    # Curvature on 256 training examples: SLQ density, top eigenvalue, Hutchinson trace.
    hess_b = train_b[:1]
    spectra = {}
    for name, model in models.items():
        g = torch.Generator().manual_seed(2)
        spectra[name.upper()] = hessian_spectrum(model, LOSS, hess_b, steps=24, generator=g)
        top = hessian_eigenvalues(model, LOSS, hess_b, k=1, max_iter=20, tol=1e-3, generator=g)
        tr = hessian_trace(model, LOSS, hess_b, n_samples=10, generator=g)
        sharp = sharpness(model, LOSS, train_b, rho=0.05)
        cos = sam_gradients(model, LOSS, train_b[0], rho=0.05, bn_mode="batch").cosine
        print(f"{name.upper()}: λ_max {top.eigenvalues[0]:.2f} (residual {top.residuals[0]:.1e}, "
              f"{top.iterations} HVPs), trace {tr.trace:.1f} ± {tr.stderr:.1f}, "
              f"sharpness(ρ=0.05) {sharp.mean:.4f} ± {sharp.std:.4f}, "
              f"cos(1st, 2nd-order SAM grad) {cos:.3f}")  # fmt: skip
    plot_spectrum(spectra, title="Hessian eigenvalue density (SLQ)").savefig(
        FIGURES / "analysis_spectrum.png", dpi=90
    )
    print(f"done in {time.perf_counter() - start:.0f} s; figures in {FIGURES}")


if __name__ == "__main__":
    main()
