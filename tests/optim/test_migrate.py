"""Loading davda54/sam and pytorch-optimizer checkpoints (flatmin.optim.migrate)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flatmin
from flatmin.optim.migrate import load_foreign_state

F = nn.functional
DT = torch.float64


def _mlp() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.7)
    return model


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g))
        for _ in range(n)
    ]


def _closure(opt: torch.optim.Optimizer, model: nn.Module, x, y):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


class _DavdaLayout(torch.optim.Optimizer):
    """A wrapper that saves what davda54/sam's saves: shared groups and a weight backup."""

    def __init__(self, params, base, rho: float, adaptive: bool, **kw) -> None:
        super().__init__(params, {"rho": rho, "adaptive": adaptive, **kw})
        self.base_optimizer = base(self.param_groups, **kw)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["old_p"] = p.detach().clone()


def test_davda54_checkpoint_loads_its_groups_and_reports_the_lost_momentum() -> None:
    model = _mlp()
    theirs = _DavdaLayout(model.parameters(), torch.optim.SGD, 0.2, True, lr=0.05, momentum=0.8)
    saved = copy.deepcopy(theirs.state_dict())
    ours = flatmin.SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    report = load_foreign_state(ours, saved)
    group = ours.param_groups[0]
    assert (group["rho"], group["adaptive"], group["lr"], group["momentum"]) == (
        0.2,
        True,
        0.05,
        0.8,
    )
    assert group["eta"] == 0.0  # their ASAM: T = |w|
    assert ours.base_optimizer.param_groups is ours.param_groups
    assert not ours.base_optimizer.state  # nothing to load: momentum restarts from zero
    assert any("base optimizer state" in m for m in report.missing)
    assert any("old_p" in i for i in report.ignored)
    assert any("eta = 0" in n for n in report.notes)
    assert "missing: base optimizer state" in str(report)


def test_pytorch_optimizer_sam_checkpoint_resumes_in_lockstep() -> None:
    po = pytest.importorskip("pytorch_optimizer")
    batches = _batches(6)
    model = _mlp()
    theirs = po.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for x, y in batches[:3]:  # their usage: a first pass, then step(closure) for the second
        closure = _closure(theirs, model, x, y)
        closure()
        theirs.step(closure)
    ours_model = copy.deepcopy(model)
    ours = flatmin.SAM(ours_model.parameters(), torch.optim.SGD, lr=1.0, momentum=0.5)
    report = load_foreign_state(ours, copy.deepcopy(theirs.state_dict()))
    assert any("momentum_buffer" in item for item in report.loaded)
    assert not report.missing
    for p, q in zip(model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(
            ours.base_optimizer.state[q]["momentum_buffer"],
            theirs.base_optimizer.state[p]["momentum_buffer"],
            rtol=0,
            atol=0,
        )
    for x, y in batches[3:]:
        closure = _closure(theirs, model, x, y)
        closure()
        theirs.step(closure)
        ours.step(_closure(ours, ours_model, x, y))
    # Their ε̂ norm is accumulated in float32 (get_global_gradient_norm): agreement to 1e-6.
    for p, q in zip(model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_pytorch_optimizer_friendly_sam_and_wsam_states_map_to_ours() -> None:
    po = pytest.importorskip("pytorch_optimizer")
    x, y = _batches(1)[0]
    model = _mlp()
    theirs = po.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, sigma=0.5, lmbda=0.7,
                            lr=0.1, momentum=0.9)  # fmt: skip
    for _ in range(2):
        closure = _closure(theirs, model, x, y)
        closure()
        theirs.step(closure)
    ours = flatmin.FriendlySAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    load_foreign_state(ours, copy.deepcopy(theirs.state_dict()))
    assert (ours.param_groups[0]["sigma"], ours.param_groups[0]["lmbda"]) == (0.5, 0.7)
    for p, q in zip(model.parameters(), ours.param_groups[0]["params"]):
        assert torch.equal(ours.state[q]["fsam_momentum"], theirs.state[p]["momentum"])

    wmodel = _mlp()
    wsam = po.WSAM(wmodel, wmodel.parameters(), torch.optim.SGD, rho=0.1, gamma=0.8, lr=0.1)
    ours_w = flatmin.WSAM(_mlp().parameters(), torch.optim.SGD, lr=0.1)
    report = load_foreign_state(ours_w, copy.deepcopy(wsam.state_dict()))
    assert ours_w.param_groups[0]["gamma"] == pytest.approx(0.8, rel=1e-15)
    assert any("gamma = alpha" in n for n in report.notes)


def test_a_checkpoint_that_does_not_fit_changes_nothing() -> None:
    model = _mlp()
    theirs = _DavdaLayout(list(model.parameters())[:2], torch.optim.SGD, 0.2, False, lr=0.05)
    ours = flatmin.SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match="sizes"):
        load_foreign_state(ours, theirs.state_dict())
    bad = copy.deepcopy(_DavdaLayout(_mlp().parameters(), torch.optim.SGD, -1.0, False, lr=0.1)
                        .state_dict())  # fmt: skip
    with pytest.raises(ValueError, match="Invalid rho: -1"):
        load_foreign_state(ours, bad)
    with pytest.raises(ValueError, match=r"not a torch\.optim state dict"):
        load_foreign_state(ours, {"param_groups": 3})
    assert ours.state_dict() == before
    with pytest.raises(ValueError, match="migrate"):  # the plain loader points here
        ours.load_state_dict(theirs.state_dict())


def _sgd_checkpoint() -> dict:
    model = _mlp()
    theirs = _DavdaLayout(model.parameters(), torch.optim.SGD, 0.2, False, lr=0.05, momentum=0.8)
    x, y = _batches(1)[0]
    theirs.zero_grad()
    F.cross_entropy(model(x), y).backward()
    theirs.base_optimizer.step()  # momentum buffers to save, as pytorch-optimizer's SAM does
    saved = copy.deepcopy(theirs.state_dict())
    for index, entry in enumerate(theirs.base_optimizer.state.values()):
        saved["state"][index]["momentum_buffer"] = entry["momentum_buffer"].clone()
    return saved


@pytest.mark.parametrize(
    ("corrupt", "error", "message"),
    [
        (lambda s: s["param_groups"][0].update(lr=float("nan")), ValueError,
         r"Invalid group value 'lr': nan \(expected a finite value\)"),
        (lambda s: s["param_groups"][0].update(lr="0.1"), TypeError,
         r"Invalid group value 'lr': '0.1' \(expected a float\)"),
        (lambda s: s["param_groups"][0].update(nesterov=1), TypeError,
         r"Invalid group value 'nesterov': 1 \(expected a bool\)"),
        (lambda s: s["state"][1]["momentum_buffer"].fill_(float("inf")), ValueError,
         r"'momentum_buffer' of parameter 1 is not finite"),
        (lambda s: s["state"][0].update(momentum_buffer=[0.0] * 24), ValueError,
         r"'momentum_buffer' of parameter 0: list \(expected a tensor\)"),
        (lambda s: s["state"][0].update(momentum_buffer=0.5), ValueError,
         r"'momentum_buffer' of parameter 0: float \(expected a tensor\)"),
    ],
    ids=["nan-lr", "str-lr", "int-flag", "inf-momentum", "list-momentum", "float-momentum"],
)  # fmt: skip
def test_values_that_would_break_training_are_refused_and_change_nothing(corrupt, error, message):
    saved = _sgd_checkpoint()
    assert load_foreign_state(
        flatmin.SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9), saved
    ).loaded  # the intact checkpoint loads
    corrupt(saved)
    ours = flatmin.SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(error, match=message):
        load_foreign_state(ours, saved)
    assert ours.state_dict() == before


def test_pytorch_optimizer_gsam_reports_the_values_it_cannot_carry() -> None:
    po = pytest.importorskip("pytorch_optimizer")
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rho_scheduler = po.ProportionScheduler(
        torch.optim.lr_scheduler.StepLR(base, 1), max_lr=0.1, min_lr=0.0, max_value=0.3,
        min_value=0.1,
    )  # fmt: skip
    theirs = po.GSAM(model.parameters(), base, model, rho_scheduler, alpha=0.25)
    ours = flatmin.GSAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    report = load_foreign_state(ours, copy.deepcopy(theirs.state_dict()))
    missing = "\n".join(report.missing)
    assert "group value 'rho' of GSAM: not in the checkpoint" in missing
    assert "'alpha' of GSAM" in missing and "it stays 0.4" in missing
    assert "'adaptive'" in missing and "'p'" not in missing and "'eta'" not in missing
    assert (ours.param_groups[0]["rho"], ours.param_groups[0]["alpha"]) == (0.05, 0.4)


def test_a_value_their_wrapper_shared_with_its_base_goes_to_both_of_ours() -> None:
    # davda54/sam on Adadelta: one 'rho' was both SAM's radius and Adadelta's decay.
    model = _mlp()
    theirs = _DavdaLayout(model.parameters(), torch.optim.Adadelta, 0.3, False, lr=1.0)
    ours = flatmin.SAM(_mlp().parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    report = load_foreign_state(ours, copy.deepcopy(theirs.state_dict()))
    assert (ours.param_groups[0]["rho"], ours.param_groups[0]["sam_rho"]) == (0.3, 0.3)
    assert any("both ['rho', 'sam_rho'] get it" in note for note in report.notes)
