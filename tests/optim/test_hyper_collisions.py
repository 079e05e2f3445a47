"""Family values and base-optimizer values that share a name keep both (issue #21, item 1).

SAM shares its param-group dicts with the base optimizer, so a family key named like a base key
(SAM's ``rho`` and Adadelta's decay ``rho``, GSAM's ``alpha`` and RMSprop's smoothing ``alpha``)
used to overwrite the base's value silently. The table: every family member × every
``torch.optim`` optimizer SAM can drive (and pytorch-optimizer ones), each base key keeps the
value the user meant, and the family value is the one the user passed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flatmin
from flatmin.optim import ProportionalRho

# Family member → the family values a user passes (none equal to a default) and the extra
# options that make ``rho = 0`` reduce it to its base optimizer exactly.
FAMILY = {
    flatmin.SAM: ({}, {}),
    flatmin.SAMEveryK: ({}, {}),
    # LookSAM's α‖g‖·u: with ρ = 0, u is the rounding noise of g_s − g, normalised.
    flatmin.LookSAM: ({"alpha": 0.6}, {"alpha": 0.0}),
    flatmin.ESAM: ({}, {"gamma": 1.0}),
    flatmin.GSAM: ({"alpha": 0.3}, {}),
    flatmin.WSAM: ({"gamma": 0.8}, {}),
    flatmin.FriendlySAM: ({"sigma": 0.5, "lmbda": 0.8}, {}),
    flatmin.GCSAM: ({}, {"descent": False}),
    flatmin.MomentumSAM: ({}, {}),
    flatmin.optim.MultiStepSAM: ({}, {}),
    flatmin.WASAM: ({}, {}),
}
# LBFGS (needs a closure) and SparseAdam (needs sparse gradients) are refused:
# test_api_edges.py::test_refuses_base_optimizers_sam_cannot_drive.
TORCH_BASES = [
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.Adadelta,
    torch.optim.Adafactor,
    torch.optim.Adagrad,
    torch.optim.ASGD,
    torch.optim.Muon,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Rprop,
]


def _pytorch_optimizer(name: str) -> type[torch.optim.Optimizer]:
    return getattr(pytest.importorskip("pytorch_optimizer"), name)


# Ranger uses alpha (GSAM's, LookSAM's) and AdaBound gamma (WSAM's).
BASES = [*TORCH_BASES, "Ranger", "AdaBound"]


def _base_class(base: type[torch.optim.Optimizer] | str) -> type[torch.optim.Optimizer]:
    return _pytorch_optimizer(base) if isinstance(base, str) else base


def _base_kwargs(base: type[torch.optim.Optimizer]) -> dict[str, float]:
    kw = {"lr": 0.01}
    if base in (torch.optim.SGD, torch.optim.RMSprop):
        kw["momentum"] = 0.9  # MomentumSAM needs a momentum
    return kw


def _model() -> nn.Module:
    # No bias: Muon takes 2-D parameters only.
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 2, bias=False))


def _build(family, model, base, rho, **kw):
    if family is flatmin.WASAM:
        return family(model, base, rho=rho, **kw)
    return family(model.parameters(), base, rho, **kw)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.randn(8, 4, generator=torch.Generator().manual_seed(0)),
        torch.randn(8, 2, generator=torch.Generator().manual_seed(1)),
    )


def _step(opt, model) -> None:
    x, y = _batch()

    def losses(index=None):
        xb, yb = (x, y) if index is None else (x[index], y[index])
        return (model(xb) - yb).square().mean(1)

    # Per-sample losses: ESAM's data selection needs them, the other members ignore the shape.
    opt.step(flatmin.optim.per_sample_closure(opt, losses))


def _refused(family, base) -> bool:
    # MomentumSAM ascends along the base's momentum: bases without one are refused (tested).
    keeps_momentum = base in (torch.optim.SGD, torch.optim.RMSprop, torch.optim.Muon)
    reference = base([nn.Parameter(torch.zeros(2, 2))], lr=0.01)
    return family is flatmin.MomentumSAM and not (keeps_momentum or "betas" in reference.defaults)


def _assert_values(opt, family_values, expected_base) -> None:
    for group in opt.param_groups:
        for key, value in expected_base.items():
            assert group[key] == value, key
        for name, value in family_values.items():
            assert group[opt.group_key(name)] == value, name


@pytest.mark.parametrize("base", BASES, ids=lambda b: b if isinstance(b, str) else b.__name__)
@pytest.mark.parametrize("family", list(FAMILY), ids=lambda f: f.__name__)
def test_every_value_is_the_one_the_user_meant(family, base):
    base = _base_class(base)
    kw = _base_kwargs(base)
    model = _model()
    if _refused(family, base):
        with pytest.raises(ValueError, match="keeps no momentum"):
            _build(family, model, base, 0.07, **kw)
        return
    values, _ = FAMILY[family]
    expected_base = base([nn.Parameter(torch.zeros(2, 2))], **kw).defaults
    opt = _build(family, model, base, 0.07, **values, **kw)
    _assert_values(opt, {"rho": 0.07, **values}, expected_base)
    _step(opt, model)
    _assert_values(opt, {"rho": 0.07, **values}, expected_base)


@pytest.mark.parametrize("base", BASES, ids=lambda b: b if isinstance(b, str) else b.__name__)
@pytest.mark.parametrize("family", list(FAMILY), ids=lambda f: f.__name__)
def test_rho_zero_steps_as_the_base_optimizer_alone(family, base):
    # The base's own values drive its update: with ρ = 0 the family member is its base.
    base = _base_class(base)
    kw = _base_kwargs(base)
    if _refused(family, base):
        pytest.skip("MomentumSAM refuses a base without momentum (the other test checks it)")
    values, degenerate = FAMILY[family]
    model, reference = _model(), _model()
    opt = _build(family, model, base, 0.0, **{**values, **degenerate}, **kw)
    plain = base(reference.parameters(), **kw)
    for _ in range(2):
        _step(opt, model)
        plain.zero_grad()
        x, y = _batch()
        (reference(x) - y).square().mean(1).mean().backward()
        plain.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_an_instance_keeps_its_values_and_the_family_its_own():
    model = _model()
    base = torch.optim.Adadelta(model.parameters(), lr=0.5, rho=0.95)
    opt = flatmin.GSAM(None, base, rho=0.07, alpha=0.3)
    group = opt.param_groups[0]
    assert (group["rho"], group["sam_rho"], group["alpha"]) == (0.95, 0.07, 0.3)
    rms = torch.optim.RMSprop(_model().parameters(), alpha=0.9)
    opt = flatmin.LookSAM(None, rms, alpha=0.6)
    assert (opt.param_groups[0]["alpha"], opt.param_groups[0]["sam_alpha"]) == (0.9, 0.6)


def test_a_group_that_names_a_shared_key_alone_is_refused():
    model = _model()
    groups = [{"params": list(model.parameters()), "rho": 0.1}]
    with pytest.raises(ValueError, match=r"'rho' is a key of both SAM and Adadelta; write "
                                         r"'sam_rho' for SAM's rho and 'rho' for Adadelta's"):
        flatmin.SAM(groups, torch.optim.Adadelta)
    # Both keys: no ambiguity, each value where it belongs.
    groups = [{"params": list(model.parameters()), "rho": 0.95, "sam_rho": 0.1}]
    opt = flatmin.SAM(groups, torch.optim.Adadelta)
    assert (opt.param_groups[0]["rho"], opt.param_groups[0]["sam_rho"]) == (0.95, 0.1)
    extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="'rho' is a key of both"):
        opt.add_param_group({"params": [extra], "rho": 0.5})
    opt.add_param_group({"params": [extra], "sam_rho": 0.2})
    assert (opt.param_groups[1]["rho"], opt.param_groups[1]["sam_rho"]) == (0.9, 0.2)


def test_plain_names_stay_where_the_base_does_not_use_them():
    opt = flatmin.GSAM(_model().parameters(), torch.optim.SGD, rho=0.07, alpha=0.3, lr=0.1)
    assert (opt.group_key("rho"), opt.group_key("alpha")) == ("rho", "alpha")
    assert (opt.param_groups[0]["rho"], opt.param_groups[0]["alpha"]) == (0.07, 0.3)
    assert not any(key.startswith("sam_") for key in opt.param_groups[0])
    with pytest.raises(ValueError, match=r"Invalid name: 'lr' \(expected one of"):
        opt.group_key("lr")


def test_a_scheduler_drives_the_family_value_not_the_base_one():
    model = _model()
    opt = flatmin.SAM(model.parameters(), torch.optim.Adadelta, rho=0.1, lr=1.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    rho_sched = ProportionalRho(opt, rho_min=0.0)
    _step(opt, model)
    lr_sched.step()
    rho_sched.step()
    assert opt.param_groups[0]["sam_rho"] == pytest.approx(0.05)
    assert opt.param_groups[0]["rho"] == 0.9
    assert rho_sched.get_last_rho() == [pytest.approx(0.05)]
    # A value a scheduler breaks fails at the next step, by its key.
    opt.param_groups[0]["sam_rho"] = -1.0
    with pytest.raises(ValueError, match=r"Invalid sam_rho: -1.0"):
        _step(opt, model)


def test_state_dict_round_trips_both_values():
    model, twin = _model(), _model()
    opt = flatmin.GSAM(model.parameters(), torch.optim.RMSprop, rho=0.07, alpha=0.3, lr=0.01)
    _step(opt, model)
    opt.param_groups[0]["sam_alpha"] = 0.2
    other = flatmin.GSAM(twin.parameters(), torch.optim.RMSprop, rho=0.5, lr=0.01)
    twin.load_state_dict(model.state_dict())
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint: no shared tensors
    group = other.param_groups[0]
    assert (group["alpha"], group["sam_alpha"], group["rho"]) == (0.99, 0.2, 0.07)
    for _ in range(2):
        _step(opt, model)
        _step(other, twin)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
