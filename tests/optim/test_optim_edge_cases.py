"""Edge cases of flatmin.optim: the foreach kernel's scale ``T`` and SAM's ``eps`` check.

The numerical reference is the ε̂ formula written out by hand in float64 (Foret et al. eq. 2 with
ASAM's and Fisher-SAM's scale), not the rules' own reference form.
"""

from __future__ import annotations

import math

import pytest
import torch

import flatmin
from flatmin.optim.rules import Fisher, LpBall, PerturbGroup

DT = torch.float64


class _Counting(Fisher):
    """Fisher-SAM that counts the calls of its foreach scale."""

    def __init__(self, eta: float) -> None:
        super().__init__(eta)
        self.calls: list[int] = []

    def scales_foreach(self, params, grads, group):
        self.calls.append(len(params))
        return super().scales_foreach(params, grads, group)


class _CountingLp(LpBall):
    def __init__(self) -> None:
        self.calls: list[int] = []

    def scales_foreach(self, params, grads, group):
        self.calls.append(len(params))
        return super().scales_foreach(params, grads, group)


def _by_hand(params, grads, settings, fisher_eta, p, eps):
    """ε̂ per tensor (None: not moved), the formula written out, over all groups of one ball."""
    q = 1.0 if math.isinf(p) else p / (p - 1.0)
    ts, hs = [], []
    for (_, adaptive, eta, _), ws, gs in zip(settings, params, grads):
        t_group = []
        for w, g in zip(ws, gs):
            t = torch.ones_like(w)
            if fisher_eta is not None:
                t = t / torch.sqrt(1.0 + fisher_eta * g * g)
            if adaptive:
                t = t * (w.abs() + eta)
            t_group.append(t)
        ts.append(t_group)
        hs.append([t * g for t, g in zip(t_group, gs)])
    denom = sum(float((h.abs() ** q).sum()) for hg in hs for h in hg) ** (1.0 / p) + eps
    out = []
    for (rho, _, _, mask), t_group, h_group in zip(settings, ts, hs):
        row = []
        for i, (t, h) in enumerate(zip(t_group, h_group)):
            if mask is not None and not mask[i]:
                row.append(None)
            elif math.isinf(p):
                row.append(t * rho * torch.sign(h))
            else:
                row.append(t * rho * torch.sign(h) * h.abs() ** (q - 1.0) / denom)
        out.append(row)
    return out


@pytest.mark.parametrize("p", [2.0, 3.0, math.inf])
@pytest.mark.parametrize("fisher_eta", [None, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_foreach_kernel_computes_the_scale_once_per_group_and_matches_the_formula(
    p, fisher_eta, masked
):
    g = torch.Generator().manual_seed(3)
    shapes = [[(3, 4), (5,)], [(2, 3, 2), (4,), (1,)]]
    params = [[torch.randn(s, generator=g, dtype=DT) for s in group] for group in shapes]
    params[0][0] = params[0][0].t()  # a non-contiguous tensor
    grads = [[torch.randn(w.shape, generator=g, dtype=DT) for w in ws] for ws in params]
    masks = [[True, False], [False, True, True]] if masked else [None, None]
    # (rho, adaptive, eta, mask): an ASAM group and a plain one, one ball (same p).
    settings = [(0.2, True, 0.05, masks[0]), (0.1, False, 0.01, masks[1])]
    rule = _CountingLp() if fisher_eta is None else _Counting(fisher_eta)
    moved = [[w.clone() for w in ws] for ws in params]
    groups = [
        PerturbGroup(ws, gs, rho, p, adaptive, eta, mask)
        for ws, gs, (rho, adaptive, eta, mask) in zip(moved, grads, settings)
    ]
    rule.perturb_(groups, 1e-12, foreach=True)
    # One T per group per step, over all its tensors (masked ones count towards the norm).
    assert rule.calls == [2, 3]
    ref = _by_hand(params, grads, settings, fisher_eta, p, 1e-12)
    for ws, w0s, es in zip(moved, params, ref):
        for w, w0, e in zip(ws, w0s, es):
            torch.testing.assert_close(w, w0 if e is None else w0 + e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("eps", "exc", "match"),
    [
        (-1.0, ValueError, r"Invalid eps: -1\.0"),
        (math.nan, ValueError, r"Invalid eps: nan"),
        (math.inf, ValueError, r"Invalid eps: inf"),
        ("1e-12", TypeError, r"Invalid eps: '1e-12'"),
        (True, TypeError, r"Invalid eps: True"),
    ],
)
def test_sam_eps_is_checked_like_every_other_value(eps, exc, match):
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(exc, match=match):
        flatmin.SAM([w], torch.optim.SGD, eps=eps, lr=0.1)
    assert flatmin.SAM([w], torch.optim.SGD, eps=0, lr=0.1).eps == 0.0
