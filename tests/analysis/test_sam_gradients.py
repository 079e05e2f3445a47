import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from flatmin.analysis import SAMGradientResult, sam_gradients

DT = torch.float64
CE = nn.functional.cross_entropy


def _net(seed=0, bn=False):
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 3)]
    model = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _batch(seed=1, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


@pytest.mark.parametrize("bn", [False, True])
def test_second_order_equals_autograd_through_epsilon(bn):
    model, (x, y) = _net(bn=bn), _batch()
    model.train()
    rho = 0.1
    before = [t.clone() for t in [*model.parameters(), *model.buffers()]]
    res = sam_gradients(model, CE, (x, y), rho)
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *model.buffers()]))
    assert model.training
    model.eval()  # the reference uses the same (eval-mode) function
    w = {k: v.detach() for k, v in model.named_parameters()}

    def loss(params):
        return CE(functional_call(model, params, (x,)), y)

    def eps(params):
        g = grad(loss)(params)
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        return {k: rho * g[k] / norm for k in g}

    def sam_objective(params):  # L(w + ε̂(w)), differentiated through ε̂
        e = eps(params)
        return loss({k: params[k] + e[k] for k in params})

    full = _flat(grad(sam_objective)(w))
    np.testing.assert_allclose(res.second_order, full.numpy(), rtol=1e-9, atol=1e-12)
    e = {k: v.detach() for k, v in eps(w).items()}
    first = _flat(grad(loss)({k: w[k] + e[k] for k in w}))
    np.testing.assert_allclose(res.first_order, first.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res.gradient, _flat(grad(loss)(w)).numpy(), rtol=1e-12)
    cos = float(full @ first / (full.norm() * first.norm()))
    assert res.cosine == pytest.approx(cos, rel=1e-9)
    assert res.perturbed_loss == pytest.approx(float(loss({k: w[k] + e[k] for k in w})), rel=1e-12)


def test_rho_zero_and_round_trip(tmp_path):
    model, batch = _net(2), _batch(3)
    res = sam_gradients(model, CE, batch, 0.0)
    np.testing.assert_array_equal(res.first_order, res.gradient)
    np.testing.assert_array_equal(res.second_order, res.first_order)
    assert res.cosine == pytest.approx(1.0)
    res.save(tmp_path / "g")
    back = SAMGradientResult.load(tmp_path / "g")
    np.testing.assert_array_equal(back.second_order, res.second_order)
    assert back.cosine == res.cosine
    with pytest.raises(ValueError, match=r"Invalid rho: -1"):
        sam_gradients(model, CE, batch, -1)


def test_stationary_point_gives_finite_equal_gradients():
    # L(w) = mean‖f_w(x) − f_{w₀}(x)‖² at w = w₀: g = 0 exactly (a zero residual), H ≠ 0. ε̂ = 0
    # there and is not differentiable (a norm at 0), so g_2 = g_1 = ∇L(w₀) = 0, not NaN.
    model, (x, _) = _net(4), _batch(5)
    target = model(x).detach()
    assert float(nn.functional.mse_loss(target, model(x).detach())) == 0.0
    res = sam_gradients(model, nn.functional.mse_loss, (x, target), rho=0.1)
    n = sum(p.numel() for p in model.parameters())
    for arr in (res.gradient, res.first_order, res.second_order):
        assert arr.shape == (n,)
        np.testing.assert_array_equal(arr, np.zeros(n))
    np.testing.assert_array_equal(res.second_order, res.first_order)
    assert res.loss == 0.0 and res.perturbed_loss == 0.0
