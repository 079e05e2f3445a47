"""SWA learning-rate schedules: values against the paper's formulas, with any optimizer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from flatmin.optim.sam import SAM
from flatmin.optim.schedules import ConstantSWALR, CyclicSWALR, DecayHoldSWALR


def sgd(n_groups: int = 1) -> torch.optim.Optimizer:
    layers = [nn.Linear(2, 2) for _ in range(n_groups)]
    return torch.optim.SGD([{"params": m.parameters()} for m in layers], lr=1.0)


def lrs_used(opt: torch.optim.Optimizer, sched, n: int, group: int = 0) -> list[float]:
    """The learning rate of iterations 1..n, as the optimizer sees it at each step."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[group]["lr"])
        opt.step()
        sched.step()
    return out


def cyclic_formula(i: int, a1: float, a2: float, c: int) -> float:
    t = ((i - 1) % c + 1) / c  # Izmailov et al. (2018), Algorithm 1
    return (1 - t) * a1 + t * a2


def decay_hold_formula(epoch: int, a1: float, a2: float, total: int) -> float:
    # The authors' train.py: t = epoch / budget with 0-based epochs.
    t = epoch / total
    if t <= 0.5:
        return a1
    if t <= 0.9:
        return a1 * (1.0 - (1.0 - a2 / a1) * (t - 0.5) / 0.4)
    return a2


@pytest.mark.parametrize("c", [1, 3, 5])
def test_cyclic_matches_algorithm_1(c: int) -> None:
    opt = sgd()
    sched = CyclicSWALR(opt, alpha1=0.05, alpha2=0.001, cycle=c)
    got = lrs_used(opt, sched, 4 * c + 2)
    expected = [cyclic_formula(i, 0.05, 0.001, c) for i in range(1, 4 * c + 3)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # The last iteration of every cycle runs at α2 (where SWA averages).
    assert all(got[i - 1] == pytest.approx(0.001) for i in range(c, 4 * c + 1, c))


def test_decay_hold_matches_the_paper_code() -> None:
    opt = sgd()
    sched = DecayHoldSWALR(opt, alpha1=0.1, alpha2=0.005, total=20)
    got = lrs_used(opt, sched, 25)
    expected = [decay_hold_formula(e, 0.1, 0.005, 20) for e in range(25)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[10] == 0.1 and got[11] < 0.1 and got[18] == pytest.approx(0.005)


def test_constant_and_per_group_values() -> None:
    opt = sgd(2)
    sched = ConstantSWALR(opt, lr=[0.1, 0.02])
    lrs_used(opt, sched, 3)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]
    opt = sgd(2)
    sched = CyclicSWALR(opt, alpha1=[0.1, 0.2], alpha2=[0.01, 0.02], cycle=2)
    assert lrs_used(opt, sched, 2, group=1) == pytest.approx([0.11, 0.02])


def test_works_with_sam_through_shared_groups_without_warnings() -> None:
    model = nn.Linear(3, 1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1.0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = CyclicSWALR(opt, alpha1=0.1, alpha2=0.01, cycle=3)
        seen = []
        for _ in range(4):
            seen.append(opt.base_optimizer.param_groups[0]["lr"])
            nn.functional.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert seen == pytest.approx([cyclic_formula(i, 0.1, 0.01, 3) for i in range(1, 5)])


def test_scheduler_state_dict_resumes() -> None:
    opt = sgd()
    sched = DecayHoldSWALR(opt, alpha1=0.1, alpha2=0.01, total=10)
    lrs_used(opt, sched, 6)
    opt2 = sgd()
    sched2 = DecayHoldSWALR(opt2, alpha1=0.1, alpha2=0.01, total=10)
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert lrs_used(opt2, sched2, 5) == lrs_used(opt, sched, 5)


@pytest.mark.parametrize(
    ("cls", "kwargs", "exc", "match"),
    [
        (CyclicSWALR, {"alpha1": 0.1, "alpha2": 0.01, "cycle": 0}, ValueError, "Invalid cycle: 0"),
        (CyclicSWALR, {"alpha1": -0.1, "alpha2": 0.01, "cycle": 2}, ValueError, "alpha1: -0.1"),
        (CyclicSWALR, {"alpha1": [0.1, 0.2], "alpha2": 0.01, "cycle": 2}, ValueError, "2 values"),
        (CyclicSWALR, {"alpha1": "a", "alpha2": 0.01, "cycle": 2}, TypeError, "alpha1"),
        (DecayHoldSWALR, {"alpha1": 0.1, "alpha2": 0.01, "total": 0}, ValueError, "total: 0"),
        (
            DecayHoldSWALR,
            {"alpha1": 0.1, "alpha2": 0.01, "total": 5, "hold": 0.9, "decay_end": 0.5},
            ValueError,
            "hold/decay_end",
        ),
        (ConstantSWALR, {"lr": float("nan")}, ValueError, "Invalid lr: nan"),
    ],
)
def test_invalid_arguments(cls, kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        cls(sgd(), **kwargs)
