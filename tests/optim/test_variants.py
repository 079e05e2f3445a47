"""Cheaper SAM variants: SAM every k steps, LookSAM, ESAM, and the masked perturbation kernel."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from flatmin.optim import SAM
from flatmin.optim.amp import sam_step_amp
from flatmin.optim.esam import ESAM, per_sample_closure
from flatmin.optim.looksam import LookSAM, SAMEveryK
from flatmin.optim.rules import LpBall, PerturbGroup


def _bn_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _batches(n: int, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(16, 5, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g))
        for _ in range(n)
    ]


def _closure(opt, model, x, y, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _train_closure(opt, model, batches, calls_per_step=None):
    for x, y in batches:
        calls: list[int] = []
        opt.step(_closure(opt, model, x, y, calls), model=model)
        if calls_per_step is not None:
            calls_per_step.append(len(calls))


def _assert_same_model(a: nn.Module, b: nn.Module) -> None:
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


def _sgd_kw():
    return {"rho": 0.1, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


@pytest.mark.parametrize(
    "variant",
    [
        lambda ps: SAMEveryK(ps, torch.optim.SGD, k=1, **_sgd_kw()),
        lambda ps: LookSAM(ps, torch.optim.SGD, k=1, alpha=0.7, **_sgd_kw()),
    ],
    ids=["every_k", "looksam"],
)
def test_k_equal_one_is_sam(variant):
    model_a, batches = _bn_model(), _batches(5)
    model_b = copy.deepcopy(model_a)
    sam = SAM(model_a.parameters(), torch.optim.SGD, **_sgd_kw())
    opt = variant(model_b.parameters())
    calls: list[int] = []
    _train_closure(sam, model_a, batches)
    _train_closure(opt, model_b, batches, calls)
    assert calls == [2] * 5
    _assert_same_model(model_a, model_b)


def test_looksam_alpha_zero_is_sam_every_k():
    model_a, batches = _bn_model(), _batches(7)
    model_b = copy.deepcopy(model_a)
    every = SAMEveryK(model_a.parameters(), torch.optim.SGD, k=3, **_sgd_kw())
    look = LookSAM(model_b.parameters(), torch.optim.SGD, k=3, alpha=0.0, **_sgd_kw())
    _train_closure(every, model_a, batches)
    _train_closure(look, model_b, batches)
    _assert_same_model(model_a, model_b)


@pytest.mark.parametrize("cls", [SAMEveryK, LookSAM])
def test_off_steps_call_the_closure_once(cls):
    model, batches = _bn_model(), _batches(7)
    opt = cls(model.parameters(), torch.optim.SGD, k=3, lr=0.1)
    calls: list[int] = []
    _train_closure(opt, model, batches, calls)
    assert calls == [2, 1, 1, 2, 1, 1, 2]
    assert opt.steps_taken == 7


def test_sam_every_k_off_step_is_the_base_step():
    model_a, batches = _bn_model(), _batches(3)
    model_b = copy.deepcopy(model_a)
    opt = SAMEveryK(model_a.parameters(), torch.optim.SGD, k=2, rho=0.1, lr=0.1)
    base = torch.optim.SGD(model_b.parameters(), lr=0.1)
    _train_closure(opt, model_a, batches[:1])
    # Reference: one SAM step by hand, then a plain SGD step.
    ref = SAM(model_b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    _train_closure(ref, model_b, batches[:1])
    _assert_same_model(model_a, model_b)
    _train_closure(opt, model_a, batches[1:2])
    x, y = batches[1]
    _closure(base, model_b, x, y)()
    base.step()
    _assert_same_model(model_a, model_b)


def _quadratic(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    m = torch.randn(7, 7, generator=g, dtype=dtype)
    a = m @ m.T / 7 + 0.5 * torch.eye(7, dtype=dtype)
    b = torch.randn(7, generator=g, dtype=dtype)
    theta = torch.randn(7, generator=g, dtype=dtype)
    return a, b, theta


@pytest.mark.parametrize("foreach", [True, False])
def test_looksam_updates_equal_the_formula_on_a_quadratic(foreach):
    a, b, theta0 = _quadratic()
    # Two groups with different shapes: the norms and the dot product run over all of them.
    w1 = nn.Parameter(theta0[:3].clone())
    w2 = nn.Parameter(theta0[3:].clone().reshape(2, 2))
    rho, lr, alpha, k = 0.2, 0.05, 0.7, 3
    opt = LookSAM([{"params": [w1]}, {"params": [w2]}], torch.optim.SGD, k=k, alpha=alpha,
                  rho=rho, lr=lr, foreach=foreach)  # fmt: skip

    def closure():
        opt.zero_grad()
        theta = torch.cat([w1, w2.reshape(-1)])
        loss = 0.5 * theta @ a @ theta - b @ theta
        loss.backward()
        return loss

    def grad(t):
        return a @ t - b

    theta = theta0.clone()
    for step in range(7):
        opt.step(closure)
        g = grad(theta)
        if step % k == 0:
            e = rho * g / g.norm()
            g_s = grad(theta + e)
            g_v = g_s - (g @ g_s) / (g @ g) * g
            theta = theta - lr * g_s
        else:
            theta = theta - lr * (g + alpha * g.norm() / g_v.norm() * g_v)
        got = torch.cat([w1.detach(), w2.detach().reshape(-1)])
        # 1e-10: the eps guards (1e-12) in the normalisers shift the last digits.
        torch.testing.assert_close(got, theta, rtol=1e-10, atol=1e-10)


def test_looksam_resume_continues_in_lockstep():
    batches = _batches(9)
    model_a = _bn_model()
    opt_a = LookSAM(model_a.parameters(), torch.optim.SGD, k=3, alpha=0.5, **_sgd_kw())
    _train_closure(opt_a, model_a, batches[:4])
    model_b = _bn_model()
    model_b.load_state_dict(model_a.state_dict())
    opt_b = LookSAM(model_b.parameters(), torch.optim.SGD, k=3, alpha=0.5, **_sgd_kw())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.steps_taken == 4
    _train_closure(opt_a, model_a, batches[4:])
    _train_closure(opt_b, model_b, batches[4:])
    _assert_same_model(model_a, model_b)


def _per_sample(opt, model, x, y, calls=None):
    def losses(index=None):
        if calls is not None:
            calls.append("all" if index is None else len(index))
        xb, yb = (x, y) if index is None else (x[index], y[index])
        return nn.functional.cross_entropy(model(xb), yb, reduction="none")

    return per_sample_closure(opt, losses)


def test_esam_with_beta_gamma_one_is_sam():
    model_a, batches = _bn_model(), _batches(5)
    model_b = copy.deepcopy(model_a)
    sam = SAM(model_a.parameters(), torch.optim.SGD, **_sgd_kw())
    esam = ESAM(model_b.parameters(), torch.optim.SGD, beta=1.0, gamma=1.0, **_sgd_kw())
    _train_closure(sam, model_a, batches)
    for x, y in batches:
        calls: list = []
        loss = esam.step(_per_sample(esam, model_b, x, y, calls), model=model_b)
        assert calls == ["all", "all"]
        assert loss.shape == (16,) and not loss.requires_grad  # the per-sample losses at w
    _assert_same_model(model_a, model_b)


def test_esam_data_selection_uses_the_sharpest_samples():
    torch.manual_seed(4)
    model = nn.Linear(5, 3).double()
    x, y = _batches(1)[0]
    ref = copy.deepcopy(model)
    rho, lr, gamma = 0.3, 0.1, 0.25
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=1.0, gamma=gamma, rho=rho, lr=lr)
    calls: list = []
    opt.step(_per_sample(opt, model, x, y, calls))
    assert calls == ["all", "all", 4]
    # Reference by hand with torch.func: per-sample losses at w and at w + ε̂.
    params = dict(ref.named_parameters())

    def losses(p):
        return nn.functional.cross_entropy(torch.func.functional_call(ref, p, (x,)), y,
                                           reduction="none")  # fmt: skip

    before = losses(params)
    g = torch.autograd.grad(before.mean(), list(params.values()))
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    pert = {n: p.detach() + rho * t / norm for (n, p), t in zip(params.items(), g)}
    after = losses(pert)
    top = torch.topk(after - before.detach(), math.ceil(gamma * 16)).indices
    pert = {n: t.requires_grad_() for n, t in pert.items()}
    sel = nn.functional.cross_entropy(torch.func.functional_call(ref, pert, (x[top],)), y[top])
    g_plus = torch.autograd.grad(sel, list(pert.values()))
    for (name, p), gp in zip(params.items(), g_plus):
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(),
                                   p.detach() - lr * gp, rtol=1e-12, atol=1e-12)  # fmt: skip


def test_esam_weight_perturbation_moves_the_drawn_tensors_only():
    a, b, theta0 = _quadratic()
    ws = [nn.Parameter(theta0[i : i + 1].clone()) for i in range(7)]
    rho, lr, beta = 0.2, 0.05, 0.5
    gen = torch.Generator().manual_seed(11)
    opt = ESAM(ws, torch.optim.SGD, beta=beta, gamma=1.0, rho=rho, lr=lr, generator=gen)
    mask = torch.rand(7, generator=torch.Generator().manual_seed(11)) < beta
    assert 0 < int(mask.sum()) < 7  # this seed draws a proper subset

    def loss_fn(index=None):
        theta = torch.cat(list(ws))
        return (0.5 * theta @ a @ theta - b @ theta).reshape(1)

    opt.step(per_sample_closure(opt, loss_fn))
    g = a @ theta0 - b
    e = torch.where(mask, rho * g / g.norm() / beta, torch.zeros_like(g))
    g_plus = a @ (theta0 + e) - b
    expected = theta0 - lr * torch.where(mask, g_plus, g)
    torch.testing.assert_close(torch.cat([w.detach() for w in ws]), expected, rtol=1e-12,
                               atol=1e-12)  # fmt: skip
    assert all(w.requires_grad for w in ws)


def test_esam_under_a_grad_scaler_equals_the_formula_on_a_quadratic():
    # The undrawn tensors step with g, unscaled once (the scaler's unscale_ must not divide the
    # kept first-pass gradient a second time).
    a, b, theta0 = _quadratic()
    ws = [nn.Parameter(theta0[i : i + 1].clone()) for i in range(7)]
    rho, lr, beta = 0.2, 0.05, 0.5
    gen = torch.Generator().manual_seed(11)
    opt = ESAM(ws, torch.optim.SGD, beta=beta, gamma=1.0, rho=rho, lr=lr, generator=gen)
    mask = torch.rand(7, generator=torch.Generator().manual_seed(11)) < beta
    assert 0 < int(mask.sum()) < 7  # this seed draws a proper subset
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def closure(index=None):
        opt.zero_grad()
        theta = torch.cat(list(ws))
        loss = (0.5 * theta @ a @ theta - b @ theta).reshape(1)
        scaler.scale(loss.mean()).backward()
        return loss.detach()

    _, skipped = sam_step_amp(opt, scaler, closure)
    assert not skipped
    g = a @ theta0 - b
    e = torch.where(mask, rho * g / g.norm() / beta, torch.zeros_like(g))
    g_plus = a @ (theta0 + e) - b
    expected = theta0 - lr * torch.where(mask, g_plus, g)
    torch.testing.assert_close(torch.cat([w.detach() for w in ws]), expected, rtol=1e-12,
                               atol=1e-12)  # fmt: skip


def test_esam_resume_continues_in_lockstep():
    batches = _batches(6)
    model_a = _bn_model()
    kw = {"beta": 0.5, "gamma": 0.5, **_sgd_kw()}
    opt_a = ESAM(model_a.parameters(), torch.optim.SGD, **kw)
    for x, y in batches[:3]:
        opt_a.step(_per_sample(opt_a, model_a, x, y), model=model_a)
    model_b = _bn_model()
    model_b.load_state_dict(model_a.state_dict())
    opt_b = ESAM(model_b.parameters(), torch.optim.SGD, generator=torch.Generator(), **kw)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for x, y in batches[3:]:
        opt_a.step(_per_sample(opt_a, model_a, x, y), model=model_a)
        opt_b.step(_per_sample(opt_b, model_b, x, y), model=model_b)
    _assert_same_model(model_a, model_b)


def test_masked_kernels_agree_in_float64():
    g = torch.Generator().manual_seed(5)
    shapes = [(3, 4), (5,), (2, 3, 2), (1,)]
    for p, adaptive in [(2.0, False), (2.0, True), (math.inf, False), (3.0, False)]:
        params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        # A non-contiguous tensor too.
        params[0] = params[0].t()
        grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in params]
        mask = [True, False, True, False]
        a = [t.clone() for t in params]
        b = [t.clone() for t in params]
        rule = LpBall()
        rule.perturb_([PerturbGroup(a, grads, 0.1, p, adaptive, 0.01, mask)], 1e-12, foreach=False)
        rule.perturb_([PerturbGroup(b, grads, 0.1, p, adaptive, 0.01, mask)], 1e-12, foreach=True)
        full = [t.clone() for t in params]
        rule.perturb_([PerturbGroup(full, grads, 0.1, p, adaptive, 0.01)], 1e-12, foreach=False)
        for i, (ta, tb) in enumerate(zip(a, b)):
            torch.testing.assert_close(ta, tb, rtol=1e-14, atol=1e-14)
            # Masked tensors stay put; moved ones move exactly as without a mask (same norm).
            torch.testing.assert_close(ta, full[i] if mask[i] else params[i], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda ps: SAMEveryK(ps, torch.optim.SGD, k=0, lr=0.1), ValueError, r"Invalid k: 0"),
        (lambda ps: SAMEveryK(ps, torch.optim.SGD, k=2.0, lr=0.1), TypeError, r"Invalid k: 2.0"),
        (lambda ps: LookSAM(ps, torch.optim.SGD, alpha=-1.0, lr=0.1), ValueError,
         r"Invalid alpha: -1.0"),
        (lambda ps: LookSAM(ps, torch.optim.SGD, alpha="x", lr=0.1), TypeError, r"Invalid alpha"),
        (lambda ps: ESAM(ps, torch.optim.SGD, beta=0.0, lr=0.1), ValueError, r"Invalid beta: 0.0"),
        (lambda ps: ESAM(ps, torch.optim.SGD, gamma=1.5, lr=0.1), ValueError,
         r"Invalid gamma: 1.5"),
        (lambda ps: ESAM(ps, torch.optim.SGD, generator=3, lr=0.1), TypeError,
         r"Invalid generator"),
        (lambda ps: LookSAM(ps, torch.optim.SGD, k=2, rho=-0.1, lr=0.1), ValueError,
         r"Invalid rho"),
    ],
)  # fmt: skip
def test_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make(nn.Linear(2, 1).parameters())


def test_esam_rejects_a_reduced_loss():
    model = nn.Linear(2, 1)
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x = torch.randn(4, 2)
    before = [w.detach().clone() for w in model.parameters()]

    def closure(index=None):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"Invalid per-sample losses of shape \(\)"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.perturbed


def test_plain_step_between_passes_is_an_error():
    model, (x, y) = _bn_model(), _batches(1)[0]
    opt = SAMEveryK(model.parameters(), torch.optim.SGD, k=2, lr=0.1)
    _closure(opt, model, x, y)()
    opt.first_step()
    with pytest.raises(RuntimeError, match="plain_step"):
        opt.plain_step()
