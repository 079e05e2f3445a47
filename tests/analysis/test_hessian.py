import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from flatmin.analysis import hessian_eigenvalues, hessian_spectrum, hessian_trace

DT = torch.float64
CE = nn.functional.cross_entropy


def _init(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _mlp(seed=0):  # 3*4+4 + 4*3+3 = 31 parameters
    return _init(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT), seed)


def _batches(seed=1, sizes=(7, 5)):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for n in sizes
    ]


def _dense(model, loss_fn, batches):
    """Dense Hessian of Σ n_b L_b / Σ n_b over trainable parameters, via torch.func.hessian."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    shapes = [p.shape for p in named.values()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in named.values()])
    total = sum(len(y) for _, y in batches)

    def f(flat):
        out, i = {}, 0
        for k, s in zip(named, shapes):
            n = int(np.prod(s))
            out[k] = flat[i : i + n].reshape(s)
            i += n
        return sum(
            len(y) / total * loss_fn(functional_call(model, out, (x,)), y) for x, y in batches
        )

    return hessian(f)(flat0)


def _snapshot(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [b.detach().clone() for b in model.buffers()],
        [m.training for m in model.modules()],
    )


def _assert_same(model, snap):
    params, buffers, modes = snap
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert modes == [m.training for m in model.modules()]


def test_lanczos_top_eigenvalues_match_dense_eigvalsh():
    model, data = _mlp(), _batches()
    model.train()
    snap = _snapshot(model)
    ref = torch.linalg.eigvalsh(_dense(model, CE, data)).flip(0).numpy()
    res = hessian_eigenvalues(
        model, CE, data, k=4, max_iter=100, return_vectors=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    _assert_same(model, snap)
    np.testing.assert_allclose(res.eigenvalues, ref[:4], rtol=1e-6)
    assert np.all(np.diff(res.eigenvalues) <= 0)
    assert res.iterations <= 31 and res.residuals.shape == (4,)
    assert np.all(res.residuals <= 1e-6 * np.abs(res.eigenvalues))
    h = _dense(model, CE, data).numpy()
    for lam, v in zip(res.eigenvalues, res.eigenvectors):
        np.testing.assert_allclose(h @ v, lam * v, atol=1e-6 * abs(ref[0]))


def test_lanczos_early_stop_reports_honest_residuals():
    model, data = _mlp(3), _batches()
    ref = torch.linalg.eigvalsh(_dense(model, CE, data)).flip(0).numpy()
    res = hessian_eigenvalues(model, CE, data, k=1, max_iter=8, tol=1e-3,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert res.iterations <= 8
    # Ritz values never exceed the top eigenvalue; the gap is bounded by the residual (Kato-Temple
    # bound is tighter, the plain residual bound |λ - θ| <= r always holds for some eigenvalue).
    assert res.eigenvalues[0] <= ref[0] + 1e-12
    assert abs(res.eigenvalues[0] - ref[0]) <= res.residuals[0] + 1e-12


def test_power_iteration_matches_dense_on_psd_hessian():
    g = torch.Generator().manual_seed(0)
    model = _init(nn.Linear(4, 2).to(DT), 0)
    data = [(torch.randn(20, 4, generator=g, dtype=DT), torch.randn(20, 2, generator=g, dtype=DT))]
    mse = nn.functional.mse_loss
    ref = torch.linalg.eigvalsh(_dense(model, mse, data)).flip(0).numpy()
    res = hessian_eigenvalues(model, mse, data, k=2, method="power", max_iter=5000, tol=1e-12,
                              generator=torch.Generator().manual_seed(2))  # fmt: skip
    np.testing.assert_allclose(res.eigenvalues, ref[:2], rtol=1e-6)


def test_hutchinson_within_three_standard_errors_and_stderr_shrinks():
    model, data = _mlp(1), _batches()
    exact = float(torch.trace(_dense(model, CE, data)))
    small = hessian_trace(model, CE, data, n_samples=30, generator=torch.Generator().manual_seed(3))
    big = hessian_trace(model, CE, data, n_samples=480, generator=torch.Generator().manual_seed(3))
    for res in (small, big):
        assert abs(res.trace - exact) <= 3 * res.stderr
        np.testing.assert_allclose(res.stderr, res.samples.std(ddof=1) / np.sqrt(res.samples.size))
    assert big.stderr < 0.5 * small.stderr
    gauss = hessian_trace(model, CE, data, n_samples=200, distribution="gaussian",
                          generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert abs(gauss.trace - exact) <= 3 * gauss.stderr


def test_slq_quadrature_is_exact_for_low_moments_and_density_integrates_to_one():
    model, data = _mlp(2), _batches()
    h = _dense(model, CE, data)
    n = h.shape[0]
    res = hessian_spectrum(model, CE, data, steps=n, n_probes=3,
                           generator=torch.Generator().manual_seed(5))  # fmt: skip
    np.testing.assert_allclose(res.weights.sum(axis=1), 1.0, rtol=1e-10)
    # With m = n the quadrature reproduces the full spectrum.
    eig = torch.linalg.eigvalsh(h).numpy()
    nodes = np.sort(res.nodes[0][res.weights[0] > 1e-12])
    assert nodes.max() == pytest.approx(eig.max(), rel=1e-8)
    assert nodes.min() == pytest.approx(eig.min(), rel=1e-8, abs=1e-10)
    # Gauss quadrature of degree 2m-1 is exact: vᵀ H² v / vᵀ v from the same Rademacher probe.
    g = torch.Generator().manual_seed(5)
    v = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(DT)
    second = float(v @ h @ h @ v / (v @ v))
    np.testing.assert_allclose(np.sum(res.weights[0] * res.nodes[0] ** 2), second, rtol=1e-8)
    np.testing.assert_allclose(np.trapezoid(res.density, res.grid), 1.0, atol=1e-3)
    short = hessian_spectrum(model, CE, data, steps=10, generator=torch.Generator().manual_seed(5))
    assert short.nodes.shape == (1, 10)


def test_parameters_without_gradient_are_handled():
    model = _mlp()
    # A parameter the forward never uses -> zero rows and columns.
    model[0].register_parameter("unused", nn.Parameter(torch.ones(2, dtype=DT)))
    model[2].bias.requires_grad_(False)  # frozen -> excluded
    data = _batches()
    h = _dense(model, CE, data)
    assert h.shape == (31 - 3 + 2, 31 - 3 + 2)
    ref = torch.linalg.eigvalsh(h).flip(0).numpy()
    res = hessian_eigenvalues(model, CE, data, k=2, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(res.eigenvalues, ref[:2], rtol=1e-6)
    assert res.settings["n_params"] == 30
    tr = hessian_trace(model, CE, data, n_samples=4, generator=torch.Generator().manual_seed(0))
    assert np.isfinite(tr.trace)


def test_batchnorm_model_is_restored_and_generator_reproduces():
    g = torch.Generator().manual_seed(0)
    model = _init(
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DT), 0
    )
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(4, generator=g, dtype=DT))
    model.train()
    model[3].eval()
    data = _batches()
    snap = _snapshot(model)
    for bn_mode in ("eval", "batch"):
        kw = {"generator": torch.Generator().manual_seed(7), "bn_mode": bn_mode}
        a = hessian_eigenvalues(model, CE, data, k=2, **kw)
        _assert_same(model, snap)
        kw["generator"] = torch.Generator().manual_seed(7)
        b = hessian_eigenvalues(model, CE, data, k=2, **kw)
        assert np.array_equal(a.eigenvalues, b.eigenvalues)
        t1 = hessian_trace(model, CE, data, n_samples=3, generator=torch.Generator().manual_seed(1))
        t2 = hessian_trace(model, CE, data, n_samples=3, generator=torch.Generator().manual_seed(1))
        assert np.array_equal(t1.samples, t2.samples)
        s = hessian_spectrum(model, CE, data, steps=5, generator=torch.Generator().manual_seed(1))
        _assert_same(model, snap)
        assert np.isfinite(s.density).all()


@pytest.mark.parametrize(
    ("func", "kwargs", "match"),
    [
        (hessian_eigenvalues, {"k": 0}, "Invalid k"),
        (hessian_eigenvalues, {"k": 40}, "Invalid k: 40"),
        (hessian_eigenvalues, {"method": "qr"}, "Invalid method"),
        (hessian_eigenvalues, {"tol": -1.0}, "Invalid tol"),
        (hessian_trace, {"n_samples": 1}, "Invalid n_samples"),
        (hessian_trace, {"distribution": "uniform"}, "Invalid distribution"),
        (hessian_spectrum, {"sigma": 0.0}, "Invalid sigma"),
        (hessian_eigenvalues, {"max_batches": 0}, "Invalid max_batches"),
        (hessian_eigenvalues, {"bn_mode": "train"}, "Invalid bn_mode"),
    ],
)
def test_errors(func, kwargs, match):
    model = _mlp()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        func(model, CE, _batches(), **kwargs)
    _assert_same(model, snap)
