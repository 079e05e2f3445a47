"""The BatchNorm helper for SAM's second pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatmin import SAM
from flatmin.optim.bn import frozen_bn_stats


def _bn_net(momentum):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.BatchNorm1d(8, momentum=momentum),
        nn.Linear(8, 3),
    )


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_bit_identical_across_the_block(momentum):
    model = _bn_net(momentum)
    model(torch.randn(5, 1, 8, 8))  # non-trivial statistics
    before = _buffers(model)
    params_before = [p.clone() for p in model.parameters()]
    with frozen_bn_stats(model):
        out = model(torch.randn(5, 1, 8, 8) * 3 + 1)
        out.sum().backward()
        # Inside the block the layers really ran in training mode with batch statistics.
        changed = _buffers(model)
        assert not torch.equal(changed["1.running_mean"], before["1.running_mean"])
    after = _buffers(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert after["1.num_batches_tracked"].item() == 1
    for a, b in zip(params_before, model.parameters()):
        assert torch.equal(a, b)
    assert not any(hasattr(m, "_flatmin_backup") for m in model.modules())
    assert {k for m in model.modules() for k in vars(m)} == {
        k for m in _bn_net(momentum).modules() for k in vars(m)
    }


def test_restores_on_error():
    model = _bn_net(0.1)
    before = _buffers(model)
    with pytest.raises(ZeroDivisionError), frozen_bn_stats(model):
        model(torch.randn(4, 1, 8, 8))
        raise ZeroDivisionError
    for name, value in _buffers(model).items():
        assert torch.equal(value, before[name])


def test_none_is_a_noop():
    with frozen_bn_stats(None):
        pass


def test_sam_step_with_model_updates_bn_once_per_step():
    """step(closure, model=...) leaves the statistics the first pass produced, as plain SGD does."""
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    m_sgd, m_sam = _bn_net(None), _bn_net(None)
    # Expected statistics after one step: those of one forward pass at the initial weights.
    m_sgd(x)
    opt = SAM(m_sam.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m_sam(x), y)
        loss.backward()
        return loss

    opt.step(closure, model=m_sam)
    for (name, a), (_, b) in zip(m_sgd.named_buffers(), m_sam.named_buffers()):
        assert torch.equal(a, b), name
