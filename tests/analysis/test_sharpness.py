import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from flatmin.analysis import SharpnessResult, sharpness

DT = torch.float64
CE = nn.functional.cross_entropy


def _net(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=g, dtype=DT))
        model[1].running_mean.copy_(0.1 * torch.randn(5, generator=g, dtype=DT))
    return model


def _batches(seed=1, n=3, bs=8):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(bs, 4, generator=g, dtype=DT), torch.randint(0, 3, (bs,), generator=g))
        for _ in range(n)
    ]


def _loss_at(model, delta, batch):
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p, d in zip(m.parameters(), delta):
            p.add_(d)
        return float(CE(m(batch[0]), batch[1]))


def _grad(model, batch):
    m = copy.deepcopy(model).eval()
    return torch.autograd.grad(CE(m(batch[0]), batch[1]), list(m.parameters()))


@pytest.mark.parametrize(
    ("p", "adaptive"), [(2, False), (math.inf, False), (2, True), (math.inf, True)]
)
def test_one_step_worst_case_equals_closed_form(p, adaptive):
    model, data = _net(), _batches()
    model.train()
    before = [t.clone() for t in [*model.parameters(), *model.buffers()]]
    rho, eta = 0.07, 0.01
    res = sharpness(model, CE, data, rho=rho, p=p, adaptive=adaptive, eta=eta)
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *model.buffers()]))
    assert model.training
    expected = []
    for batch in data:
        g = _grad(model, batch)
        t = [w.detach().abs() + eta if adaptive else torch.ones_like(w) for w in model.parameters()]
        if p == 2:  # SAM: ρ g/‖g‖; ASAM: ρ T² g / ‖T g‖
            norm = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(t, g)))
            delta = [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
        else:  # ρ T sign(g)
            delta = [rho * ti * torch.sign(gi) for ti, gi in zip(t, g)]
        expected.append(
            _loss_at(model, delta, batch) - _loss_at(model, [0 * d for d in delta], batch)
        )
    np.testing.assert_allclose(res.values, expected, rtol=1e-10, atol=1e-14)
    assert res.mean == pytest.approx(np.mean(expected), rel=1e-10)
    assert res.std == pytest.approx(np.std(expected, ddof=1), rel=1e-8)


def test_multi_step_is_at_least_one_step_and_below_quadratic_bound():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    batch = (torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 2, generator=g, dtype=DT))
    mse = nn.functional.mse_loss
    rho = 0.3
    one = sharpness(model, mse, [batch], rho=rho)
    multi = sharpness(model, mse, [batch], rho=rho, steps=20, step_size=rho)
    assert multi.values[0] >= one.values[0] - 1e-14
    # MSE of a linear model is quadratic: L(w+δ) − L(w) = gᵀδ + ½ δᵀHδ <= ρ‖g‖ + ½ ρ² λ_max.
    params = list(model.parameters())
    loss = mse(model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gflat = torch.cat([x.reshape(-1) for x in grads])
    rows = [torch.cat([r.reshape(-1) for r in torch.autograd.grad(gi, params, retain_graph=True)])
            for gi in gflat]  # fmt: skip
    lam = float(torch.linalg.eigvalsh(torch.stack(rows)).max())
    bound = rho * float(gflat.norm()) + 0.5 * rho**2 * lam
    assert multi.values[0] <= bound + 1e-12
    assert multi.values[0] > one.values[0] + 1e-6  # ascent improves on the first-order step here


def test_m_sharpness_averages_chunks():
    model, data = _net(1), _batches(n=2, bs=8)
    res = sharpness(model, CE, data, rho=0.05, m=4)
    for i, (x, y) in enumerate(data):
        halves = [
            sharpness(model, CE, [(x[j : j + 4], y[j : j + 4])], rho=0.05).values[0] for j in (0, 4)
        ]
        assert res.values[i] == pytest.approx(np.mean(halves), rel=1e-12)


def test_average_case_matches_manual_gaussian_draws_and_is_reproducible():
    model, data = _net(2), _batches(n=2)
    rho, k = 0.02, 4
    res = sharpness(model, CE, data, rho=rho, kind="average", samples=k,
                    generator=torch.Generator().manual_seed(9))  # fmt: skip
    again = sharpness(model, CE, data, rho=rho, kind="average", samples=k,
                      generator=torch.Generator().manual_seed(9))  # fmt: skip
    np.testing.assert_array_equal(res.values, again.values)
    g = torch.Generator().manual_seed(9)
    for i, batch in enumerate(data):
        draws = []
        for _ in range(k):
            z = [rho * torch.randn(p.shape, generator=g, dtype=DT) for p in model.parameters()]
            draws.append(_loss_at(model, z, batch))
        expected = np.mean(draws) - _loss_at(
            model, [torch.zeros_like(p) for p in model.parameters()], batch
        )
        assert res.values[i] == pytest.approx(expected, rel=1e-10)


def test_batch_statistics_mode_and_round_trip(tmp_path):
    model, data = _net(3), _batches()
    before = [t.clone() for t in [*model.parameters(), *model.buffers()]]
    res = sharpness(model, CE, data, rho=0.05, bn_mode="batch", max_batches=2)
    assert res.values.shape == (2,)
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *model.buffers()]))
    res.save(tmp_path / "s")
    back = SharpnessResult.load(tmp_path / "s")
    np.testing.assert_array_equal(back.values, res.values)
    assert back.settings == res.settings and back.mean == res.mean


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": -0.1}, r"Invalid rho: -0.1 \(expected >= 0\)"),
        ({"p": 1}, "Invalid p"),
        ({"kind": "best"}, "Invalid kind"),
        ({"steps": 0}, "Invalid steps"),
        ({"m": 0}, "Invalid m"),
        ({"step_size": 0.0}, "Invalid step_size"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharpness(_net(), CE, _batches(), **kwargs)
