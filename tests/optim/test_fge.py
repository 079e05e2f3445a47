"""FGE: Garipov et al.'s triangular schedule, snapshots at its minima, softmax ensemble."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatmin.optim.fge import FGE, FGECyclicLR


def garipov(i: int, a1: float, a2: float, c: int) -> float:
    t = ((i - 1) % c + 1) / c  # Garipov et al. (2018), eq. (2)
    if t <= 0.5:
        return (1 - 2 * t) * a1 + 2 * t * a2
    return (2 - 2 * t) * a2 + (2 * t - 1) * a1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


def batches(n: int):
    g = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(16, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=g),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("c", [2, 4, 6])
def test_schedule_values_and_minima(c: int) -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = FGECyclicLR(opt, alpha1=0.05, alpha2=0.0005, cycle=c)
    lrs, minima = [], []
    for i in range(1, 3 * c + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if sched.at_minimum:
            minima.append(i)
    assert lrs == pytest.approx([garipov(i, 0.05, 0.0005, c) for i in range(1, 3 * c + 1)])
    assert minima == [c // 2, c + c // 2, 2 * c + c // 2]
    assert all(lrs[i - 1] == pytest.approx(0.0005) for i in minima)
    assert max(lrs) == pytest.approx(0.05)  # t = 1 ends each cycle at the peak


def test_snapshots_are_the_weights_at_the_minima_and_predict_is_the_mean_softmax() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fge = FGE(model, opt, alpha1=0.1, alpha2=0.001, cycle=4)
    expected_members = []
    for i, (x, y) in enumerate(batches(12), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        collected = fge.step()
        assert collected == (i % 4 == 2)
        if collected:
            expected_members.append({k: v.clone() for k, v in model.state_dict().items()})
    assert len(fge) == 3
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_test = torch.randn(10, 4, dtype=torch.float64)
    probs = fge.predict(x_test)
    # Reference: each member loaded into a fresh model, softmax, arithmetic mean.
    ref = []
    for sd in expected_members:
        fresh = make_model()
        fresh.load_state_dict(sd)
        ref.append(torch.softmax(fresh.eval()(x_test), dim=-1))
    torch.testing.assert_close(probs, torch.stack(ref).mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(probs.sum(-1), torch.ones(10, dtype=torch.float64))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Batch structures as in update_bn: (inputs, targets) and forward_fn.
    torch.testing.assert_close(fge.predict((x_test, None)), probs, rtol=0, atol=0)
    torch.testing.assert_close(
        fge.predict({"z": x_test}, forward_fn=lambda m, b: m(b["z"])), probs, rtol=0, atol=0
    )


def test_state_dict_round_trip_and_errors() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fge = FGE(model, opt, alpha1=0.1, alpha2=0.01, cycle=2, device="cpu")
    with pytest.raises(RuntimeError, match="empty"):
        fge.predict(torch.randn(2, 4, dtype=torch.float64))
    for x, y in batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        fge.step()
    model2 = make_model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    fge2 = FGE(model2, opt2, alpha1=0.1, alpha2=0.01, cycle=2)
    fge2.load_state_dict(fge.state_dict())
    assert len(fge2) == 2 and fge2.scheduler.last_epoch == 3
    x = torch.randn(5, 4, dtype=torch.float64)
    model.eval(), model2.eval()
    torch.testing.assert_close(fge2.predict(x), fge.predict(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="Invalid cycle: 3"):
        FGECyclicLR(opt, alpha1=0.1, alpha2=0.01, cycle=3)
    with pytest.raises(ValueError, match="Invalid FGE state_dict"):
        fge2.load_state_dict({"members": []})
