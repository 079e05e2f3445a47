import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from flatmin._curvature import (
    flat_to_tensors,
    functional_hvp,
    hvp,
    tensors_to_flat,
    trainable_parameters,
)

DT = torch.float64


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _mlp(seed: int = 0) -> nn.Module:
    return _init(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT), seed)


def _data(seed: int = 1, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _dense_hessian(model, loss_fn, x, y):
    names = list(trainable_parameters(model))
    shapes = [p.shape for p in trainable_parameters(model).values()]
    flat0 = tensors_to_flat(list(trainable_parameters(model).values())).detach()

    def f(flat):
        chunks = flat_to_tensors(flat, [torch.empty(s) for s in shapes])
        return loss_fn(functional_call(model, dict(zip(names, chunks)), (x,)), y)

    return hessian(f)(flat0)


def _vec(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=DT) for p in model.parameters()]


def test_hvp_matches_dense_torch_func_hessian():
    model, (x, y) = _mlp(), _data()
    loss_fn = nn.functional.cross_entropy
    v = _vec(model)
    hv = hvp(loss_fn(model(x), y), list(model.parameters()), v)
    ref = _dense_hessian(model, loss_fn, x, y) @ tensors_to_flat(v)
    torch.testing.assert_close(tensors_to_flat(hv), ref, rtol=1e-10, atol=1e-12)


def test_hvp_matches_central_finite_differences():
    model, (x, y) = _mlp(2), _data(3)
    loss_fn = nn.functional.cross_entropy
    params = list(model.parameters())
    v = _vec(model, 7)
    hv = tensors_to_flat(hvp(loss_fn(model(x), y), params, v))
    h = 1e-5

    def grad_at(sign):
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.add_(sign * h * vi)
        g = torch.autograd.grad(loss_fn(model(x), y), params)
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.sub_(sign * h * vi)
        return tensors_to_flat(g)

    fd = (grad_at(1.0) - grad_at(-1.0)) / (2 * h)
    torch.testing.assert_close(hv, fd, rtol=1e-7, atol=1e-8)


def test_functional_backend_matches_double_backward():
    model, (x, y) = _mlp(4), _data(5)
    loss_fn = nn.functional.cross_entropy
    v = _vec(model, 9)
    a = hvp(loss_fn(model(x), y), list(model.parameters()), v)
    b = functional_hvp(model, loss_fn, (x, y), v)
    names = [n for n, _ in model.named_parameters()]
    c = functional_hvp(model, loss_fn, (x, y), dict(zip(names, v)))
    for ai, bi, ci in zip(a, b, c):
        torch.testing.assert_close(ai, bi, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bi, ci, rtol=0, atol=0)


def test_functional_backend_on_batchnorm_cnn_in_eval_mode():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
    ).to(DT)
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(2, generator=g, dtype=DT))
        model[1].running_var.copy_(torch.rand(2, generator=g, dtype=DT) + 0.5)
    model.eval()
    x = torch.randn(6, 1, 4, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    v = [torch.randn(p.shape, generator=g, dtype=DT) for p in model.parameters()]
    loss_fn = nn.functional.cross_entropy
    a = hvp(loss_fn(model(x), y), list(model.parameters()), v)
    b = functional_hvp(model, loss_fn, (x, y), v)
    for ai, bi in zip(a, b):
        torch.testing.assert_close(ai, bi, rtol=1e-10, atol=1e-12)


def test_unused_parameter_gets_zeros_and_precomputed_grads_are_reused():
    model, (x, y) = _mlp(), _data()
    unused = nn.Parameter(torch.ones(2, dtype=DT))
    params = [*model.parameters(), unused]
    v = [*_vec(model), torch.ones(2, dtype=DT)]
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    a = hvp(loss, params, v, grads=grads)
    b = hvp(loss, params, v)
    assert torch.equal(a[-1], torch.zeros(2, dtype=DT))
    for ai, bi in zip(a, b):
        torch.testing.assert_close(ai, bi, rtol=1e-12, atol=0)


def test_create_graph_gives_third_order_derivative():
    w = torch.tensor([1.5, -0.5], dtype=DT, requires_grad=True)
    loss = (w**4).sum()
    v = torch.tensor([1.0, 2.0], dtype=DT)
    (hv,) = hvp(loss, [w], [v], create_graph=True)
    torch.testing.assert_close(hv.detach(), 12 * w.detach() ** 2 * v)
    (d,) = torch.autograd.grad(hv.sum(), w)
    torch.testing.assert_close(d, 24 * w.detach() * v)


@pytest.mark.parametrize(
    ("vectors", "kwargs", "exc", "match"),
    [
        ([torch.ones(3, dtype=DT)], {}, ValueError, "shape"),
        ([], {}, ValueError, "0 tensors for 1"),
        ([torch.ones(2, dtype=DT)], {"grads": "nograph"}, RuntimeError, "create_graph"),
    ],
)
def test_errors(vectors, kwargs, exc, match):
    w = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    loss = (w**3).sum()
    if kwargs.get("grads") == "nograph":
        kwargs = {"grads": torch.autograd.grad((w**3).sum(), [w])}
    with pytest.raises(exc, match=match):
        hvp(loss, [w], vectors, **kwargs)


def test_flat_round_trip_and_length_check():
    ts = [torch.arange(6.0).reshape(2, 3), torch.arange(2.0)]
    flat = tensors_to_flat(ts)
    back = flat_to_tensors(flat, ts)
    assert all(torch.equal(a, b) for a, b in zip(ts, back))
    with pytest.raises(ValueError, match="expected 8"):
        flat_to_tensors(torch.zeros(9), ts)
