"""Non-finite losses and gradients in the analysis: reported as NaN, never a crash or garbage."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from torch import nn

from flatmin._io import finite_json
from flatmin.analysis import (
    PathResult,
    SharpnessResult,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    sharpness,
)
from helpers.faults import (
    strict_json,
)

# -- non-finite results ----------------------------------------------------------------------------


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.arange(n) % 3)]


class _BlowsUp(nn.Module):
    """A linear model whose output is NaN once any logit exceeds 5 in magnitude."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3).double()

    def forward(self, x):
        y = self.fc(x)
        return y + torch.where(y.abs().max() > 5, torch.nan, 0.0)


def test_worst_case_sharpness_is_nan_when_the_perturbed_loss_is(tmp_path):
    net = _BlowsUp()
    assert torch.isfinite(net(_data()[0][0])).all()  # finite at w
    res = sharpness(net, nn.functional.cross_entropy, _data(), rho=100.0)
    assert math.isnan(res.mean) and math.isnan(res.values[0]) and not res.finite  # was 0.0
    assert math.isnan(res.perturbed_loss[0]) and math.isfinite(res.base_loss[0])
    # Saved and loaded: strict JSON, NaN restored.
    _, js = res.save(tmp_path / "sharp")
    meta = strict_json(js.read_text())
    assert meta["fields"]["mean"] == "NaN" and "fields.mean" in meta["nonfinite"]
    back = SharpnessResult.load(tmp_path / "sharp")
    assert math.isnan(back.mean) and back.settings == res.settings


def test_a_huge_radius_is_not_dropped_by_an_overflowing_norm():
    """‖δ‖² overflows float64 for ρ = 1e300: the projection used to scale δ by ρ/inf = 0."""
    net = nn.Linear(4, 3).double()
    res = sharpness(net, nn.functional.cross_entropy, _data(), rho=1e300)
    assert not res.finite or res.mean > 1e100  # never the unperturbed loss (a sharpness of 0)


def test_sharpness_is_nan_when_the_gradient_is(tmp_path):
    """A finite loss with a NaN gradient (sqrt at 0): no ascent direction, not a sharpness of 0."""
    net = nn.Linear(4, 3).double()

    def loss_fn(out, y):
        z = (out**2).sum()
        return torch.sqrt(z - z.detach())  # 0, with d/dw = inf * 0 = NaN

    res = sharpness(net, loss_fn, _data(), rho=0.1)
    assert math.isnan(res.mean) and not res.finite
    finite = sharpness(net, nn.functional.cross_entropy, _data(), rho=0.1)
    assert finite.finite and finite.mean > 0


def test_hessian_of_a_nan_loss_is_nan_not_lapack_garbage():
    net = nn.Linear(4, 3).double()

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out, y) * float("nan")

    for method in ("lanczos", "power"):
        eig = hessian_eigenvalues(net, loss_fn, _data(), k=2, method=method, max_iter=5)
        assert eig.eigenvalues.shape == (2,) and np.all(np.isnan(eig.eigenvalues)), method
        assert not eig.finite
    tr = hessian_trace(net, loss_fn, _data(), n_samples=3)
    assert math.isnan(tr.trace) and not tr.finite
    spec = hessian_spectrum(net, loss_fn, _data(), steps=4)
    assert np.all(np.isnan(spec.nodes)) and not spec.finite
    ok = hessian_eigenvalues(net, nn.functional.cross_entropy, _data(), k=2)
    assert ok.finite


def test_landscape_lists_where_a_loss_is_not_finite():
    from flatmin.bench.analyze import LandscapeResult

    coords = np.linspace(-1, 1, 5)
    ok = PathResult("ray", coords, {"test": np.ones(5)}, {"test": np.zeros(5)})
    bad = PathResult("ray", coords, {"test": np.array([np.inf, 1, 1, 1, np.nan])},
                     {"test": np.zeros(5)})  # fmt: skip
    result = LandscapeResult(rays={"sam-s0": ok, "swa-s0": bad})
    assert result.nonfinite() == ["ray swa-s0: test loss at 2 of 5 points"]
    assert LandscapeResult(rays={"sam-s0": ok}).nonfinite() == []


def test_finite_json_flags_every_nonfinite_value():
    value = {"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "NaN", "e": None}
    clean, bad = finite_json(value)
    assert clean == {"a": [1.0, None], "b": {"c": None}, "d": "NaN", "e": None}
    assert bad == ["a.1", "b.c"]
    strict_json(json.dumps(clean, allow_nan=False))


def test_sharpness_cli_with_a_huge_rho_exits_1_withstrict_json(checkpoint, tmp_path, cli):
    out = tmp_path / "sharp.json"
    code, stdout, err = cli(
        "sharpness", str(checkpoint), "--rho", "1e20", "--max-batches", "1",
        "--hessian-iters", "3", "--trace-samples", "2", "--out", str(out),
    )  # fmt: skip
    assert code == 1
    printed = strict_json(stdout)
    assert printed == strict_json(out.read_text())
    assert printed["worst_case_sharpness"]["mean"] is None  # not 0.0
    assert "worst_case_sharpness.mean" in printed["nonfinite"]
    assert err.startswith("flatmin sharpness: error: non-finite results")
    assert "worst_case_sharpness.mean" in err


