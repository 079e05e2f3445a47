import copy

import numpy as np
import pytest
import torch
from torch import nn

from flatmin.analysis import direction_norm, evaluate_ray, model_direction, random_direction

DT = torch.float64


def _net(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)
    ).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def test_filter_normalisation_matches_each_filter_norm():
    model = _net()
    d = random_direction(model, generator=torch.Generator().manual_seed(0))
    for name, w in model.named_parameters():
        if w.ndim >= 2:
            ref = torch.stack([w[i].norm() for i in range(w.shape[0])])  # per output filter
            got = torch.stack([d[name][i].norm() for i in range(w.shape[0])])
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
        else:
            assert torch.equal(d[name], torch.zeros_like(w))  # Li et al.: ignore biases and BN


def test_one_d_rules_layer_unit_none_and_name_filter():
    model = _net()
    params = dict(model.named_parameters())
    copy_d = random_direction(model, one_d="copy", generator=torch.Generator().manual_seed(1))
    assert torch.equal(copy_d["1.weight"], params["1.weight"])
    norm_d = random_direction(model, one_d="normalize", generator=torch.Generator().manual_seed(1))
    assert float(norm_d["4.bias"].norm()) == pytest.approx(
        float(params["4.bias"].norm()), rel=1e-12
    )
    layer = random_direction(model, norm="layer", generator=torch.Generator().manual_seed(1))
    for k in ("0.weight", "4.weight"):
        assert float(layer[k].norm()) == pytest.approx(float(params[k].norm()), rel=1e-12)
    unit = random_direction(model, norm="unit", generator=torch.Generator().manual_seed(1))
    assert direction_norm(unit) == pytest.approx(1.0, rel=1e-12)
    raw = random_direction(model, norm="none", one_d="normalize",
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():  # the raw stream: one randn per parameter, in order
        assert torch.equal(raw[name], torch.randn(p.shape, generator=g, dtype=DT))
    only_conv = random_direction(model, include=r"^0\.", generator=torch.Generator().manual_seed(1))
    full = random_direction(model, generator=torch.Generator().manual_seed(1))
    assert torch.equal(only_conv["0.weight"], full["0.weight"])
    assert torch.equal(only_conv["4.weight"], torch.zeros_like(full["4.weight"]))
    by_fn = random_direction(model, include=lambda n: n.startswith("4"),
                             generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(by_fn["4.weight"], full["4.weight"])
    model[4].weight.requires_grad_(False)
    frozen = random_direction(model, generator=torch.Generator().manual_seed(1))
    assert torch.equal(frozen["4.weight"], torch.zeros_like(full["4.weight"]))


def test_same_generator_same_direction_and_model_untouched():
    model = _net()
    before = [p.clone() for p in model.parameters()]
    a = random_direction(model, generator=torch.Generator().manual_seed(5))
    b = random_direction(model, generator=torch.Generator().manual_seed(5))
    c = random_direction(model, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert all(torch.equal(x, y) for x, y in zip(before, model.parameters()))


def test_relu_rescaling_gives_the_same_filter_normalised_curve():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    net = net.to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    data = [(torch.randn(20, 5, generator=g, dtype=DT), torch.randint(0, 3, (20,), generator=g))]
    scaled = copy.deepcopy(net)
    c = 7.5
    with torch.no_grad():  # ReLU(c z) = c ReLU(z): layer 1 (and its bias) ×c, layer 2 weight ×1/c
        scaled[0].weight.mul_(c)
        scaled[0].bias.mul_(c)
        scaled[2].weight.div_(c)
    ts = np.linspace(-1, 1, 9)
    loss = nn.functional.cross_entropy
    ce_net = evaluate_ray(
        net, loss, data, random_direction(net, generator=torch.Generator().manual_seed(3)), ts
    )
    ce_scaled = evaluate_ray(
        scaled, loss, data, random_direction(scaled, generator=torch.Generator().manual_seed(3)), ts
    )
    np.testing.assert_allclose(ce_scaled.loss["data"], ce_net.loss["data"], rtol=1e-10)
    # Without normalisation the curves differ: the check above is not vacuous.
    raw_net = evaluate_ray(
        net,
        loss,
        data,
        random_direction(net, norm="none", generator=torch.Generator().manual_seed(3)),
        ts,
    )
    raw_scaled = evaluate_ray(
        scaled,
        loss,
        data,
        random_direction(scaled, norm="none", generator=torch.Generator().manual_seed(3)),
        ts,
    )
    assert np.max(np.abs(raw_net.loss["data"] - raw_scaled.loss["data"])) > 1e-3


def test_model_direction_and_errors():
    a, b = _net(0), _net(1)
    d = model_direction(a, b)
    for name, p in a.named_parameters():
        torch.testing.assert_close(
            p + d[name], dict(b.named_parameters())[name], rtol=0, atol=1e-14
        )
    assert torch.equal(
        model_direction(a, b, include="^4")["0.weight"], torch.zeros(3, 1, 3, 3, dtype=DT)
    )
    with pytest.raises(ValueError, match="names differ"):
        model_direction(a, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Invalid norm: 'filters'"):
        random_direction(a, norm="filters")
    with pytest.raises(ValueError, match="Invalid one_d"):
        random_direction(a, one_d="skip")
    with pytest.raises(TypeError, match="Invalid include"):
        random_direction(a, include=3)
