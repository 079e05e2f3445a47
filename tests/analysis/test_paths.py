import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from flatmin.analysis import (
    AsymmetryResult,
    PathResult,
    PlaneResult,
    asymmetry,
    evaluate_plane,
    evaluate_ray,
    interpolate,
    model_direction,
    random_direction,
)

DT = torch.float64
CE = nn.functional.cross_entropy


def _bn_net(seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(12, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3),
    ).to(DT)  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _loader(seed, n_batches=3, bs=6):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(bs, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (bs,), generator=g))
        for _ in range(n_batches)
    ]


def _reference(model, data):
    """Independent eval: size-weighted mean loss and argmax error, model copy in eval mode."""
    m = copy.deepcopy(model).eval()
    tot = n = wrong = 0.0
    with torch.no_grad():
        for x, y in data:
            out = m(x)
            tot += float(CE(out, y)) * len(y)
            n += len(y)
            wrong += float((out.argmax(1) != y).sum())
    return tot / n, wrong / n


def _snapshot(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [b.detach().clone() for b in model.buffers()],
        [m.training for m in model.modules()],
        [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)],
    )


def _assert_same(model, snap):
    params, buffers, modes, momenta = snap
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert modes == [m.training for m in model.modules()]
    assert momenta == [
        m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _trained_pair():
    train, test = _loader(10), _loader(11, n_batches=2)
    a, b = _bn_net(0), _bn_net(1)
    for m in (a, b):
        update_bn(train, m)  # cumulative BN statistics over the training batches (reference)
    a.train()  # interpolate must not care about, nor change, the caller's mode
    return a, b, train, test


def test_interpolation_endpoints_equal_model_losses_under_recompute():
    a, b, train, test = _trained_pair()
    snap_a, snap_b = _snapshot(a), _snapshot(b)
    data = {"train": train, "test": test}
    res = interpolate(a, b, CE, data, [-0.5, 0.0, 0.5, 1.0, 1.5], bn="recompute", bn_batches=train)
    _assert_same(a, snap_a)
    _assert_same(b, snap_b)
    for name, batches in data.items():
        for idx, model in ((1, a), (3, b)):
            loss, err = _reference(model, batches)
            assert res.loss[name][idx] == pytest.approx(loss, rel=1e-12)
            assert res.error[name][idx] == pytest.approx(err, abs=1e-15)
    assert res.settings["bn"] == "recompute" and res.kind == "interpolation"


def test_interpolation_extrapolates_beyond_endpoints_like_a_built_model():
    a, b, train, test = _trained_pair()
    alphas = [-1.0, 0.3, 2.0]
    for bn in ("interpolate", "recompute", "frozen"):
        res = interpolate(a, b, CE, {"test": test}, alphas, bn=bn, bn_batches=train)
        for i, alpha in enumerate(alphas):
            ref = copy.deepcopy(a)
            with torch.no_grad():
                for p, pa, pb in zip(ref.parameters(), a.parameters(), b.parameters()):
                    p.copy_((1 - alpha) * pa + alpha * pb)
                if bn == "interpolate":
                    for (name, r), ba, bb in zip(ref.named_buffers(), a.buffers(), b.buffers()):
                        if r.is_floating_point():
                            r.copy_((1 - alpha) * ba + alpha * bb)
                        if name.endswith("running_var"):
                            r.clamp_(min=0.0)
            if bn == "recompute":
                update_bn(train, ref)
            loss, err = _reference(ref, test)
            assert res.loss["test"][i] == pytest.approx(loss, rel=1e-10), (bn, alpha)
            assert res.error["test"][i] == pytest.approx(err, abs=1e-15)


def test_asymmetry_matches_interpolation():
    a, b, _, test = _trained_pair()
    res = asymmetry(a, b, CE, {"test": test}, a=0.2)
    path = interpolate(a, b, CE, {"test": test}, [-0.2, 0.0, 0.2])
    np.testing.assert_array_equal(res.loss["test"], path.loss["test"])
    assert res.difference["test"] == path.loss["test"][2] - path.loss["test"][0]
    with pytest.raises(ValueError, match=r"Invalid a: -0\.1"):
        asymmetry(a, b, CE, test, a=-0.1)


def test_ray_matches_manual_evaluation_and_restores_model():
    model, train, test = _bn_net(3), _loader(20), _loader(21)
    update_bn(train, model)
    snap = _snapshot(model)
    d = random_direction(model, generator=torch.Generator().manual_seed(0))
    ts = np.array([-1.0, 0.0, 0.5, 2.0])
    res = evaluate_ray(model, CE, {"train": train, "test": test}, d, ts)
    rec = evaluate_ray(model, CE, test, d, ts, bn="recompute", bn_batches=iter(train))
    _assert_same(model, snap)
    for i, t in enumerate(ts):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p.add_(t * d[name])
        assert res.loss["test"][i] == pytest.approx(_reference(ref, test)[0], rel=1e-12)
        update_bn(train, ref)
        assert rec.loss["data"][i] == pytest.approx(_reference(ref, test)[0], rel=1e-12)


def test_max_batches_and_non_classification_error():
    model, data = _bn_net(4).eval(), _loader(30, n_batches=4)
    d = random_direction(model, generator=torch.Generator().manual_seed(1))
    res = evaluate_ray(model, CE, data, d, [0.0], max_batches=1)
    assert res.loss["data"][0] == pytest.approx(_reference(model, data[:1])[0], rel=1e-12)
    reg = nn.Linear(2, 1).to(DT)
    xs = [(torch.ones(4, 2, dtype=DT), torch.zeros(4, 1, dtype=DT))]
    out = evaluate_ray(reg, nn.functional.mse_loss, xs, random_direction(reg), [0.0, 1.0])
    assert np.isnan(out.error["data"]).all() and np.isfinite(out.loss["data"]).all()


def test_plane_matches_rays_and_two_model_directions():
    model, data = _bn_net(5), _loader(40)
    update_bn(data, model)
    g = torch.Generator().manual_seed(2)
    d1, d2 = random_direction(model, generator=g), random_direction(model, generator=g)
    snap = _snapshot(model)
    xs, ys = [-0.5, 0.0, 0.5], [0.0, 1.0]
    plane = evaluate_plane(model, CE, data, (d1, d2), xs, ys)
    _assert_same(model, snap)
    ray = evaluate_ray(model, CE, data, d1, xs)
    np.testing.assert_allclose(plane.loss["data"][:, 0], ray.loss["data"], rtol=1e-12)
    both = {k: d1[k] + d2[k] for k in d1}
    diag = evaluate_ray(model, CE, data, both, [1.0])
    assert plane.loss["data"][2, 1] != diag.loss["data"][0]  # (0.5, 1) is not (1, 1)
    ray2 = evaluate_ray(model, CE, data, {k: 0.5 * d1[k] + d2[k] for k in d1}, [1.0])
    assert plane.loss["data"][2, 1] == pytest.approx(ray2.loss["data"][0], rel=1e-12)
    # the direction between two models reaches the other model at t = 1 (parameters only)
    other = _bn_net(6)
    with torch.no_grad():
        for bo, bm in zip(other.buffers(), model.buffers()):
            bo.copy_(bm)
    to_other = evaluate_ray(model, CE, data, model_direction(model, other), [1.0])
    assert to_other.loss["data"][0] == pytest.approx(_reference(other, data)[0], rel=1e-10)


def test_generator_iterators_and_results_round_trip(tmp_path):
    model, data = _bn_net(7), _loader(50)
    d = random_direction(model, generator=torch.Generator().manual_seed(3))
    res = evaluate_ray(model, CE, {"a": iter(data), "b": (b for b in data)}, d, [0.0, 1.0])
    np.testing.assert_array_equal(res.loss["a"], res.loss["b"])
    res.save(tmp_path / "ray")
    back = PathResult.load(tmp_path / "ray.npz")
    assert back.kind == "ray" and back.settings == res.settings
    np.testing.assert_array_equal(back.loss["a"], res.loss["a"])
    plane = evaluate_plane(model, CE, data, (d, d), [0.0], [0.0, 1.0])
    plane.save(tmp_path / "plane")
    assert PlaneResult.load(tmp_path / "plane").loss["data"].shape == (1, 2)
    a, b, _, test = _trained_pair()
    asym = asymmetry(a, b, CE, test)
    asym.save(tmp_path / "asym")
    assert AsymmetryResult.load(tmp_path / "asym").difference == asym.difference
    with pytest.raises(TypeError, match="PlaneResult"):
        PathResult.load(tmp_path / "plane")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bn": "interpolate"}, "Invalid bn"),
        ({"bn": "recompute"}, "Invalid bn_batches"),
        ({"t": []}, "Invalid t"),
        ({"t": [float("nan")]}, "Invalid t"),
        ({"max_batches": 0}, "Invalid max_batches"),
        ({"direction": {"nope": torch.zeros(1)}}, "unknown parameter"),
        ({"bn_mode": "train"}, "Invalid bn_mode"),
    ],
)
def test_ray_errors(kwargs, match):
    model = _bn_net(8)
    snap = _snapshot(model)
    args = {"direction": random_direction(model), "t": [0.0, 1.0]}
    args.update(kwargs)
    d, t = args.pop("direction"), args.pop("t")
    with pytest.raises(ValueError, match=match):
        evaluate_ray(model, CE, _loader(1), d, t, **args)
    _assert_same(model, snap)


def test_interpolate_rejects_different_architectures():
    with pytest.raises(ValueError, match="same architecture"):
        interpolate(_bn_net(0), nn.Linear(2, 2).to(DT), CE, _loader(1), [0.0])
