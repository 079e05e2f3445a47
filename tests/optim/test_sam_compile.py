"""``SAM(compile=...)``: the perturbation through ``torch.compile`` (inductor on CPU), in float32.

The compiled path is the rule's reference form fused by the compiler, so it must agree with the
single-tensor reference (and the foreach kernel) up to the order of summation: 1e-6 in float32
over a few steps, for every ball, ASAM, Fisher-SAM, SAM-ON and variants that change the direction
or the combination. Where it does not apply (ESAM's random subsets) the kernels run, bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import flatmin
from flatmin.optim.rules import Fisher, sam_on

pytestmark = pytest.mark.slow  # inductor compiles a C++ kernel per configuration

STEPS = 4
TOL = {"rtol": 0, "atol": 1e-6}


def _model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.LayerNorm(24), nn.Tanh(), nn.Linear(24, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g))
            for _ in range(STEPS)]  # fmt: skip


def _run(cls: str, kw: dict[str, Any], **options: Any) -> tuple[torch.Tensor, Any]:
    model = _model()
    kw = dict(kw)
    if kw.get("rule") == "sam_on":
        kw["rule"] = sam_on(model)
    params = list(model.parameters())
    groups = [{"params": params[:2], "rho": 0.07}, {"params": params[2:]}]
    opt = getattr(flatmin, cls)(groups, torch.optim.SGD, **{"rho": 0.1, **kw}, lr=0.2,
                                momentum=0.9, **options)  # fmt: skip
    for i, (x, y) in enumerate(_batches()):

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        if i == 1:  # a scheduler's new rho: no stale value baked into the compiled code
            opt.param_groups[1]["rho"] = 0.13
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt


CASES = {
    "l2": ("SAM", {}),
    "linf": ("SAM", {"p": math.inf}),
    "l3": ("SAM", {"p": 3.0}),
    "asam": ("SAM", {"adaptive": True}),
    "fisher": ("SAM", {"rule": Fisher(eta=1.0)}),
    "sam_on": ("SAM", {"rule": "sam_on"}),
    "msam": ("MomentumSAM", {"rho": 0.3}),  # the direction is −m: a negative radius
}


@pytest.mark.parametrize("case", CASES)
def test_the_compiled_perturbation_equals_the_reference_kernel_in_float32(case: str) -> None:
    cls, kw = CASES[case]
    # A frame compiled earlier in this process would be reused from dynamo's cache: start
    # from an empty cache so that the counter shows that this optimizer's compiled code ran.
    torch._dynamo.reset()
    frames = counters["frames"]["ok"]
    compiled, _ = _run(cls, kw, compile=True)
    assert counters["frames"]["ok"] > frames  # the compiled function ran
    reference, _ = _run(cls, kw, foreach=False)
    kernel, _ = _run(cls, kw)
    assert not torch.equal(reference, torch.cat([p.reshape(-1) for p in _model().parameters()]))
    torch.testing.assert_close(compiled, reference, **TOL)
    torch.testing.assert_close(compiled, kernel, **TOL)


def test_compile_options_reach_torch_compile_and_a_bad_value_is_a_type_error() -> None:
    compiled, opt = _run("SAM", {}, compile={"backend": "aot_eager"})
    reference, _ = _run("SAM", {}, foreach=False)
    torch.testing.assert_close(compiled, reference, **TOL)
    assert opt._compiled is not None
    with pytest.raises(TypeError, match="Invalid compile: 'yes'"):
        flatmin.SAM(_model().parameters(), torch.optim.SGD, compile="yes", lr=0.1)


def test_random_subsets_keep_the_kernel_bit_for_bit() -> None:
    kw = {"beta": 0.5, "gamma": 1.0}
    frames = counters["frames"]["total"]
    compiled, _ = _run("ESAM", kw, compile=True)
    assert counters["frames"]["total"] == frames  # nothing was compiled
    kernel, _ = _run("ESAM", kw)
    assert torch.equal(compiled, kernel)
