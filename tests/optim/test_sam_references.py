"""Every variant against its paper's (or official code's) update, written out in float64.

The references below use plain loops over the parameters, gradients from ``torch.func`` and the
base optimizer written by hand (SGD with momentum and weight decay as torch defines it); nothing
of flatmin's kernels. The references carry the ``+ 1e-12`` guard of their normalisers
(as the official codes do), so what is left is the order of float64 sums: 1e-13 relative.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

import flatmin
from flatmin.optim.rho_schedule import ProportionalRho
from flatmin.optim.rules import Fisher, sam_on
from flatmin.optim.second_order import second_order_step

F = nn.functional
DT = torch.float64
LR, MOM, WD = 0.1, 0.9, 1e-3


def _mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 3)]
    model = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.7)
    return model


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g))
        for _ in range(n)
    ]


class Ref:
    """The model as a function of a list of tensors, and SGD(momentum, weight decay) by hand."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model)
        self.names = [n for n, _ in model.named_parameters()]
        self.w = [p.detach().clone() for p in model.parameters()]
        self.buf: list[torch.Tensor] | None = None

    def grad(self, w: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        def loss(ws: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(functional_call(self.model, ws, (x,)), y)

        g = torch.func.grad(loss)(dict(zip(self.names, w)))
        return [g[n] for n in self.names]

    def sgd(self, d: list[torch.Tensor], lr: float = LR) -> None:
        d = [di + WD * wi for di, wi in zip(d, self.w)]
        if self.buf is None:
            self.buf = [di.clone() for di in d]
        else:
            self.buf = [MOM * b + di for b, di in zip(self.buf, d)]
        self.w = [wi - lr * b for wi, b in zip(self.w, self.buf)]


def _norm(v: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in v))


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((s * t).sum() for s, t in zip(a, b))


def _add(a: list[torch.Tensor], b: list[torch.Tensor], c: float | torch.Tensor = 1.0) -> list:
    return [s + c * t for s, t in zip(a, b)]


def _run(opt: flatmin.SAM, model: nn.Module, batches: list) -> None:
    for x, y in batches:

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _close(model: nn.Module, ref: Ref, tol: float) -> None:
    for p, w in zip(model.parameters(), ref.w):
        torch.testing.assert_close(p.detach(), w, rtol=tol, atol=tol)


def _sam_eps(g: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    # ρ g / (‖g‖ + 1e-12): the guard of davda54/sam, F-SAM, MSAM, WSAM, GSAM and flatmin alike.
    n = _norm(g) + 1e-12
    return [rho * t / n for t in g]


# -- SAM: davda54/sam's update (the reference most users come from) -------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_davda54_sam_over_50_float64_steps(adaptive: bool) -> None:
    """davda54/sam: e_w = (w² if adaptive else 1)·g·ρ/‖(|w| if adaptive else 1)·g‖, then base step.

    Its ASAM uses T = |w| (η = 0), so flatmin is built with ``eta=0``.
    """
    model, batches, rho = _mlp(), _batches(50), 0.3
    ref = Ref(model)
    for x, y in batches:
        g = ref.grad(ref.w, x, y)
        t = [w.abs() if adaptive else torch.ones_like(w) for w in ref.w]
        norm = _norm([ti * gi for ti, gi in zip(t, g)]) + 1e-12
        e = [ti * ti * gi * rho / norm for ti, gi in zip(t, g)]
        ref.sgd(ref.grad(_add(ref.w, e), x, y))
    opt = flatmin.SAM(model.parameters(), torch.optim.SGD, rho, adaptive=adaptive, eta=0.0,
                      lr=LR, momentum=MOM, weight_decay=WD)  # fmt: skip
    _run(opt, model, batches)
    _close(model, ref, 1e-13)


# -- GSAM -----------------------------------------------------------------------------------------
def test_gsam_equals_the_paper_update() -> None:
    """Zhuang et al. 2022, Alg. 1: descend along g_s − α g_⊥, g_⊥ = g − (g·g_s/‖g_s‖²) g_s."""
    model, batches, rho, alpha = _mlp(), _batches(8), 0.2, 0.3
    ref = Ref(model)
    for x, y in batches:
        g = ref.grad(ref.w, x, y)
        g_s = ref.grad(_add(ref.w, _sam_eps(g, rho)), x, y)
        g_perp = _add(g, g_s, -_dot(g, g_s) / (_dot(g_s, g_s) + 1e-12))
        ref.sgd(_add(g_s, g_perp, -alpha))
    opt = flatmin.GSAM(model.parameters(), torch.optim.SGD, rho, alpha=alpha, lr=LR, momentum=MOM,
                       weight_decay=WD)  # fmt: skip
    _run(opt, model, batches)
    _close(model, ref, 1e-13)


def test_gsam_with_proportional_rho_follows_the_learning_rate() -> None:
    """GSAM's ρ_t = ρ_min + (ρ_max − ρ_min)(lr_t − lr_min)/(lr_max − lr_min) under a cosine LR."""
    model, batches, alpha = _mlp(), _batches(6), 0.2
    rho_max, rho_min = 0.3, 0.05
    lrs = [LR * 0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
    ref = Ref(model)
    for (x, y), lr in zip(batches, lrs):
        rho = rho_min + (rho_max - rho_min) * lr / LR
        g = ref.grad(ref.w, x, y)
        g_s = ref.grad(_add(ref.w, _sam_eps(g, rho)), x, y)
        g_perp = _add(g, g_s, -_dot(g, g_s) / (_dot(g_s, g_s) + 1e-12))
        ref.sgd(_add(g_s, g_perp, -alpha), lr=lr)
    opt = flatmin.GSAM(model.parameters(), torch.optim.SGD, rho_max, alpha=alpha, lr=LR,
                       momentum=MOM, weight_decay=WD)  # fmt: skip
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    rho_sched = ProportionalRho(opt, rho_min=rho_min)
    for batch in batches:
        _run(opt, model, [batch])
        lr_sched.step()
        rho_sched.step()
    _close(model, ref, 1e-13)


# -- WSAM -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_equals_the_paper_update(decouple: bool) -> None:
    """Yue et al. 2023, Alg. 1: a = γ/(1−γ); decoupled: base(w, g) − lr·a·(g_s − g)."""
    model, batches, rho, gamma = _mlp(), _batches(8), 0.2, 0.8
    a = gamma / (1 - gamma)
    ref = Ref(model)
    for x, y in batches:
        g = ref.grad(ref.w, x, y)
        g_s = ref.grad(_add(ref.w, _sam_eps(g, rho)), x, y)
        if decouple:
            ref.sgd(g)
            ref.w = _add(ref.w, _add(g_s, g, -1.0), -LR * a)
        else:
            ref.sgd([a * s + (1 - a) * t for s, t in zip(g_s, g)])
    opt = flatmin.WSAM(model.parameters(), torch.optim.SGD, rho, gamma=gamma, decouple=decouple,
                       lr=LR, momentum=MOM, weight_decay=WD)  # fmt: skip
    _run(opt, model, batches)
    _close(model, ref, 1e-13)


def test_wsam_agrees_with_pytorch_optimizer() -> None:
    """A second, independent implementation (its norm is accumulated in float32: 1e-6)."""
    po = pytest.importorskip("pytorch_optimizer")
    model, batches = _mlp(), _batches(6)
    twin = copy.deepcopy(model)
    theirs = po.WSAM(twin, twin.parameters(), torch.optim.SGD, rho=0.2, gamma=0.8, lr=LR,
                     momentum=MOM, weight_decay=WD)  # fmt: skip
    ours = flatmin.WSAM(model.parameters(), torch.optim.SGD, 0.2, gamma=0.8, lr=LR,
                        momentum=MOM, weight_decay=WD)  # fmt: skip
    _run(ours, model, batches)
    _run(theirs, twin, batches)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- FriendlySAM ----------------------------------------------------------------------------------
def test_friendly_sam_equals_the_official_code() -> None:
    """Li et al. 2024 (nblt/F-SAM): m = g at first; else d = g − σm, m ← λm + (1−λ)g (plain g)."""
    model, batches, rho, sigma, lmbda = _mlp(), _batches(8), 0.2, 1.0, 0.6
    ref = Ref(model)
    m: list[torch.Tensor] | None = None
    for x, y in batches:
        g = ref.grad(ref.w, x, y)
        if m is None:
            m, d = [t.clone() for t in g], g
        else:
            d = [t - sigma * mi for t, mi in zip(g, m)]
            m = [mi * lmbda + t * (1 - lmbda) for mi, t in zip(m, g)]
        ref.sgd(ref.grad(_add(ref.w, _sam_eps(d, rho)), x, y))
    opt = flatmin.FriendlySAM(model.parameters(), torch.optim.SGD, rho, sigma=sigma, lmbda=lmbda,
                              lr=LR, momentum=MOM, weight_decay=WD)  # fmt: skip
    _run(opt, model, batches)
    _close(model, ref, 1e-13)
    for p, mi in zip(model.parameters(), m):  # the EMA is of the plain gradients
        torch.testing.assert_close(opt.state[p]["fsam_momentum"], mi, rtol=1e-11, atol=1e-12)


# -- GCSAM ----------------------------------------------------------------------------------------
def _gc(v: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for t in v:
        if t.dim() > 1:
            mean = t.reshape(t.shape[0], -1).mean(dim=1)
            t = t - mean.reshape(-1, *([1] * (t.dim() - 1)))
        out.append(t)
    return out


@pytest.mark.parametrize("descent", [True, False])
def test_gcsam_equals_the_paper_update(descent: bool) -> None:
    """Hassan et al. 2025: ε̂ = ρ Φ(g)/‖Φ(g)‖, w ← base(w, Φ(g_s)) (Φ: Yong et al.'s GC)."""
    model, batches, rho = _mlp(), _batches(8), 0.2
    ref = Ref(model)
    for x, y in batches:
        g = _gc(ref.grad(ref.w, x, y))
        g_s = ref.grad(_add(ref.w, _sam_eps(g, rho)), x, y)
        ref.sgd(_gc(g_s) if descent else g_s)
    opt = flatmin.GCSAM(model.parameters(), torch.optim.SGD, rho, descent=descent, lr=LR,
                        momentum=MOM, weight_decay=WD)  # fmt: skip
    _run(opt, model, batches)
    _close(model, ref, 1e-13)


# -- Momentum-SAM ---------------------------------------------------------------------------------
def test_momentum_sam_equals_the_official_sgd_code() -> None:
    """Becker et al. 2024 (MarlonBecker/MSAM, SGD): w̃ = w − ρ v/‖v‖, v ← μv + g(w̃), w −= lr v.

    The official code starts from v = 0 (no perturbation in the first step) and takes weight
    decay at w̃; with ``weight_decay=0`` the two places agree.
    """
    model, batches, rho = _mlp(), _batches(8), 0.3
    ref = Ref(model)
    v = [torch.zeros_like(w) for w in ref.w]
    for x, y in batches:
        n = _norm(v)
        w_tilde = ref.w if float(n) == 0 else _add(ref.w, v, -rho / (n + 1e-12))
        v = [MOM * vi + gi for vi, gi in zip(v, ref.grad(w_tilde, x, y))]
        ref.w = _add(ref.w, v, -LR)
    opt = flatmin.MomentumSAM(model.parameters(), torch.optim.SGD, rho, lr=LR, momentum=MOM)
    _run(opt, model, batches)
    _close(model, ref, 1e-13)


def test_momentum_sam_with_adamw_perturbs_along_exp_avg() -> None:
    """The official AdamW-MSAM: w̃ = w − ρ m/‖m‖ with m Adam's first moment (weight decay 0)."""
    model, batches, rho = _mlp(), _batches(6), 0.5
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-2
    ref = Ref(model)
    m = [torch.zeros_like(w) for w in ref.w]
    s = [torch.zeros_like(w) for w in ref.w]
    for t, (x, y) in enumerate(batches, start=1):
        n = _norm(m)
        w_tilde = ref.w if float(n) == 0 else _add(ref.w, m, -rho / (n + 1e-12))
        g = ref.grad(w_tilde, x, y)
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        s = [b2 * si + (1 - b2) * gi * gi for si, gi in zip(s, g)]
        ref.w = [
            wi - lr / (1 - b1**t) * mi / ((si / (1 - b2**t)).sqrt() + eps)
            for wi, mi, si in zip(ref.w, m, s)
        ]
    opt = flatmin.MomentumSAM(model.parameters(), torch.optim.AdamW, rho, lr=lr, weight_decay=0.0)
    _run(opt, model, batches)
    _close(model, ref, 1e-13)


def test_momentum_sam_leaves_unperturbed_weights_for_evaluation_and_averaging() -> None:
    model, batches = _mlp(bn=True), _batches(6)
    opt = flatmin.MomentumSAM(model.parameters(), torch.optim.SGD, 0.5, lr=LR, momentum=MOM)
    averager = flatmin.WeightAveraging(model, mode="swa", buffers="none")
    iterates = []
    seen = []
    model[0].register_forward_pre_hook(lambda m, i: seen.append(m.weight.detach().clone()))
    for x, y in batches:
        before = model[0].weight.detach().clone()
        _run(opt, model, [(x, y)])
        iterates.append([p.detach().clone() for p in model.parameters()])
        averager.update()
        assert not opt.perturbed
        # One forward per step, at w̃ ≠ w once the momentum exists; w itself moved by the step.
        assert len(seen) == len(iterates)
        if len(seen) > 1:
            assert not torch.equal(seen[-1], before)
    mean = [torch.stack(ts).mean(0) for ts in zip(*iterates)]
    avg = averager.averaged_tensors()
    for (name, _), m in zip(model.named_parameters(), mean):
        torch.testing.assert_close(avg[name], m, rtol=1e-12, atol=1e-14)


# -- multi-step ascent ----------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3])
def test_multistep_equals_optax_sam_opaque_mode(steps: int) -> None:
    """optax.contrib.sam(opt, chain(normalize(), sgd(ρ)), sync_period=steps+1, opaque_mode=True)."""
    model, batches, rho = _mlp(), _batches(6), 0.1
    ref = Ref(model)
    for x, y in batches:
        adv = ref.w
        g = ref.grad(adv, x, y)
        for _ in range(steps):
            adv = _add(adv, _sam_eps(g, rho))
            g = ref.grad(adv, x, y)
        ref.sgd(g)
    opt = flatmin.MultiStepSAM(model.parameters(), torch.optim.SGD, rho, steps=steps, lr=LR,
                               momentum=MOM, weight_decay=WD)  # fmt: skip
    _run(opt, model, batches)
    _close(model, ref, 1e-13)


# -- ESAM ------------------------------------------------------------------------------------------
def test_esam_equals_the_paper_update_with_both_swp_and_sds() -> None:
    """Du et al. 2022, Alg. 1: drawn tensors (prob. β) move by ε̂/β and step with the gradient of
    the ⌈γn⌉ samples whose loss rose most; the others keep the first-pass gradient."""
    model, batches, rho, beta, gamma = _mlp(), _batches(6), 0.2, 0.5, 0.5
    ref = Ref(model)
    draws = torch.Generator().manual_seed(7)

    def per_sample(w: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ws = dict(zip(ref.names, w))
        return F.cross_entropy(functional_call(ref.model, ws, (x,)), y, reduction="none")

    for x, y in batches:
        g = ref.grad(ref.w, x, y)
        mask = (torch.rand(len(ref.w), generator=draws) < beta).tolist()
        e = [t / beta if m else torch.zeros_like(t) for t, m in zip(_sam_eps(g, rho), mask)]
        w_adv = _add(ref.w, e)
        rise = per_sample(w_adv, x, y) - per_sample(ref.w, x, y)
        top = torch.topk(rise, math.ceil(gamma * len(y))).indices
        g_plus = ref.grad(w_adv, x[top], y[top])
        ref.sgd([gp if m else t for gp, t, m in zip(g_plus, g, mask)])
    opt = flatmin.ESAM(model.parameters(), torch.optim.SGD, rho, beta=beta, gamma=gamma,
                       generator=torch.Generator().manual_seed(7), lr=LR, momentum=MOM,
                       weight_decay=WD)  # fmt: skip
    for x, y in batches:

        def losses(index: torch.Tensor | None, x: torch.Tensor = x, y: torch.Tensor = y) -> Any:
            xb, yb = (x, y) if index is None else (x[index], y[index])
            return F.cross_entropy(model(xb), yb, reduction="none")

        opt.step(flatmin.optim.per_sample_closure(opt, losses))
    _close(model, ref, 1e-13)


# -- rules ----------------------------------------------------------------------------------------
def test_fisher_rule_equals_the_closed_form() -> None:
    """Kim et al. 2022: ε̂ = ρ f⁻¹g/√(gᵀf⁻¹g), f = 1 + η g² (diagonal empirical Fisher)."""
    model, batches, rho, eta = _mlp(), _batches(5), 0.2, 3.0
    ref = Ref(model)
    for x, y in batches:
        g = ref.grad(ref.w, x, y)
        finv = [1.0 / (1.0 + eta * t * t) for t in g]
        q = torch.sqrt(sum((fi * t * t).sum() for fi, t in zip(finv, g))) + 1e-12
        e = [rho * fi * t / q for fi, t in zip(finv, g)]
        ref.sgd(ref.grad(_add(ref.w, e), x, y))
    for foreach in (True, False):
        m = copy.deepcopy(model)
        opt = flatmin.SAM(m.parameters(), torch.optim.SGD, rho, rule=Fisher(eta), foreach=foreach,
                          lr=LR, momentum=MOM, weight_decay=WD)  # fmt: skip
        _run(opt, m, batches)
        _close(m, ref, 1e-13)


def test_sam_on_perturbs_the_normalization_layers_only() -> None:
    """Mueller et al. 2023: ε̂ = ρ g_N/‖g_N‖ on the normalization parameters N, 0 elsewhere."""
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    x, y = _batches(1)[0]
    rho = 0.2
    names = [n for n, _ in model.named_parameters()]
    norm_names = {"1.weight", "1.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = flatmin.SAM(model.parameters(), torch.optim.SGD, rho, rule=sam_on(model), lr=LR)
    F.cross_entropy(model(x), y).backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    n_norm = torch.sqrt(sum((g[n] ** 2).sum() for n in norm_names))
    opt.first_step()
    for n, p in model.named_parameters():
        moved = rho * g[n] / (n_norm + 1e-12)  # flatmin's guard against a zero norm
        expected = before[n] + moved if n in norm_names else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-13, atol=1e-15)
    assert set(names) > norm_names
    opt.second_step()


# -- second order with BatchNorm (the documented recipe) ------------------------------------------
def test_second_order_step_with_batchnorm_is_the_exact_sam_gradient() -> None:
    """∇_w L(w + ε̂(w)) by autograd through ε̂, for a BN model in train mode (batch statistics)."""
    model = _mlp(bn=True)
    x, y = _batches(1)[0]
    rho = 0.3
    ref_model = copy.deepcopy(model)
    names = [n for n, _ in ref_model.named_parameters()]
    w = {n: p.detach().clone().requires_grad_(True) for n, p in ref_model.named_parameters()}

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(ref_model, params, (x,)), y)

    g = torch.autograd.grad(loss_of(w), [w[n] for n in names], create_graph=True)
    norm = torch.sqrt(sum((t * t).sum() for t in g))
    w_adv = {n: w[n] + rho * t / norm for n, t in zip(names, g)}
    full = torch.autograd.grad(loss_of(w_adv), [w[n] for n in names])

    stats = copy.deepcopy(model)
    stats(x)  # the running statistics one forward pass leaves
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = flatmin.SAM(model.parameters(), torch.optim.SGD, rho, lr=1.0, eps=0.0)
    second_order_step(opt, lambda: F.cross_entropy(model(x), y), model=model)
    for (n, p), gf in zip(model.named_parameters(), full):
        torch.testing.assert_close(before[n] - p.detach(), gf, rtol=1e-9, atol=1e-11)
    for a, b in zip(stats.buffers(), model.buffers()):
        assert torch.equal(a, b)  # the passes after the first leave the BN statistics alone
