"""SAM in real training: accumulation, AMP, clipping, same RNG, rho schedules, second order, trainers.

Every reference below is independent of flatmin's kernels: SAM written out with torch.func in
float64, torch's own clip rule, closed-form schedules, and autograd of L(w + ε(w)) through ε.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from flatmin import SAM
from flatmin.optim.accumulation import accumulation_closure
from flatmin.optim.amp import sam_step_amp
from flatmin.optim.rho_schedule import ProportionalRho
from flatmin.optim.second_order import second_order_step

F = nn.functional


def _mlp(dtype=torch.float64, seed=0, dropout=0.0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(dropout), nn.Linear(7, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype)


def _data(n=16, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _ref_sam_sgd(model, x, y, *, rho, lr, steps=1, max_grad_norm=None):
    """Full-batch SAM(SGD) written out with torch.func, in float64; returns the final params."""
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_of(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    for _ in range(steps):
        g = torch.func.grad(loss_of)(w)
        norm = torch.sqrt(sum((g[n] ** 2).sum() for n in names))
        w_adv = {n: w[n] + rho * g[n] / (norm + 1e-12) for n in names}
        g_sam = torch.func.grad(loss_of)(w_adv)
        if max_grad_norm is not None:
            total = torch.sqrt(sum((g_sam[n] ** 2).sum() for n in names))
            coef = min(1.0, max_grad_norm / (float(total) + 1e-6))
            g_sam = {n: g_sam[n] * coef for n in names}
        w = {n: w[n] - lr * g_sam[n] for n in names}
    return w


def _assert_params(model, ref, atol):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n], atol=atol, rtol=0)


# -- 1. gradient accumulation -------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
def test_accumulation_equals_full_batch_sam(k):
    x, y = _data(16)
    ref = _ref_sam_sgd(_mlp(), x, y, rho=0.1, lr=0.3, steps=3)

    # The recipe by hand: k backward passes, first_step, k backward passes, second_step.
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.3)
    micro = list(zip(x.chunk(k), y.chunk(k)))
    for _ in range(3):
        for xb, yb in micro:
            (F.cross_entropy(model(xb), yb) / k).backward()
        opt.first_step(zero_grad=True)
        for xb, yb in micro:
            (F.cross_entropy(model(xb), yb) / k).backward()
        opt.second_step(zero_grad=True)
    _assert_params(model, ref, 1e-6)

    # The helper closure through step(closure).
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.3)
    closure = accumulation_closure(opt, lambda b: F.cross_entropy(model(b[0]), b[1]), micro)
    for _ in range(3):
        opt.step(closure)
    _assert_params(model, ref, 1e-6)


def test_accumulation_unequal_micro_batches_with_weights():
    x, y = _data(16)
    ref = _ref_sam_sgd(_mlp(), x, y, rho=0.1, lr=0.3, steps=2)
    sizes = [3, 8, 5]
    micro = list(zip(x.split(sizes), y.split(sizes)))
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.3)
    closure = accumulation_closure(
        opt, lambda b: F.cross_entropy(model(b[0]), b[1]), micro, weights=[s / 16 for s in sizes]
    )
    for _ in range(2):
        loss = opt.step(closure)
    assert loss.shape == ()
    _assert_params(model, ref, 1e-6)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"micro_batches": iter([1])}, TypeError, "sequence"),
        ({"micro_batches": []}, ValueError, "empty"),
        ({"micro_batches": [1, 2], "weights": [1.0]}, ValueError, "1 entries for 2"),
        ({"micro_batches": [1], "weights": [math.nan]}, ValueError, "finite"),
        ({"micro_batches": [1], "ddp_model": nn.Linear(1, 1)}, TypeError, "no_sync"),
    ],
)
def test_accumulation_closure_errors(kwargs, exc, match):
    opt = SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(exc, match=match):
        accumulation_closure(opt, lambda b: b, **kwargs)


# -- 2. mixed precision -------------------------------------------------------------------------
def test_bf16_autocast_step_close_to_float32():
    x, y = _data(32, dtype=torch.float32)
    models = [_mlp(torch.float32), _mlp(torch.float32)]
    opts = [SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9) for m in models]
    for autocast, model, opt in zip([False, True], models, opts):

        def closure(model=model, opt=opt, autocast=autocast):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
            assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
            loss = F.cross_entropy(out.float(), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
    for p32, p16 in zip(models[0].parameters(), models[1].parameters()):
        assert p16.dtype == torch.float32 and torch.isfinite(p16).all()
        # bf16 has an 8-bit mantissa: agreement to ~1e-2 of the parameter scale.
        torch.testing.assert_close(p16, p32, atol=2e-2, rtol=0)


class _InfGrad(nn.Module):
    """Identity whose backward returns inf on the forward calls listed in ``poison``."""

    def __init__(self, poison):
        super().__init__()
        self.poison, self.calls = set(poison), 0

    def forward(self, x):
        self.calls += 1
        if self.calls in self.poison:
            x.register_hook(lambda g: torch.full_like(g, math.inf))
        return x


def _amp_setup(poison=()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), _InfGrad(poison), nn.Linear(7, 3))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=1
    )
    x, y = _data(16, dtype=torch.float32)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    return model, opt, scaler, closure, (x, y)


def _plain_sam_copy(model, opt, x, y):
    m2 = copy.deepcopy(model)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    o2.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() holds references

    def closure():
        o2.zero_grad()
        loss = F.cross_entropy(m2(x), y)
        loss.backward()
        return loss

    return m2, o2, closure


def test_grad_scaler_finite_step_equals_plain_sam_and_grows_scale_once():
    model, opt, scaler, closure, (x, y) = _amp_setup()
    m2, o2, c2 = _plain_sam_copy(model, opt, x, y)
    for i in range(3):
        loss, skipped = sam_step_amp(opt, scaler, closure)
        ref_loss = o2.step(c2)
        assert not skipped
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
        # One update per SAM step: growth_interval=1 doubles the scale once, not twice.
        assert scaler.get_scale() == 2.0 ** (11 + i)
    for p, q in zip(model.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("poisoned_pass", [1, 2])
def test_grad_scaler_overflow_restores_weights_and_skips(poisoned_pass):
    # Step 1 is clean (builds momentum); the chosen pass of step 2 gets an inf gradient.
    model, opt, scaler, closure, (x, y) = _amp_setup(poison=[2 + poisoned_pass])
    sam_step_amp(opt, scaler, closure)
    assert scaler.get_scale() == 2.0**11
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    calls = model[2].calls
    loss, skipped = sam_step_amp(opt, scaler, closure)
    assert skipped and torch.isfinite(loss)
    # A first-pass overflow never runs the second pass.
    assert model[2].calls - calls == poisoned_pass
    for p, b, m in zip(model.parameters(), before, momentum):
        assert torch.equal(p, b)  # bit-exact
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], m)
        assert p.grad is None
    assert scaler.get_scale() == 2.0**10  # backed off once
    assert not opt.perturbed
    # The next step is an ordinary SAM step from the untouched state.
    m2, o2, c2 = _plain_sam_copy(model, opt, x, y)
    _, skipped = sam_step_amp(opt, scaler, closure)
    o2.step(c2)
    assert not skipped
    for p, q in zip(model.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_grad_scaler_disabled_is_plain_step():
    model, opt, _, _, (x, y) = _amp_setup()
    m2, o2, c2 = _plain_sam_copy(model, opt, x, y)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    sam_step_amp(opt, scaler, closure)
    o2.step(c2)
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_step_without_closure_finishes_a_pending_sam_step():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1 = SAM(m1.parameters(), torch.optim.SGD, lr=0.1)
    o2 = SAM(m2.parameters(), torch.optim.SGD, lr=0.1)
    for m, o in ((m1, o1), (m2, o2)):
        F.cross_entropy(m(x), y).backward()
        o.first_step(zero_grad=True)
        F.cross_entropy(m(x), y).backward()
    assert o1.perturbed
    assert o1.step() is None
    o2.second_step()
    assert not o1.perturbed
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


# -- 3. clipping ----------------------------------------------------------------------------------
def test_max_grad_norm_clips_the_sam_gradient():
    x, y = _data()
    for max_norm in (0.05, 100.0):  # active, and inactive
        ref = _ref_sam_sgd(_mlp(), x, y, rho=0.1, lr=0.5, steps=2, max_grad_norm=max_norm)
        model = _mlp()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, max_grad_norm=max_norm)

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure)
        _assert_params(model, ref, 1e-10)
    # And it really clipped: the unclipped run lands elsewhere.
    unclipped = _ref_sam_sgd(_mlp(), x, y, rho=0.1, lr=0.5, steps=2)
    clipped = _ref_sam_sgd(_mlp(), x, y, rho=0.1, lr=0.5, steps=2, max_grad_norm=0.05)
    assert max((unclipped[n] - clipped[n]).abs().max() for n in clipped) > 1e-3


@pytest.mark.parametrize(
    "kw", [{"p": 2}, {"p": 2, "adaptive": True}, {"p": 3.0}, {"p": 1.5, "adaptive": True}]
)
def test_clipping_before_the_ascent_changes_nothing(kw):
    """ε̂ is homogeneous of degree 0 in g, so global-norm clipping of g cannot move w + ε̂."""
    x, y = _data()
    points = []
    for clip in (None, 1e-3):
        model = _mlp()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, eps=0.0, **kw)
        F.cross_entropy(model(x), y).backward()
        if clip is not None:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            assert total > 10 * clip  # the clip was active
        opt.first_step()
        points.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*points):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("value", "exc"), [(0.0, ValueError), (-1.0, ValueError), (True, TypeError), ("1", TypeError)]
)
def test_max_grad_norm_errors(value, exc):
    with pytest.raises(exc, match="Invalid max_grad_norm"):
        SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, max_grad_norm=value)
