"""WASAM: SAM's trajectory, averaged only at unperturbed iterates; one checkpoint for all."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from flatmin.optim.averaging import WeightAveraging
from flatmin.optim.sam import SAM
from flatmin.optim.wasam import WASAM


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def batches(n: int):
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(8, 4, generator=g, dtype=torch.float64),
            torch.randn(8, 2, generator=g, dtype=torch.float64),
        )
        for _ in range(n)
    ]


def manual_step(model, opt, x, y) -> None:
    nn.functional.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nn.functional.mse_loss(model(x), y).backward()
    opt.second_step(zero_grad=True)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_average_is_the_mean_of_the_unperturbed_sam_iterates() -> None:
    data = batches(7)
    # Reference trajectory: plain SAM, recording w after each second_step.
    ref_model = make_model()
    ref = SAM(ref_model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    iterates = []
    for x, y in data:
        manual_step(ref_model, ref, x, y)
        iterates.append(params(ref_model))

    model = make_model()
    opt = WASAM(model, torch.optim.SGD, rho=0.2, start=3, every=2, lr=0.1, momentum=0.9)
    seen_lrs = []
    for x, y in data:
        manual_step(model, opt, x, y)
        seen_lrs.append(opt.param_groups[0]["lr"])
    assert seen_lrs == [0.1] * 7  # averaging never touches the learning rate
    # Same trajectory as SAM, bit for bit.
    for name, p in params(model).items():
        assert torch.equal(p, iterates[-1][name]), name
    assert opt.averaging.n_averaged == 3  # steps 3, 5, 7
    avg = opt.averaging.averaged_tensors()
    for name in iterates[0]:
        expected = sum(iterates[k - 1][name] for k in (3, 5, 7)) / 3
        torch.testing.assert_close(avg[name], expected, rtol=1e-12, atol=1e-14)


def test_closure_step_averages_once_per_step() -> None:
    model = make_model()
    opt = WASAM(model, torch.optim.SGD, rho=0.1, lr=0.1)
    iterates = []
    for x, y in batches(4):

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        iterates.append(params(model))
    assert opt.averaging.count == 4 and opt.averaging.n_averaged == 4
    for name, t in opt.averaging.averaged_tensors().items():
        torch.testing.assert_close(t, sum(it[name] for it in iterates) / 4, rtol=1e-12, atol=0)


def test_manual_averaging_per_epoch() -> None:
    model = make_model()
    opt = WASAM(model, torch.optim.SGD, rho=0.1, start=2, average_on_step=False, lr=0.1)
    data = batches(6)
    epoch_ends = []
    for epoch in range(3):
        for x, y in data[2 * epoch : 2 * epoch + 2]:
            manual_step(model, opt, x, y)
        opt.averaging.update()  # the caller's unit: one epoch
        epoch_ends.append(params(model))
    assert opt.averaging.count == 3 and opt.averaging.n_averaged == 2
    avg = opt.averaging.averaged_tensors()
    for name in avg:
        expected = (epoch_ends[1][name] + epoch_ends[2][name]) / 2
        torch.testing.assert_close(avg[name], expected, rtol=1e-12, atol=0)


def test_one_state_dict_resumes_sam_base_and_average() -> None:
    data = batches(8)

    def fresh():
        model = make_model()
        return model, WASAM(model, torch.optim.SGD, rho=0.1, start=2, lr=0.1, momentum=0.9)

    model, opt = fresh()
    for x, y in data:
        manual_step(model, opt, x, y)

    model2, opt2 = fresh()
    for x, y in data[:4]:
        manual_step(model2, opt2, x, y)
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    assert set(ckpt["opt"]) == {"sam", "base", "variant"}
    assert set(ckpt["opt"]["variant"]["extra"]) == {"averaging"}
    model3, opt3 = fresh()
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    for x, y in data[4:]:
        manual_step(model3, opt3, x, y)
    for name, p in params(model).items():
        assert torch.equal(params(model3)[name], p), name
    for name, t in opt.averaging.averaged_tensors().items():
        assert torch.equal(opt3.averaging.averaged_tensors()[name], t), name
    with pytest.raises(ValueError, match="variant"):
        opt3.load_state_dict(opt.state_dict()["sam"])


def test_wasam_is_a_sam_with_a_weight_averaging() -> None:
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = WASAM(model, base, rho=0.1, mode="ema", decay=0.5)
    assert isinstance(opt, SAM) and opt.base_optimizer is base
    assert isinstance(opt.averaging, WeightAveraging) and opt.averaging.mode == "ema"
    with pytest.raises(TypeError, match="average_on_step"):
        WASAM(model, torch.optim.SGD, average_on_step=1, lr=0.1)
    with pytest.raises(ValueError, match="Invalid every: 0"):
        WASAM(model, torch.optim.SGD, every=0, lr=0.1)
    with pytest.raises(ValueError, match="Invalid rho"):
        WASAM(model, torch.optim.SGD, rho=-1.0, lr=0.1)


def test_load_state_dict_with_a_bad_average_changes_nothing() -> None:
    import copy

    data = batches(4)
    model = make_model()
    opt = WASAM(model, torch.optim.SGD, rho=0.1, start=2, lr=0.1, momentum=0.9)
    for x, y in data:
        manual_step(model, opt, x, y)
    saved = copy.deepcopy(opt.state_dict())
    other_model = make_model()
    other = WASAM(other_model, torch.optim.SGD, rho=0.3, start=2, lr=0.5, momentum=0.9)
    manual_step(other_model, other, *data[0])
    before = copy.deepcopy(other.state_dict())
    bad = copy.deepcopy(saved)
    bad["variant"]["extra"]["averaging"]["n_averaged"] = 9
    with pytest.raises(ValueError, match="n_averaged=9"):
        other.load_state_dict(bad)
    after = other.state_dict()
    assert after["sam"]["param_groups"] == before["sam"]["param_groups"]  # lr 0.5, rho 0.3 kept
    for name, t in before["variant"]["extra"]["averaging"]["shadow"].items():
        assert torch.equal(after["variant"]["extra"]["averaging"]["shadow"][name], t)
    assert other.averaging.n_averaged == before["variant"]["extra"]["averaging"]["n_averaged"]
    other.load_state_dict(saved)
    assert other.param_groups[0]["lr"] == 0.1
