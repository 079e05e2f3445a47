"""Hessian spectra of the training loss: top eigenvalues, Hutchinson trace, SLQ density.

The Hessian is that of the data loss ``L(w) = Σ_b n_b L_b(w) / Σ_b n_b`` over the given batches
(at most ``max_batches``; they are held in memory and reused for every product), taken with respect
to the trainable parameters (``requires_grad``). Parameters the loss does not reach contribute zero
rows and columns. The model runs in eval mode (``bn_mode="eval"``: BatchNorm running statistics, so
``L`` is a fixed function of ``w``) or with BatchNorm batch statistics (``bn_mode="batch"``).
Products use :func:`flatmin._curvature.hvp` (double backward); vectors are kept in float64.

References:
    Lanczos 1950; Golub & Meurant 1994 and Ubaru, Chen, Saad 2017 (SLQ); Hutchinson 1990;
    Ghorbani, Krishnan, Xiao 2019 (arXiv:1901.10159); Yao, Gholami, Keutzer, Mahoney 2020
    (PyHessian, arXiv:1912.07145).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from flatmin._curvature import flat_to_tensors, hvp, tensors_to_flat
from flatmin.analysis._common import (
    Batches,
    BNMode,
    LossFn,
    batch_size,
    check_choice,
    forward,
    materialize,
    model_device,
    preserved,
    set_eval_mode,
    to_device,
)
from flatmin.analysis.results import EigenResult, SpectrumResult, TraceResult

__all__ = ["hessian_eigenvalues", "hessian_spectrum", "hessian_trace"]


class _DataHessian:
    """``v ↦ H v`` over a fixed list of batches, with flat float64 vectors."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, batches: Batches, max_batches: int | None
    ) -> None:
        device = model_device(model)
        self.model = model
        self.loss_fn = loss_fn
        self.batches = [to_device(b, device) for b in materialize(batches, max_batches)]
        self.sizes = [batch_size(t) for _, t in self.batches]
        self.total = float(sum(self.sizes))
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("Invalid model: no parameter requires a gradient")
        self.n = sum(p.numel() for p in self.params)
        self.device = device
        self.products = 0

    def __call__(self, v: Tensor) -> Tensor:
        vecs = [t.to(p.dtype) for t, p in zip(flat_to_tensors(v, self.params), self.params)]
        out = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        for (inputs, targets), n in zip(self.batches, self.sizes, strict=True):
            with torch.enable_grad():
                loss = self.loss_fn(forward(self.model, inputs), targets)
                hv = hvp(loss, self.params, vecs)
            out += (n / self.total) * tensors_to_flat(hv).to(torch.float64)
        self.products += 1
        return out

    def random(self, generator: torch.Generator | None, kind: str) -> Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if kind == "rademacher":
            v = torch.randint(0, 2, (self.n,), generator=generator, device=gen_device) * 2 - 1
            return v.to(self.device, torch.float64)
        v = torch.randn(self.n, generator=generator, dtype=torch.float64, device=gen_device)
        return v.to(self.device)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 1)")


def _lanczos(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    steps: int,
    *,
    k: int = 0,
    tol: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, Tensor, float]:
    """Lanczos with full re-orthogonalisation.

    Builds ``V = [v₁ … v_m]`` with ``Vᵀ H V = T`` tridiagonal. If ``k > 0`` it stops as soon as
    the top ``k`` Ritz pairs have residuals ``|β_m s_{m,i}| ≤ tol·max(|θ_i|, 1e-30)``.

    Returns:
        ``alphas`` (diagonal of T), ``betas`` (off-diagonal, ``m − 1`` entries), the basis
        ``V`` of shape ``(m, n)`` and the final ``β_m`` (residual norm of the Krylov space).
    """
    n = v0.numel()
    steps = min(steps, n)
    basis = torch.empty(steps, n, dtype=torch.float64, device=v0.device)
    alphas: list[float] = []
    betas: list[float] = []
    v = v0 / v0.norm()
    beta_last = 0.0
    for j in range(steps):
        basis[j] = v
        w = matvec(v)
        a = float(w @ v)
        alphas.append(a)
        w = w - a * v
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        q = basis[: j + 1]
        for _ in range(2):  # twice is enough (Parlett's "twice is enough")
            w = w - q.T @ (q @ w)
        beta = float(w.norm())
        if not (math.isfinite(a) and math.isfinite(beta)):
            beta_last = math.nan  # a NaN/inf Hessian product: nothing after it means anything
            break
        scale = max(abs(x) for x in alphas) if alphas else 1.0
        if j == steps - 1 or beta <= 1e-12 * max(scale, 1e-30):
            beta_last = beta if beta > 1e-12 * max(scale, 1e-30) else 0.0
            break
        if k and j + 1 >= k:
            theta, s = _tridiag_eig(np.array(alphas), np.array(betas))
            top = np.argsort(theta)[::-1][:k]
            res = np.abs(beta * s[-1, top])
            if np.all(res <= tol * np.maximum(np.abs(theta[top]), 1e-30)):
                beta_last = beta
                break
        betas.append(beta)
        v = w / beta
    m = len(alphas)
    return np.array(alphas), np.array(betas[: m - 1]), basis[:m], beta_last


def _tridiag_eig(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = len(alphas)
    if not (np.all(np.isfinite(alphas)) and np.all(np.isfinite(betas))):
        # LAPACK's eigh returns finite garbage for a matrix holding NaN: report NaN instead.
        return np.full(m, np.nan), np.full((m, m), np.nan)
    t = np.diag(alphas)
    if len(betas):
        t += np.diag(betas, 1) + np.diag(betas, -1)
    theta, s = np.linalg.eigh(t)
    return theta, s


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    k: int = 1,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-6,
    return_vectors: bool = False,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    bn_mode: BNMode = "eval",
) -> EigenResult:
    """Top-``k`` Hessian eigenvalues of the loss over ``batches``.

    * ``method="lanczos"`` (default): Lanczos iteration with full re-orthogonalisation on the
      Krylov space ``span{v, Hv, H²v, …}``; the eigenvalues are the ``k`` largest (algebraic) Ritz
      values θ of the tridiagonal ``T = Vᵀ H V``. Residual of a Ritz pair: ``‖H y − θ y‖ =
      |β_m s_{m,i}|``. Stops when all ``k`` residuals are ``≤ tol·|θ|`` or after ``max_iter``
      products; exact once the space is invariant (e.g. ``m = n``).
    * ``method="power"``: power iteration with Hotelling deflation,
      ``v ← (H − Σ_j λ_j u_j u_jᵀ) v / ‖·‖``, until ``|Δλ| ≤ tol·|λ|``. It finds the
      eigenvalues of **largest magnitude** (these are the top ones when the dominant part of the
      spectrum is positive, as it usually is near a minimum).

    Args:
        model: The network; restored exactly on return.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batches: Iterable of ``(inputs, targets)``; the first ``max_batches`` are kept in memory.
        k: Number of eigenvalues.
        method: ``"lanczos"`` or ``"power"``.
        max_iter: Lanczos steps, or power iterations per eigenvalue.
        tol: Relative convergence tolerance.
        return_vectors: Also return the unit eigenvector estimates (flattened, float64).
        generator: Source of the random start vectors (``None``: torch's default generator).
        max_batches: Use at most this many batches.
        bn_mode: ``"eval"`` or ``"batch"``.

    Returns:
        :class:`EigenResult` with ``eigenvalues`` descending, ``residuals`` ``‖Hv − λv‖``,
        ``iterations`` (number of full-data HVPs). A NaN or infinite Hessian product stops the
        iteration and gives NaN eigenvalues (``result.finite`` is ``False``), never a number.

    Raises:
        ValueError: for a bad ``k``, ``method``, ``max_iter`` or ``tol``.

    References:
        Lanczos 1950; Golub & Van Loan, "Matrix Computations", Sec. 10.1; Yao et al. 2020
        (PyHessian, arXiv:1912.07145) for power iteration with deflation.

    Example:
        >>> net = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> data = [(x, y)]
        >>> res = hessian_eigenvalues(net, nn.functional.mse_loss, data, k=2)
        >>> res.eigenvalues.shape
        (2,)
    """
    _check_positive_int("k", k)
    _check_positive_int("max_iter", max_iter)
    check_choice("method", method, ("lanczos", "power"))
    if not tol >= 0:
        raise ValueError(f"Invalid tol: {tol!r} (expected >= 0)")
    with preserved(model):
        set_eval_mode(model, bn_mode)
        op = _DataHessian(model, loss_fn, batches, max_batches)
        if k > op.n:
            raise ValueError(f"Invalid k: {k} (the model has {op.n} trainable parameters)")
        if method == "lanczos":
            v0 = op.random(generator, "gaussian")
            alphas, betas, basis, beta_last = _lanczos(op, v0, max(max_iter, k), k=k, tol=tol)
            theta, s = _tridiag_eig(alphas, betas)
            order = np.argsort(theta)[::-1][:k]
            values = theta[order]
            residuals = np.abs(beta_last * s[-1, order])
            vectors = (
                (torch.from_numpy(s[:, order].T.copy()).to(basis) @ basis).cpu().numpy()
                if return_vectors
                else None
            )
            if not np.all(np.isfinite(theta)):  # stopped at a NaN/inf product: k NaN values
                values, residuals = np.full(k, np.nan), np.full(k, np.nan)
                vectors = np.full((k, op.n), np.nan) if return_vectors else None
        else:
            found: list[tuple[float, Tensor]] = []
            res_list: list[float] = []
            for _ in range(k):
                v = op.random(generator, "gaussian")
                v = v / v.norm()
                lam = 0.0
                res = float("inf")
                for it in range(max_iter):
                    w = op(v)
                    for lam_j, u in found:
                        w = w - lam_j * (u @ v) * u
                    new = float(w @ v)
                    res = float((w - new * v).norm())
                    if not math.isfinite(new):
                        lam = res = math.nan
                        break
                    wn = w.norm()
                    if wn == 0:
                        lam = new
                        break
                    v = w / wn
                    done = it > 0 and abs(new - lam) <= tol * abs(new)
                    lam = new
                    if done:
                        break
                found.append((lam, v))
                res_list.append(res)
            order = np.argsort([lam for lam, _ in found])[::-1][:k]
            values = np.array([found[i][0] for i in order])
            residuals = np.array([res_list[i] for i in order])
            vectors = (
                torch.stack([found[i][1] for i in order]).cpu().numpy() if return_vectors else None
            )
        settings = {
            "method": method,
            "k": k,
            "max_iter": max_iter,
            "tol": tol,
            "n_params": op.n,
            "max_batches": max_batches,
            "bn_mode": bn_mode,
        }
        return EigenResult(
            eigenvalues=values,
            residuals=residuals,
            iterations=op.products,
            eigenvectors=vectors,
            settings=settings,
        )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    n_samples: int = 100,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    bn_mode: BNMode = "eval",
) -> TraceResult:
    r"""Hutchinson estimate of the Hessian trace with its standard error.

    .. math:: \operatorname{tr} H \approx \frac1N \sum_{i=1}^N v_i^\top H v_i,\quad
       \mathrm{SE} = \frac{\operatorname{std}(v_i^\top H v_i)}{\sqrt N}

    with ``v_i`` Rademacher (±1, minimum-variance) or standard Gaussian. The per-sample values are
    returned so other statistics can be derived; the standard error shrinks as ``1/√N``.

    Args:
        model: The network; restored exactly on return.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batches: Iterable of ``(inputs, targets)`` (first ``max_batches`` kept in memory).
        n_samples: Number of probe vectors ``N`` (≥ 2 for a standard error).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: Source of the probes (``None``: torch's default generator).
        max_batches: Use at most this many batches.
        bn_mode: ``"eval"`` or ``"batch"``.

    Returns:
        :class:`TraceResult` with ``trace``, ``stderr`` and ``samples``.

    Raises:
        ValueError: for ``n_samples < 2`` or an unknown distribution.

    References:
        Hutchinson 1990, "A stochastic estimator of the trace of the influence matrix";
        Avron & Toledo 2011; Yao et al. 2020 (arXiv:1912.07145).
    """
    if not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"Invalid n_samples: {n_samples!r} (expected an int >= 2)")
    check_choice("distribution", distribution, ("rademacher", "gaussian"))
    with preserved(model):
        set_eval_mode(model, bn_mode)
        op = _DataHessian(model, loss_fn, batches, max_batches)
        samples = np.empty(n_samples)
        for i in range(n_samples):
            v = op.random(generator, distribution)
            samples[i] = float(v @ op(v))
        settings = {
            "n_samples": n_samples,
            "distribution": distribution,
            "n_params": op.n,
            "max_batches": max_batches,
            "bn_mode": bn_mode,
        }
    return TraceResult(
        trace=float(samples.mean()),
        stderr=float(samples.std(ddof=1) / np.sqrt(n_samples)),
        samples=samples,
        settings=settings,
    )


def hessian_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    steps: int = 80,
    n_probes: int = 1,
    sigma: float | None = None,
    grid_size: int = 1000,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    bn_mode: BNMode = "eval",
) -> SpectrumResult:
    r"""Eigenvalue density of the Hessian by stochastic Lanczos quadrature (SLQ).

    For each probe ``v`` (Rademacher, normalised), ``m`` Lanczos steps give ``T = S Θ Sᵀ``; the
    spectral measure ``vᵀ δ(H − t) v`` is approximated by the Gauss quadrature with nodes ``θ_i``
    and weights ``τ_i = S_{1i}²``, so ``vᵀ f(H) v ≈ Σ_i τ_i f(θ_i)`` (exact for polynomials of
    degree < 2m). The density is smoothed with a Gaussian of width ``σ``:

    .. math:: \phi(t) = \frac1{n_v}\sum_{v}\sum_i \tau_i\,
       \frac{1}{\sqrt{2\pi}\sigma}e^{-(t-\theta_i)^2/2\sigma^2}

    Args:
        model: The network; restored exactly on return.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batches: Iterable of ``(inputs, targets)`` (first ``max_batches`` kept in memory).
        steps: Lanczos steps ``m`` per probe (capped at the number of parameters).
        n_probes: Number of random probes ``n_v``.
        sigma: Kernel width; default ``0.01·(θ_max − θ_min)`` (or 1e-3 for a single node).
        grid_size: Number of grid points, spanning the nodes ± 5σ.
        generator: Source of the probes (``None``: torch's default generator).
        max_batches: Use at most this many batches.
        bn_mode: ``"eval"`` or ``"batch"``.

    Returns:
        :class:`SpectrumResult` (``nodes``, ``weights``, ``grid``, ``density``; ``.trace``).

    References:
        Golub & Meurant 1994; Ubaru, Chen, Saad 2017 (SIAM J. Matrix Anal. Appl.);
        Ghorbani et al. 2019 (arXiv:1901.10159); Yao et al. 2020 (arXiv:1912.07145).
    """
    _check_positive_int("steps", steps)
    _check_positive_int("n_probes", n_probes)
    _check_positive_int("grid_size", grid_size)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"Invalid sigma: {sigma!r} (expected > 0)")
    with preserved(model):
        set_eval_mode(model, bn_mode)
        op = _DataHessian(model, loss_fn, batches, max_batches)
        m = min(steps, op.n)
        nodes = np.full((n_probes, m), np.nan)
        weights = np.zeros((n_probes, m))
        for i in range(n_probes):
            v0 = op.random(generator, "rademacher")
            alphas, betas, _, _ = _lanczos(op, v0, m)
            theta, s = _tridiag_eig(alphas, betas)
            # A Krylov space that closes early has fewer nodes: pad with weight 0 at the last node.
            nodes[i, : len(theta)] = theta
            nodes[i, len(theta) :] = theta[-1]
            weights[i, : len(theta)] = s[0] ** 2
        lo, hi = float(nodes.min()), float(nodes.max())
        width = sigma if sigma is not None else (0.01 * (hi - lo) if hi > lo else 1e-3)
        grid = np.linspace(lo - 5 * width, hi + 5 * width, grid_size)
        kernel = np.exp(-((grid[:, None] - nodes.reshape(-1)[None, :]) ** 2) / (2 * width**2))
        density = kernel @ weights.reshape(-1) / (n_probes * np.sqrt(2 * np.pi) * width)
        settings = {
            "steps": m,
            "n_probes": n_probes,
            "sigma": width,
            "n_params": op.n,
            "max_batches": max_batches,
            "bn_mode": bn_mode,
        }
    return SpectrumResult(
        nodes=nodes, weights=weights, grid=grid, density=density, settings=settings
    )
