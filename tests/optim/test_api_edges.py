"""API edges that used to fail late or silently (issue #21, item 7): each is refused up front."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flatmin
from flatmin.analysis import sharpness


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _closure(opt, model):
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    ("base", "message"),
    [
        (torch.optim.LBFGS, r"Invalid base_optimizer: LBFGS \(its step\(\) requires a closure"),
        (torch.optim.SparseAdam, r"Invalid base_optimizer: SparseAdam \(it needs sparse"),
        (flatmin.SAM, r"Invalid base_optimizer: SAM \(a SAM-family optimizer cannot be the base"),
        (flatmin.GSAM, r"Invalid base_optimizer: GSAM \(a SAM-family optimizer cannot be"),
        ("not an optimizer", r"Invalid base_optimizer: 'not an optimizer' \(expected a torch"),
    ],
)
def test_refuses_base_optimizers_sam_cannot_drive(base, message):
    with pytest.raises(TypeError, match=message):
        flatmin.SAM(_model().parameters(), base, lr=0.1)


def test_refuses_instances_sam_cannot_drive():
    model = _model()
    with pytest.raises(TypeError, match=r"Invalid base_optimizer: LBFGS \(its step\(\) requires"):
        flatmin.SAM(None, torch.optim.LBFGS(model.parameters()))
    inner = flatmin.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=r"Invalid base_optimizer: SAM \(a SAM-family optimizer"):
        flatmin.LookSAM(None, inner)
    # Nothing of the inner optimizer was touched by the refusal.
    assert set(inner.param_groups[0]) - {"params"} == {
        "rho", "p", "adaptive", "eta", "lr", "momentum", "dampening", "weight_decay",
        "nesterov", "maximize", "foreach", "differentiable", "fused",
    }  # fmt: skip


def test_load_state_of_another_base_class_is_refused_and_changes_nothing():
    model, other_model = _model(), _model()
    sgd = flatmin.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sgd.step(_closure(sgd, model))
    adamw = flatmin.SAM(other_model.parameters(), torch.optim.AdamW, lr=0.01)
    adamw.step(_closure(adamw, other_model))
    before = copy.deepcopy(adamw.state_dict())
    with pytest.raises(
        ValueError,
        match=r"Invalid SAM state_dict: saved with base optimizer SGD, but this SAM's base "
        r"optimizer is AdamW",
    ):
        adamw.load_state_dict(sgd.state_dict())
    after = adamw.state_dict()
    assert after["sam"]["param_groups"] == before["sam"]["param_groups"]
    for index, entry in before["base"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["base"]["state"][index][key], value), key
    adamw.step(_closure(adamw, other_model))  # still steps as an AdamW SAM


def test_state_saved_before_the_base_was_recorded_still_loads():
    model = _model()
    opt = flatmin.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.step(_closure(opt, model))
    state = copy.deepcopy(opt.state_dict())
    del state["variant"]["hyper"]["base_optimizer"]  # the layout of earlier flatmin releases
    twin = flatmin.SAM(_model().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    twin.load_state_dict(state)
    assert twin.steps_taken == 1


@pytest.mark.parametrize(
    ("batches", "error", "message"),
    [
        ("bare", TypeError, r"Invalid batch 0: Tensor \(expected a pair \(inputs, targets\)"),
        ("pair", TypeError, r"Invalid batch 0: Tensor .*pass \[\(x, y\)\] for a single batch"),
        ("three", ValueError, r"Invalid batch 0: 3 values \(expected a pair \(inputs, targets\)"),
    ],
)
def test_sharpness_says_a_batch_is_inputs_and_targets(batches, error, message):
    # A two-row x once unpacked silently into inputs and targets; three values did not unpack.
    x, y = torch.randn(2, 3), torch.randn(2, 2)
    data = {"bare": [x], "pair": (x, y), "three": [(x, y, y)]}[batches]
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        sharpness(model, nn.functional.mse_loss, data)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert sharpness(model, nn.functional.mse_loss, [[x, y]]).values.shape == (1,)


@pytest.mark.parametrize("layout", ["variant-without-base", "sam-and-base-only"])
@pytest.mark.parametrize(
    ("saved", "live", "foreign"),
    [
        ((torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), torch.optim.AdamW, "'dampening'"),
        ((torch.optim.Adam, {"lr": 0.01}), torch.optim.SGD, "'amsgrad', 'betas'"),
    ],
    ids=["sgd-into-adamw", "adam-into-sgd"],
)
def test_an_older_state_of_another_base_class_is_refused_by_its_keys(layout, saved, live, foreign):
    """Older layouts name no base class: its groups' keys (SGD's momentum) still tell it."""
    model = _model()
    cls, kwargs = saved
    old = flatmin.SAM(model.parameters(), cls, **kwargs)
    old.step(_closure(old, model))
    state = copy.deepcopy(old.state_dict())
    del state["variant"]["hyper"]["base_optimizer"]
    if layout == "sam-and-base-only":
        del state["variant"]
    target = flatmin.SAM(_model().parameters(), live, lr=0.01)
    with pytest.raises(ValueError, match=rf"its param groups hold \[{foreign}"):
        target.load_state_dict(state)
    assert target.steps_taken == 0 and not target.base_optimizer.state  # nothing was loaded


def test_an_older_state_of_the_same_base_class_still_loads_in_both_layouts():
    model = _model()
    opt = flatmin.SAM(model.parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    opt.step(_closure(opt, model))
    state = copy.deepcopy(opt.state_dict())
    del state["variant"]
    twin = flatmin.SAM(_model().parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    twin.load_state_dict(state)
    assert twin.base_optimizer.state  # the base's state arrived
