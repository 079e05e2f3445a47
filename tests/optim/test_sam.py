"""SAM core: closed forms, degenerate equivalences, kernels, checkpoints, errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import flatmin
from flatmin import SAM

# ---------------------------------------------------------------------------------------------
# Closed form on the quadratic L(w) = ½ wᵀ A w (gradient A w), written out in numpy float64.


def _quadratic(seed: int = 0, n: int = 5):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    a = m @ m.T + n * np.eye(n)
    w = rng.normal(size=n)
    return a, w


def _expected_eps(g, w, rho, p, adaptive, eta):
    t = np.abs(w) + eta if adaptive else np.ones_like(w)
    h = t * g
    if math.isinf(p):
        e = rho * np.sign(h)
    else:
        q = p / (p - 1)
        e = rho * np.sign(h) * np.abs(h) ** (q - 1) / (np.sum(np.abs(h) ** q)) ** (1 / p)
    return t * e


@pytest.mark.parametrize(
    ("p", "adaptive"),
    [
        (2, False),
        (math.inf, False),
        (3, False),
        (1.5, False),
        (2, True),
        (math.inf, True),
        (3, True),
    ],
)
@pytest.mark.parametrize("foreach", [False, True])
def test_one_step_equals_closed_form_on_quadratic(p, adaptive, foreach):
    a, w0 = _quadratic()
    lr, rho, eta = 0.1, 0.3, 0.05
    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    at = torch.tensor(a)
    opt = SAM(
        [w], torch.optim.SGD, rho=rho, p=p, adaptive=adaptive, eta=eta, lr=lr, foreach=foreach
    )

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ at @ w
        loss.backward()
        return loss

    loss = opt.step(closure)

    g = a @ w0
    eps = _expected_eps(g, w0, rho, p, adaptive, eta)
    g_sam = a @ (w0 + eps)
    expected = w0 - lr * g_sam
    np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(0.5 * w0 @ a @ w0, rel=1e-14)


def test_p2_perturbation_has_norm_rho_and_ptwo_asam_formula():
    a, w0 = _quadratic(1)
    w = nn.Parameter(torch.tensor(w0))
    opt = SAM([w], torch.optim.SGD, rho=0.2, adaptive=True, eta=0.1, lr=0.1)
    (0.5 * w @ torch.tensor(a) @ w).backward()
    opt.first_step()
    g = a @ w0
    t = np.abs(w0) + 0.1
    # ASAM p = 2: ε = ρ T² g / ‖T g‖₂ (Kwon et al. 2021)
    expected = 0.2 * t**2 * g / np.linalg.norm(t * g)
    np.testing.assert_allclose(w.detach().numpy() - w0, expected, rtol=1e-10)
    opt.restore()
    assert torch.equal(w.detach(), torch.tensor(w0))


def test_norm_spans_all_param_groups():
    w1 = nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    w2 = nn.Parameter(torch.tensor([4.0], dtype=torch.float64))
    opt = SAM([{"params": [w1]}, {"params": [w2]}], torch.optim.SGD, rho=1.0, lr=0.0)
    ((w1**2).sum() / 2 + (w2**2).sum() / 2).backward()  # g = (3, 4), ‖g‖ = 5
    opt.first_step()
    torch.testing.assert_close(w1.detach(), torch.tensor([3.0 + 0.6], dtype=torch.float64))
    torch.testing.assert_close(w2.detach(), torch.tensor([4.0 + 0.8], dtype=torch.float64))


def test_per_group_rho_scales_the_shared_direction():
    w1 = nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    w2 = nn.Parameter(torch.tensor([4.0], dtype=torch.float64))
    opt = SAM(
        [{"params": [w1], "rho": 2.0}, {"params": [w2], "rho": 0.0}],
        torch.optim.SGD,
        rho=1.0,
        lr=0.0,
    )
    ((w1**2).sum() / 2 + (w2**2).sum() / 2).backward()
    opt.first_step()
    torch.testing.assert_close(w1.detach(), torch.tensor([3.0 + 1.2], dtype=torch.float64))
    assert w2.item() == 4.0


# ---------------------------------------------------------------------------------------------
# Degenerate equivalences.


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(seed=1, n=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


BASES = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
]


@pytest.mark.parametrize(("base", "kwargs"), BASES)
def test_rho_zero_reproduces_base_trajectory_exactly(base, kwargs):
    m_ref, m_sam = _mlp(), _mlp()
    x, y = _data()
    ref = base(m_ref.parameters(), **kwargs)
    sam = SAM(m_sam.parameters(), base, rho=0.0, **kwargs)
    for _ in range(6):
        ref.zero_grad()
        nn.functional.cross_entropy(m_ref(x), y).backward()
        ref.step()

        def closure():
            sam.zero_grad()
            loss = nn.functional.cross_entropy(m_sam(x), y)
            loss.backward()
            return loss

        sam.step(closure)
    for a, b in zip(m_ref.parameters(), m_sam.parameters()):
        assert torch.equal(a, b)


def _manual_sam_steps(model, opt, x, y, steps):
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


def test_step_closure_equals_first_and_second_step_by_hand():
    m1, m2 = _mlp(), _mlp()
    x, y = _data()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    _manual_sam_steps(m1, o1, x, y, 4)
    losses = []
    for _ in range(4):

        def closure():
            o2.zero_grad()
            loss = nn.functional.cross_entropy(m2(x), y)
            loss.backward()
            return loss

        losses.append(o2.step(closure).item())
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    # The closure's first call is the loss at w, before the step.
    m3 = _mlp()
    assert losses[0] == nn.functional.cross_entropy(m3(x), y).item()


def test_class_and_instance_construction_are_equivalent():
    m1, m2 = _mlp(), _mlp()
    x, y = _data()
    o1 = SAM(m1.parameters(), torch.optim.Adam, rho=0.05, lr=1e-2, betas=(0.8, 0.9))
    base = torch.optim.Adam(m2.parameters(), lr=1e-2, betas=(0.8, 0.9))
    o2 = SAM(None, base, rho=0.05)
    assert o2.param_groups is base.param_groups
    assert o1.param_groups is o1.base_optimizer.param_groups
    _manual_sam_steps(m1, o1, x, y, 3)
    _manual_sam_steps(m2, o2, x, y, 3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_add_param_group_reaches_base_with_its_defaults():
    m = _mlp()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": [extra], "rho": 0.2})
    assert opt.base_optimizer.param_groups[-1]["params"] == [extra]
    assert opt.param_groups[-1]["momentum"] == 0.9
    assert opt.param_groups[-1]["lr"] == 0.1
    assert opt.param_groups[-1]["rho"] == 0.2
    with pytest.raises(ValueError, match="Invalid rho: -1"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "rho": -1.0})


# ---------------------------------------------------------------------------------------------
# foreach ≡ single-tensor reference.


class _Odd(nn.Module):
    """Two param groups' worth of tensors, one non-contiguous, one without gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Parameter(torch.randn(5, 6, dtype=torch.float64).t())  # non-contiguous
        self.b = nn.Parameter(torch.randn(5, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
        self.unused = nn.Parameter(torch.randn(7, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.randn(4, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        return torch.tanh(x @ self.a + self.b) @ self.c + self.frozen


@pytest.mark.parametrize(
    "settings",
    [
        {"p": 2, "adaptive": False},
        {"p": 2, "adaptive": True},
        {"p": math.inf, "adaptive": False},
        {"p": 3, "adaptive": True},
        {"p": 1.5, "adaptive": False},
    ],
)
def test_foreach_matches_single_tensor_reference_in_float64(settings):
    models = [_Odd(), _Odd()]
    assert not models[0].a.is_contiguous()
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    opts = []
    for model, foreach in zip(models, (False, True)):
        groups = [
            {"params": [model.a, model.unused], "rho": 0.07},
            {"params": [model.b, model.c, model.frozen], "rho": 0.2, "adaptive": False},
        ]
        opts.append(
            SAM(groups, torch.optim.SGD, lr=0.05, momentum=0.9, foreach=foreach, **settings)
        )
    for _ in range(3):
        for model, opt in zip(models, opts):
            model(x).square().mean().backward()
            opt.first_step(zero_grad=True)
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        for model, opt in zip(models, opts):
            model(x).square().mean().backward()
            opt.second_step(zero_grad=True)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert torch.equal(models[0].unused, _Odd().unused)  # no gradient: never moved


def test_mixed_p_groups_are_separate_balls():
    w1 = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    w2 = nn.Parameter(torch.tensor([-2.0, 0.5], dtype=torch.float64))
    opt = SAM([{"params": [w1]}, {"params": [w2], "p": math.inf}], torch.optim.SGD, rho=1.0, lr=0)
    ((w1**2).sum() / 2 + (w2**2).sum() / 2).backward()
    opt.first_step()
    torch.testing.assert_close(w1.detach(), torch.tensor([3.6, 4.8], dtype=torch.float64))
    torch.testing.assert_close(w2.detach(), torch.tensor([-3.0, 1.5], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Restore, robustness.


def test_restore_is_bit_exact_and_covers_tensors_without_second_grad():
    model = _Odd()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    model(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(model.a, before["a"])
    # The second pass gives no gradient to `a` at all: it must still be restored.
    model.c.sum().backward()
    opt.second_step()
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", ["none", "zero"])
def test_no_gradient_or_zero_gradient_is_the_base_step(kind, foreach):
    m_ref, m_sam = _mlp(), _mlp()
    ref = torch.optim.SGD(m_ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    sam = SAM(
        m_sam.parameters(),
        torch.optim.SGD,
        rho=0.1,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.01,
        foreach=foreach,
    )
    for _ in range(2):
        for model in (m_ref, m_sam):
            for w in model.parameters():
                w.grad = torch.zeros_like(w) if kind == "zero" else None
        sam.first_step()
        sam.second_step()
        ref.step()
    for a, b in zip(m_ref.parameters(), m_sam.parameters()):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)


def test_all_frozen_model_does_not_crash():
    model = _mlp()
    for w in model.parameters():
        w.requires_grad_(False)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt.first_step()
    opt.second_step()
    for a, b in zip(model.parameters(), _mlp().parameters()):
        assert torch.equal(a, b)


def test_sparse_gradient_raises():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()


def test_error_in_second_pass_restores_weights():
    model = _mlp()
    before = [w.detach().clone() for w in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = _data()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("boom")
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError):
        opt.step(closure)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_closure_runs_under_enable_grad():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        opt.step(closure)


# ---------------------------------------------------------------------------------------------
# state_dict, schedulers.


@pytest.mark.parametrize(
    ("base", "kwargs"),
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 1e-2})],
)
def test_state_dict_resume_continues_in_lockstep(base, kwargs, tmp_path):
    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), base, rho=0.05, **kwargs)
    _manual_sam_steps(model, opt, x, y, 5)
    sd = opt.state_dict()
    assert sd["base"]["state"], "the base optimizer's state (momentum / moments) must be saved"
    torch.save({"model": model.state_dict(), "opt": sd}, tmp_path / "ckpt.pt")

    fresh = _mlp(seed=42)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = SAM(fresh.parameters(), base, rho=0.3, **{**kwargs, "lr": 123.0})
    fresh_opt.load_state_dict(ckpt["opt"])
    assert fresh_opt.param_groups is fresh_opt.base_optimizer.param_groups
    assert fresh_opt.param_groups[0]["rho"] == 0.05
    assert fresh_opt.param_groups[0]["lr"] == kwargs["lr"]

    _manual_sam_steps(model, opt, x, y, 5)
    _manual_sam_steps(fresh, fresh_opt, x, y, 5)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_lr_scheduler_on_sam_drives_the_base_optimizer():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    _manual_sam_steps(model, opt, x, y, 1)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    # The base step really uses the scheduled rate: compare one step with plain SGD at lr 0.5.
    ref_model = copy.deepcopy(model)
    ref = SAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.5)
    _manual_sam_steps(model, opt, x, y, 1)
    _manual_sam_steps(ref_model, ref, x, y, 1)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_rho_in_param_groups_can_be_scheduled():
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = SAM([w], torch.optim.SGD, rho=1.0, lr=0.0)
    opt.param_groups[0]["rho"] = 0.5
    (w.square().sum() / 2).backward()
    opt.first_step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.3, 4.4], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Errors: (kwargs, exception, message regex).

_P = [nn.Parameter(torch.ones(2))]

ERRORS = [
    ({"rho": -0.1}, ValueError, r"Invalid rho: -0\.1"),
    ({"rho": float("nan")}, ValueError, r"Invalid rho: nan"),
    ({"rho": float("inf")}, ValueError, r"Invalid rho: inf"),
    ({"rho": "0.05"}, TypeError, r"Invalid rho: '0\.05'"),
    ({"rho": True}, TypeError, r"Invalid rho: True"),
    ({"p": 1}, ValueError, r"Invalid p: 1"),
    ({"p": 0.5}, ValueError, r"Invalid p: 0\.5"),
    ({"p": -2}, ValueError, r"Invalid p: -2"),
    ({"p": float("nan")}, ValueError, r"Invalid p: nan"),
    ({"p": "2"}, TypeError, r"Invalid p: '2'"),
    ({"eta": -0.01}, ValueError, r"Invalid eta: -0\.01"),
    ({"eta": float("inf")}, ValueError, r"Invalid eta: inf"),
    ({"adaptive": 1}, TypeError, r"Invalid adaptive: 1"),
    ({"eps": -1.0}, ValueError, r"Invalid eps: -1\.0"),
    ({"foreach": "yes"}, TypeError, r"Invalid foreach: 'yes'"),
    ({"lr": -1.0}, ValueError, r"Invalid learning rate: -1\.0"),  # the base class validates
    ({"momentum": -0.5}, ValueError, r"Invalid momentum value: -0\.5"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), ERRORS)
def test_bad_options_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SAM(_P, torch.optim.SGD, **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize("base", [torch.nn.Linear, "SGD", 3, None, torch.optim.lr_scheduler.StepLR])
def test_base_optimizer_neither_class_nor_instance(base):
    with pytest.raises(TypeError, match="Invalid base_optimizer"):
        SAM(_P, base, lr=0.1)


def test_instance_with_base_kwargs_raises():
    base = torch.optim.SGD(_P, lr=0.1)
    with pytest.raises(TypeError, match=r"\['momentum'\]"):
        SAM(None, base, momentum=0.9)


def test_protocol_misuse_raises():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="requires a closure"):
        opt.step()
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        opt.state_dict()
    opt.second_step()
    with pytest.raises(ValueError, match="Invalid SAM state_dict"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_top_level_reexport():
    assert flatmin.SAM is SAM


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("zero_grad", [True, False])
def test_accelerator_kernel_paths_match_reference(monkeypatch, fused, zero_grad):
    """The non-fused paths (taken on accelerators) agree with the reference on CPU in float64.

    With ``zero_grad=False`` the gradients must survive first_step untouched; with ``True`` the
    accelerator path may use them as scratch space.
    """
    from flatmin.optim import _vec as _perturb

    monkeypatch.setattr(_perturb, "_fused_addcmul", lambda device: fused)
    models = [_Odd(), _Odd()]
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    opts = [
        SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, foreach=f)
        for m, f in zip(models, (False, True))
    ]
    for model, opt in zip(models, opts):
        model(x).square().mean().backward()
        grads = [w.grad.clone() for w in model.parameters() if w.grad is not None]
        opt.first_step(zero_grad=zero_grad)
        if not zero_grad:
            after = [w.grad for w in model.parameters() if w.grad is not None]
            for a, b in zip(grads, after):
                assert torch.equal(a, b)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
