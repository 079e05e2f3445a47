"""One table, every member of the SAM family (like torch's ``optim_db``).

Each property proven for SAM is proven for every member: foreach kernel = single-tensor reference
in float64, resume in lockstep (bit-identical), weights restored after an exception in any pass,
an LR scheduler attached, the state_dict round trip (a hyper-parameter mismatch is an error),
transactional loading and group validation, the closure-call count per step, and the member's
degenerate case equal to SAM (bit-identical).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import flatmin
from flatmin import SAM

DT = torch.float64
BASE_KW = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


@dataclass(frozen=True)
class Member:
    """One optimizer of the family (``flatmin.<name>``) and what the table expects of it."""

    name: str
    kwargs: dict[str, Any]
    calls: tuple[int, ...]  # closure calls in steps 1, 2, ...
    degenerate: dict[str, Any]  # overrides that make it SAM (with SAM's rho)
    mismatch: tuple[dict[str, Any], str]  # a constructor change that a checkpoint rejects
    bad_group: tuple[str, Any, str] = ("rho", -0.5, r"Invalid rho: -0\.5")
    vector_model: bool = False  # degenerate case needs vector parameters only (GCSAM)

    def make(self, model: nn.Module, params: Any, **kw: Any) -> SAM:
        cls = getattr(flatmin, self.name)
        if cls is flatmin.WASAM:  # the model comes first
            return cls(model, torch.optim.SGD, params=params, **kw)
        return cls(params, torch.optim.SGD, **kw)


# fmt: off
MEMBERS = [
    Member("SAM", {}, (2, 2, 2, 2), {}, ({"eps": 1e-10}, "eps")),
    Member("SAMEveryK", {"k": 3}, (2, 1, 1, 2), {"k": 1}, ({"k": 4}, "k=3")),
    Member("LookSAM", {"k": 3, "alpha": 0.5}, (2, 1, 1, 2), {"k": 1}, ({"k": 2}, "k=3"),
           ("alpha", math.nan, r"Invalid alpha: nan")),
    Member("ESAM", {"beta": 0.6, "gamma": 0.5}, (3, 3, 3, 3), {"beta": 1.0, "gamma": 1.0},
           ({"gamma": 0.25}, "gamma")),
    Member("GSAM", {"alpha": 0.3}, (2, 2, 2, 2), {"alpha": 0.0}, ({"eps": 0.0}, "eps"),
           ("alpha", -0.1, r"Invalid alpha: -0\.1")),
    Member("WSAM", {"gamma": 0.8}, (2, 2, 2, 2), {"gamma": 0.5, "decouple": False},
           ({"decouple": False}, "decouple"), ("gamma", 1.0, r"Invalid gamma: 1\.0")),
    Member("FriendlySAM", {"sigma": 1.0, "lmbda": 0.6}, (2, 2, 2, 2), {"sigma": 0.0},
           ({"max_grad_norm": 1.0}, "max_grad_norm"), ("lmbda", 1.5, r"Invalid lmbda: 1\.5")),
    Member("GCSAM", {}, (2, 2, 2, 2), {}, ({"descent": False}, "descent"), vector_model=True),
    Member("MomentumSAM", {"rho": 0.3}, (1, 1, 1, 1), {"rho": 0.0}, ({"eps": 1e-9}, "eps"),
           ("rho", math.inf, r"Invalid rho: inf")),
    Member("MultiStepSAM", {"steps": 2}, (3, 3, 3, 3), {"steps": 1}, ({"steps": 3}, "steps=2")),
    Member("WASAM", {"start": 2}, (2, 2, 2, 2), {},
           ({"average_on_step": False}, "average_on_step")),
]
# fmt: on
IDS = [m.name for m in MEMBERS]


def _model(vector: bool = False) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    if vector:  # parameters that are all vectors: a per-feature affine map + bias
        model: nn.Module = nn.Sequential(nn.BatchNorm1d(5), _Scale(5), nn.Tanh(), _Scale(5))
    else:
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(DT)


class _Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))
        self.b = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + self.b


def _groups(model: nn.Module, rho: float = 0.1) -> list[dict[str, Any]]:
    params = list(model.parameters())
    # Two groups, the first with its own rho: the norm runs over both.
    return [{"params": params[:2], "rho": 0.7 * rho}, {"params": params[2:]}]


def _build(member: Member, model: nn.Module, **overrides: Any) -> SAM:
    kw = {"rho": 0.1, **BASE_KW, **member.kwargs, **overrides}
    return member.make(model, _groups(model, kw["rho"]), **kw)


def _batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 5, generator=g, dtype=DT), torch.randint(0, 5, (16,), generator=g))
        for _ in range(n)
    ]


class Closure:
    """The family's closure contract (per-sample losses, optional index), counting its calls."""

    def __init__(self, opt: SAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt, self.model, self.x, self.y = opt, model, x, y
        self.calls = 0
        self.fail_at: int | None = None

    def __call__(self, index: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise FloatingPointError(f"boom in call {self.calls}")
        self.opt.zero_grad()
        x, y = (self.x, self.y) if index is None else (self.x[index], self.y[index])
        losses = nn.functional.cross_entropy(self.model(x), y, reduction="none")
        if torch.is_grad_enabled():
            losses.mean().backward()
        return losses.detach()


def _train(opt: SAM, model: nn.Module, batches: list) -> list[int]:
    calls = []
    for x, y in batches:
        closure = Closure(opt, model, x, y)
        opt.step(closure, model=model)
        calls.append(closure.calls)
    return calls


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs by {(x - y).abs().max()}"


def _assert_same_state_dict(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _assert_same_state_dict(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state_dict(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"  # NaN == NaN here


# -- the table ------------------------------------------------------------------------------------
def test_the_table_covers_every_member_of_the_family() -> None:
    family = {
        name
        for name in flatmin.__all__
        if isinstance(getattr(flatmin, name), type) and issubclass(getattr(flatmin, name), SAM)
    }
    assert family == set(IDS)


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_foreach_matches_single_tensor_reference_in_float64(member: Member) -> None:
    models = [_model(), _model()]
    opts = [_build(member, m, foreach=f) for m, f in zip(models, (False, True))]
    for x, y in _batches(5):
        for model, opt in zip(models, opts):
            opt.step(Closure(opt, model, x, y), model=model)
        for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert not all(torch.equal(a, b) for a, b in zip(_state(models[0]), _state(_model())))


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_resume_continues_in_lockstep(member: Member) -> None:
    batches = _batches(8)
    model_a = _model()
    opt_a = _build(member, model_a)
    _train(opt_a, model_a, batches[:3])
    checkpoint = copy.deepcopy({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    model_b = _model()
    # Other group values (lr, rho): the checkpoint's win, as in torch.optim.
    extra = {"generator": torch.Generator().manual_seed(9)} if member.name == "ESAM" else {}
    opt_b = _build(member, model_b, lr=7.0, rho=0.3, **extra)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups
    assert opt_b.steps_taken == opt_a.steps_taken == 3
    _train(opt_a, model_a, batches[3:])
    _train(opt_b, model_b, batches[3:])
    _assert_equal(_state(model_a), _state(model_b))
    _assert_same_state_dict(opt_a.state_dict(), opt_b.state_dict())


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_an_error_in_any_pass_restores_the_weights(member: Member) -> None:
    x, y = _batches(1)[0]
    for fail_at in range(1, member.calls[3] + 1):
        model = _model()
        opt = _build(member, model)
        _train(opt, model, _batches(3))  # momentum and variant state exist; a SAM step is next
        before = [p.detach().clone() for p in model.parameters()]
        base_state = copy.deepcopy(opt.base_optimizer.state_dict())
        closure = Closure(opt, model, x, y)
        closure.fail_at = fail_at
        with pytest.raises(FloatingPointError, match=f"call {fail_at}"):
            opt.step(closure, model=model)
        # The weights, bit for bit (BN statistics are the completed passes' own business).
        _assert_equal(before, [p.detach().clone() for p in model.parameters()])
        _assert_same_state_dict(base_state, opt.base_optimizer.state_dict())
        assert not opt.perturbed and all(p.requires_grad for p in model.parameters())
        _train(opt, model, [(x, y)])  # and the optimizer goes on
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_an_lr_scheduler_attached_to_the_optimizer_drives_the_base(member: Member) -> None:
    batches = _batches(4)
    model_a, model_b = _model(), _model()
    opt_a, opt_b = _build(member, model_a, lr=0.2), _build(member, model_b, lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for i, batch in enumerate(batches):
            _train(opt_a, model_a, [batch])
            sched.step()
            _train(opt_b, model_b, [batch])
            for group in opt_b.param_groups:  # the twin is scheduled by hand
                group["lr"] = 0.2 * 0.5 ** (i + 1)
    assert opt_a.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5**4)
    _assert_equal(_state(model_a), _state(model_b))


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_state_dict_round_trip_and_hyper_parameter_mismatch(member: Member) -> None:
    model = _model()
    opt = _build(member, model)
    _train(opt, model, _batches(3))
    saved = copy.deepcopy(opt.state_dict())
    assert saved["variant"]["type"] == member.name
    fresh = _build(member, _model())
    fresh.load_state_dict(copy.deepcopy(saved))
    _assert_same_state_dict(saved, fresh.state_dict())
    changes, match = member.mismatch
    other = _build(member, _model(), **changes)
    untouched = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(copy.deepcopy(saved))
    _assert_same_state_dict(untouched, other.state_dict())


def _corruptions(saved: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    out = []
    for path, value, match in [
        (("base", "param_groups", 1, "rho"), -0.5, r"Invalid rho: -0\.5"),
        (("sam", "param_groups", 0, "rho"), math.nan, r"Invalid rho: nan"),
        (("variant", "counters", "steps_taken"), -1, "steps_taken"),
        (("variant", "type"), "SAMX", "SAMX"),
    ]:
        bad = copy.deepcopy(saved)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        out.append((bad, match))
    bad = copy.deepcopy(saved)
    bad["base"]["param_groups"][0]["params"] = bad["base"]["param_groups"][0]["params"][:1]
    out.append((bad, "sizes"))
    return out


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_load_state_dict_is_all_or_nothing(member: Member) -> None:
    model_a, model_b = _model(), _model()
    opt_a, opt_b = _build(member, model_a), _build(member, model_b)
    _train(opt_a, model_a, _batches(3))
    _train(opt_b, model_b, _batches(2))
    before = copy.deepcopy(opt_b.state_dict())
    for bad, match in _corruptions(copy.deepcopy(opt_a.state_dict())):
        with pytest.raises(ValueError, match=match):
            opt_b.load_state_dict(bad)
        _assert_same_state_dict(before, opt_b.state_dict())
        assert opt_b.param_groups is opt_b.base_optimizer.param_groups


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_closure_calls_per_step(member: Member) -> None:
    model = _model()
    opt = _build(member, model)
    assert _train(opt, model, _batches(len(member.calls))) == list(member.calls)


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_degenerate_case_is_sam_bit_for_bit(member: Member) -> None:
    model_a, model_b = _model(member.vector_model), _model(member.vector_model)
    rho = member.degenerate.get("rho", 0.1)
    sam = SAM(_groups(model_a, rho), torch.optim.SGD, rho=rho, **BASE_KW)
    other = _build(member, model_b, **member.degenerate)
    batches = _batches(5)
    _train(sam, model_a, batches)
    _train(other, model_b, batches)
    _assert_equal(_state(model_a), _state(model_b))


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_an_invalid_group_value_fails_at_the_step_and_moves_nothing(member: Member) -> None:
    model = _model()
    opt = _build(member, model)
    _train(opt, model, _batches(1))
    key, value, match = member.bad_group
    for bad in ({"rho": -0.5}, {"rho": math.nan}, {key: value}):
        (k, v), = bad.items()  # fmt: skip
        good = opt.param_groups[1][k]
        opt.param_groups[1][k] = v  # what a misbehaving scheduler does
        before = _state(model)
        x, y = _batches(1)[0]
        expected = match if bad == {key: value} else rf"Invalid {k}: {v}"
        with pytest.raises(ValueError, match=expected):
            opt.step(Closure(opt, model, x, y), model=model)
        _assert_equal(before, _state(model))
        assert not opt.perturbed
        opt.param_groups[1][k] = good


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_add_param_group_validates_before_storing(member: Member) -> None:
    model = _model()
    opt = _build(member, model)
    extra = nn.Parameter(torch.ones(3, dtype=DT))
    key, value, match = member.bad_group
    for bad, expected in (({"rho": -1.0}, r"Invalid rho: -1\.0"), ({key: value}, match)):
        with pytest.raises(ValueError, match=expected):
            opt.add_param_group({"params": [extra], **bad})
        assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 2
    opt.add_param_group({"params": [extra]})
    assert opt.base_optimizer.param_groups[-1]["params"] == [extra]
    assert opt.param_groups[-1]["momentum"] == BASE_KW["momentum"]


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_a_backward_before_step_closure_warns_once(member: Member) -> None:
    model = _model()
    opt = _build(member, model)
    batches = _batches(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(opt, model, batches[:2])  # the contract: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a repeat would be recorded, not deduplicated
        for x, y in batches[2:]:  # davda54/sam's usage: backward, then step(closure), twice
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step(Closure(opt, model, x, y), model=model)
    misuse = [w for w in caught if "found gradients computed before" in str(w.message)]
    assert len(misuse) == 1, [str(w.message) for w in caught]  # two misused steps, one warning
    assert issubclass(misuse[0].category, UserWarning) and "backward" in str(misuse[0].message)


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_unperturbed_holds_w_mid_step(member: Member) -> None:
    model = _model()
    opt = _build(member, model)
    _train(opt, model, _batches(1))  # Momentum-SAM perturbs from the momentum
    x, y = _batches(1)[0]
    Closure(opt, model, x, y)()
    before = _state(model)
    opt.first_step()
    perturbed = _state(model)
    assert not all(torch.equal(a, b) for a, b in zip(before, perturbed))
    with opt.unperturbed():
        _assert_equal(before, _state(model))
    _assert_equal(perturbed, _state(model))
    opt.restore()
    _assert_equal(before, _state(model))
