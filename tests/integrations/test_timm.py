"""timm with flatmin: its cosine scheduler drives SAM, ModelEmaV3 equals WeightAveraging(ema).

Skipped where timm does not import: timm 1.0 requires torchvision, whose PyPI wheels are CUDA
builds that fail to import beside the CPU torch 2.13 of the test environment, so CI cannot run
these (see docs/integrations/timm.md).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

timm = pytest.importorskip(
    "timm",
    reason="timm needs torchvision, which has no wheel that imports beside torch 2.13 CPU here",
)

import flatmin  # noqa: E402
from flatmin.optim.rho_schedule import ProportionalRho  # noqa: E402

F = nn.functional
DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "timm.md"
LR, LR_MIN, WARMUP_T, WARMUP_INIT, T_INITIAL = 0.1, 1e-3, 3, 1e-2, 8


def _model():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=4)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _cosine_lr(t):
    """timm's CosineLRScheduler (one cycle, warmup not as prefix) written out."""
    if t < WARMUP_T:
        return WARMUP_INIT + t * (LR - WARMUP_INIT) / WARMUP_T
    if t >= T_INITIAL:
        return LR_MIN
    return LR_MIN + 0.5 * (LR - LR_MIN) * (1 + math.cos(math.pi * t / T_INITIAL))


def test_cosine_scheduler_and_proportional_rho_drive_sam():
    from timm.scheduler import CosineLRScheduler

    x, y = _data()
    model = _model()
    opt = flatmin.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9)
    sched = CosineLRScheduler(
        opt,
        t_initial=T_INITIAL,
        lr_min=LR_MIN,
        warmup_t=WARMUP_T,
        warmup_lr_init=WARMUP_INIT,
        t_in_epochs=False,
    )
    rho = ProportionalRho(opt, rho_min=0.01, lr_min=LR_MIN)
    assert opt.param_groups[0]["lr"] == pytest.approx(WARMUP_INIT)

    # The same SAM steps with the closed-form learning rate set by hand.
    ref = _model()
    ref_opt = flatmin.SAM(ref.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9)
    for t in range(1, T_INITIAL + 2):
        lr_t = _cosine_lr(t - 1)
        for group in ref_opt.param_groups:
            group["lr"] = lr_t
            group["rho"] = 0.01 + (0.05 - 0.01) * (lr_t - LR_MIN) / (LR - LR_MIN)
        ref_opt.step(_closure(ref_opt, ref, x, y), model=ref, same_rng=True)

        opt.step(_closure(opt, model, x, y), model=model, same_rng=True)
        sched.step_update(t)
        rho.step()
        lr_next = _cosine_lr(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_next, rel=1e-12)
        assert opt.base_optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        expected_rho = 0.01 + 0.04 * (lr_next - LR_MIN) / (LR - LR_MIN)
        assert opt.param_groups[0]["rho"] == pytest.approx(expected_rho, rel=1e-12)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("warmup", [False, True])
def test_model_ema_v3_equals_weight_averaging(warmup):
    from timm.utils import ModelEmaV3

    x, y = _data()
    model = _model()
    opt = flatmin.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9)
    if warmup:
        timm_ema = ModelEmaV3(model, decay=0.9, use_warmup=True, warmup_power=0.75, warmup_gamma=2)
        ema = flatmin.WeightAveraging(
            model, mode="ema", decay=0.9, warmup_power=0.75, warmup_gamma=2
        )
    else:
        timm_ema = ModelEmaV3(model, decay=0.9)
        ema = flatmin.WeightAveraging(model, mode="ema", decay=0.9)
        ema.update()  # ModelEmaV3 starts from a copy of the model: so does this average
    for t in range(1, 7):
        opt.step(_closure(opt, model, x, y), model=model, same_rng=True)
        ema.update()
        if warmup:
            timm_ema.update(model, step=t)
        else:
            timm_ema.update(model)
    averaged = ema.averaged_state_dict()
    timm_state = timm_ema.module.state_dict()
    assert set(averaged) == set(timm_state)
    for name, value in timm_state.items():
        assert torch.equal(averaged[name], value), name
    # Not a trivial equality: the average differs from the live weights.
    assert not torch.equal(averaged["fc.weight"], model.state_dict()["fc.weight"])


def test_documentation_code_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "timm_doc"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # ... but an example that misuses SAM (backward() before step(closure)) fails.
        warnings.filterwarnings("error", message=".*found gradients computed before")
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
