"""SAM in real training: accumulation, AMP, clipping, same RNG, rho, second order, trainers.

Every reference below is independent of flatmin's kernels: SAM written out with torch.func in
float64, torch's own clip rule, closed-form schedules, and autograd of L(w + ε(w)) through ε.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from flatmin import ESAM, GCSAM, SAM, FriendlySAM
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


def _esam_pair(dtype, gamma):
    """Two identical ESAM(SGD, momentum) optimizers with generators in the same state."""
    out = []
    for _ in range(2):
        model = _mlp(dtype, seed=4)
        opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=gamma, rho=0.1, lr=0.2,
                   momentum=0.9, generator=torch.Generator().manual_seed(7))  # fmt: skip
        out.append((model, opt))
    return out


def _esam_closure(model, opt, x, y, scaler=None):
    def losses(index=None):
        xb, yb = (x, y) if index is None else (x[index], y[index])
        return F.cross_entropy(model(xb), yb, reduction="none")

    def closure(index=None):
        opt.zero_grad()
        out = losses(index)
        if torch.is_grad_enabled():
            loss = out.mean()
            (loss if scaler is None else scaler.scale(loss)).backward()
        return out.detach()

    return closure


@pytest.mark.parametrize("gamma", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_scaler_esam_undrawn_tensors_step_with_the_unscaled_gradient(dtype, gamma):
    # ESAM keeps the first-pass gradient of the tensors SWP did not draw: it must reach the base
    # step unscaled once (it was g / scale, a 256x smaller step, when unscaled twice).
    x, y = _data(16, dtype=dtype)
    (m1, o1), (m2, o2) = _esam_pair(dtype, gamma)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    c1, c2 = _esam_closure(m1, o1, x, y, scaler), _esam_closure(m2, o2, x, y)
    mixed = 0
    for _ in range(4):
        _, skipped = sam_step_amp(o1, scaler, c1, model=m1)
        o2.step(c2, model=m2)
        assert not skipped
        masks = [m for g in o1.last_groups for m in g.mask or ()]
        assert masks == [m for g in o2.last_groups for m in g.mask or ()]  # the same draws
        mixed += any(masks) and not all(masks)
    assert mixed > 0  # some step perturbed a proper subset of the tensors
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0)


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


# -- 4. same randomness in both passes ----------------------------------------------------------
def _dropout_run(same_rng, seed=3):
    x, y = _data(32)
    model = _mlp(dropout=0.5)
    masks = []
    model[2].register_forward_hook(lambda m, i, o: masks.append(o == 0))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    torch.manual_seed(seed)
    opt.step(closure, same_rng=same_rng)
    return model, masks, torch.random.get_rng_state()


def test_same_rng_gives_both_passes_the_same_dropout_mask():
    model, masks, rng_after = _dropout_run(same_rng=True)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    # The generator ends where one pass leaves it.
    drop = nn.Dropout(0.5)
    torch.manual_seed(3)
    drop(torch.ones(32, 7, dtype=torch.float64))
    assert torch.equal(rng_after, torch.random.get_rng_state())
    # Reference: the two passes by hand, each started from the same seed.
    x, y = _data(32)
    ref = _mlp(dropout=0.5)
    opt = SAM(ref.parameters(), torch.optim.SGD, rho=0.1, lr=0.2)
    torch.manual_seed(3)
    F.cross_entropy(ref(x), y).backward()
    opt.first_step(zero_grad=True)
    torch.manual_seed(3)
    F.cross_entropy(ref(x), y).backward()
    opt.second_step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_without_same_rng_the_masks_differ():
    model_a, masks, _ = _dropout_run(same_rng=False)
    assert len(masks) == 2 and not torch.equal(masks[0], masks[1])
    model_b, _, _ = _dropout_run(same_rng=True)
    diff = max((p - q).abs().max() for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert diff > 1e-6


# -- 5. rho schedules -----------------------------------------------------------------------------
def test_proportional_rho_follows_warmup_and_cosine():
    lr_max, warm, total, rho_max, rho_min = 0.2, 3, 12, 0.1, 0.01

    def lr_at(t):  # closed form of the schedule below
        if t < warm:
            return lr_max * (t + 1) / warm
        return lr_max * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))

    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho_max, lr=lr_max)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_at(t) / lr_max)
    rho_sched = ProportionalRho(opt, rho_min=rho_min)  # rho_max, lr_max: from the groups
    assert rho_sched.rho_max == [rho_max] and rho_sched.lr_max == [lr_max]
    for t in range(total):
        expected = rho_min + (rho_max - rho_min) * lr_at(t) / lr_max
        assert opt.param_groups[0]["rho"] == pytest.approx(expected, abs=1e-12)
        assert rho_sched.get_last_rho() == [opt.param_groups[0]["rho"]]
        # SAM really uses it: ‖ε̂‖₂ = rho_t.
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.first_step()
        moved = [(p.detach() - b) ** 2 for p, b in zip(model.parameters(), before)]
        step = torch.sqrt(sum(m.sum() for m in moved))
        assert float(step) == pytest.approx(expected, rel=1e-9)
        opt.second_step()
        lr_sched.step()
        rho_sched.step()


def test_proportional_rho_per_group_and_state_dict():
    model = _mlp()
    opt = SAM(
        [
            {"params": model[0].parameters(), "lr": 0.1, "rho": 0.05},
            {"params": model[3].parameters(), "lr": 0.4, "rho": 0.2},
        ],
        torch.optim.SGD,
        lr=0.1,
    )
    sched = ProportionalRho(opt, lr_min=[0.0, 0.1])
    assert [g["rho"] for g in opt.param_groups] == [0.05, 0.2]
    for g in opt.param_groups:
        g["lr"] /= 2
    sched.step()
    assert opt.param_groups[0]["rho"] == pytest.approx(0.025)
    assert opt.param_groups[1]["rho"] == pytest.approx(0.2 * (0.2 - 0.1) / 0.3)
    # Below lr_min the radius is clamped, never negative.
    opt.param_groups[1]["lr"] = 0.0
    sched.step()
    assert opt.param_groups[1]["rho"] == 0.0
    other = ProportionalRho(opt, rho_max=1.0, lr_max=1.0)
    other.load_state_dict(sched.state_dict())
    assert other.state_dict() == sched.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rho_min": -0.1}, ValueError, "Invalid rho_min: -0.1"),
        ({"lr_max": [0.1, 0.2]}, ValueError, "2 values for 1 param groups"),
        ({"lr_max": 0.0}, ValueError, "equals lr_min"),
        ({"rho_max": "x"}, TypeError, "Invalid rho_max"),
    ],
)
def test_proportional_rho_errors(kwargs, exc, match):
    opt = SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(exc, match=match):
        ProportionalRho(opt, **kwargs)


def test_proportional_rho_needs_sam_groups():
    with pytest.raises(TypeError, match="no 'rho'"):
        ProportionalRho(torch.optim.SGD(_mlp().parameters(), lr=0.1))


# -- 6. second-order SAM ------------------------------------------------------------------------
def _sam_objective_grad(model, x, y, *, rho, p=2.0, adaptive=False, eta=0.01):
    """∇_w L(w + ε(w)) by autograd straight through ε(w) (ε written out, float64)."""
    names = [n for n, _ in model.named_parameters()]
    w = {n: t.detach().clone().requires_grad_(True) for n, t in model.named_parameters()}

    def loss_of(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    g = torch.autograd.grad(loss_of(w), [w[n] for n in names], create_graph=True)
    t = [w[n].abs() + eta if adaptive else torch.ones_like(w[n]) for n in names]
    h = [ti * gi for ti, gi in zip(t, g)]
    q = p / (p - 1)
    norm_p = sum((hi.abs() ** q).sum() for hi in h) ** (1 / p)
    eps = [ti * rho * hi.sign() * hi.abs() ** (q - 1) / norm_p for ti, hi in zip(t, h)]
    w_adv = {n: w[n] + e for n, e in zip(names, eps)}
    grads = torch.autograd.grad(loss_of(w_adv), [w[n] for n in names])
    return dict(zip(names, grads))


@pytest.mark.parametrize(
    "kw", [{}, {"adaptive": True}, {"p": 3.0}, {"p": 3.0, "adaptive": True, "eta": 0.1}]
)
def test_second_order_step_is_the_exact_gradient_of_the_sam_objective(kw):
    x, y = _data(12)
    model = _mlp()
    ref = _sam_objective_grad(model, x, y, rho=0.3, **kw)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=1.0, eps=0.0, **kw)
    loss = second_order_step(opt, lambda: F.cross_entropy(model(x), y))
    assert loss == pytest.approx(float(F.cross_entropy(_mlp()(x), y)), abs=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), ref[n], atol=1e-10, rtol=1e-8)
    # The second-order term matters here: first-order SAM is farther away than the tolerance.
    first = _mlp()
    o1 = SAM(first.parameters(), torch.optim.SGD, rho=0.3, lr=1.0, eps=0.0, **kw)

    def closure():
        o1.zero_grad()
        loss = F.cross_entropy(first(x), y)
        loss.backward()
        return loss

    o1.step(closure)
    gap = max((before[n] - p.detach() - ref[n]).abs().max() for n, p in first.named_parameters())
    assert gap > 1e-4


def test_second_order_step_errors_and_frozen_params():
    x, y = _data(12)
    model = _mlp()
    model[0].bias.requires_grad_(False)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=1.0)
    bias = model[0].bias.detach().clone()
    second_order_step(opt, lambda: F.cross_entropy(model(x), y))
    assert torch.equal(model[0].bias, bias)
    with pytest.raises(RuntimeError, match="scalar loss"):
        second_order_step(opt, lambda: torch.ones(()))
    assert not opt.perturbed
    with pytest.raises(TypeError, match=r"expected flatmin\.SAM"):
        second_order_step(torch.optim.SGD(model.parameters(), lr=0.1), lambda: torch.ones(()))


@pytest.mark.parametrize(
    ("cls", "kw"), [(FriendlySAM, {"sigma": 1.0}), (FriendlySAM, {"sigma": 0.0}), (GCSAM, {})]
)
def test_second_order_step_refuses_members_that_ascend_along_a_transformed_gradient(cls, kw):
    # ε̂ is ρ φ(g − σ m) (FriendlySAM) or ρ φ(Φ(g)) (GCSAM): the term second_order_step adds is
    # the derivative of ρ φ(g), so it would be the wrong one. Refused by class, before any pass.
    x, y = _data(12)
    model = _mlp()
    opt = cls(model.parameters(), torch.optim.SGD, rho=0.3, lr=1.0, **kw)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def compute_loss():
        calls.append(1)
        return F.cross_entropy(model(x), y)

    with pytest.raises(TypeError, match=rf"Invalid optimizer: {cls.__name__} ascends along a "):
        second_order_step(opt, compute_loss)
    assert not calls and not opt.perturbed
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_mid_step_calls_name_the_entry_point_and_change_nothing():
    x, y = _data(12, dtype=torch.float32)
    model = _mlp(torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=1.0)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    perturbed = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def never():
        raise AssertionError("no pass may run")

    for call, name in [
        (lambda: opt.step(never), r"step\(closure\)"),
        (lambda: sam_step_amp(opt, scaler, never), r"sam_step_amp\(\)"),
        (lambda: second_order_step(opt, never), r"second_order_step\(\)"),
    ]:
        with pytest.raises(RuntimeError, match=rf"^{name} called between first_step\(\) and "):
            call()
        assert opt.perturbed
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed))
    assert scaler.get_scale() == 2.0**8


# -- 7. trainers ----------------------------------------------------------------------------------
def _closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.slow
def test_torch_compile_model_with_sam():
    x, y = _data(16, dtype=torch.float32)
    eager = _mlp(torch.float32)
    compiled_base = _mlp(torch.float32)
    # aot_eager traces with Dynamo + AOTAutograd like inductor but skips C++ codegen (CPU CI time).
    compiled = torch.compile(compiled_base, backend="aot_eager")
    o1 = SAM(eager.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    o2 = SAM(compiled.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(3):
        l1 = o1.step(_closure_for(eager, o1, x, y))
        l2 = o2.step(_closure_for(compiled, o2, x, y))
        torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    for p, q in zip(eager.parameters(), compiled_base.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


def test_lightning_automatic_optimization_with_sam():
    pl = pytest.importorskip("lightning.pytorch")
    x, y = _data(24)
    batches = list(zip(x.split(8), y.split(8)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return SAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.3, momentum=0.9)

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            # Extra step() options pass through Lightning (but not ``model=``, which it consumes).
            optimizer.step(closure=optimizer_closure, same_rng=True)

    module = Module()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 6

    ref = _mlp()
    opt = SAM(ref.parameters(), torch.optim.SGD, rho=0.1, lr=0.3, momentum=0.9)
    for _ in range(2):
        for xb, yb in batches:
            opt.step(_closure_for(ref, opt, xb, yb))
    for p, q in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)


def test_proportional_rho_load_state_dict_is_all_or_nothing():
    opt = SAM(_mlp().parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    sched = ProportionalRho(opt, rho_min=0.01)
    before = sched.state_dict()
    bad = {**before, "rho_max": [0.2], "lr_min": [-1.0]}
    with pytest.raises(ValueError, match=r"Invalid lr_min: -1\.0"):
        sched.load_state_dict(bad)
    assert sched.state_dict() == before
    with pytest.raises(ValueError, match="missing"):
        sched.load_state_dict({"rho_max": [0.2]})
