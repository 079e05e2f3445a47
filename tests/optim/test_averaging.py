"""WeightAveraging against closed forms, float64 loops and torch.optim.swa_utils."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import (
    AveragedModel,
    get_ema_multi_avg_fn,
    get_swa_multi_avg_fn,
    update_bn,
)

from flatmin.optim.averaging import WeightAveraging, unwrap_model
from flatmin.optim.bn import call_model


def make_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5)
    ).to(dtype)


def data(n_batches: int = 4, batch: int = 8, dtype: torch.dtype = torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 4, generator=g, dtype=dtype), torch.randn(batch, 5, generator=g))
        for _ in range(n_batches)
    ]


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, batch) -> None:
    x, y = batch
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y.to(x.dtype)).backward()
    opt.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


# -- the averages ------------------------------------------------------------------------------


def test_swa_is_the_mean_of_the_scheduled_snapshots() -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wa = WeightAveraging(model, mode="swa", start=3, every=2)
    batches = data(9)
    taken, returned = [], []
    for count, batch in enumerate(batches, start=1):
        sgd_step(model, opt, batch)
        returned.append(wa.update())
        if count in (3, 5, 7, 9):  # count >= 3 and (count - 3) % 2 == 0, written out
            taken.append(snapshot(model))
    assert returned == [c in (3, 5, 7, 9) for c in range(1, 10)]
    assert wa.count == 9 and wa.n_averaged == 4
    avg = wa.averaged_tensors()
    for name, _p in model.named_parameters():
        expected = sum(s[name] for s in taken) / len(taken)
        torch.testing.assert_close(avg[name], expected, rtol=1e-12, atol=1e-12)
    # Float buffers (policy "average") are averaged too; integer ones are copied.
    torch.testing.assert_close(
        avg["1.running_mean"], sum(s["1.running_mean"] for s in taken) / 4, rtol=1e-12, atol=0
    )
    assert torch.equal(avg["1.num_batches_tracked"], taken[-1]["1.num_batches_tracked"])


@pytest.mark.parametrize("warmup_power", [None, 0.75])
def test_ema_matches_the_closed_form(warmup_power: float | None) -> None:
    decay, gamma = 0.8, 2.0
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wa = WeightAveraging(model, mode="ema", decay=decay, warmup_power=warmup_power,
                         warmup_gamma=gamma)  # fmt: skip
    snaps = []
    for batch in data(6):
        sgd_step(model, opt, batch)
        wa.update()
        snaps.append(snapshot(model))
    # β for the (n+1)-th average with n prior averages; weights of the snapshots in closed form.
    betas = [
        decay if warmup_power is None else min(decay, 1 - (1 + n / gamma) ** -warmup_power)
        for n in range(1, len(snaps))
    ]
    weights = []
    for j in range(len(snaps)):
        w = 1.0 if j == 0 else 1.0 - betas[j - 1]
        for beta in betas[j:]:
            w *= beta
        weights.append(w)
    assert abs(sum(weights) - 1.0) < 1e-12
    if warmup_power is None:
        k = len(snaps)
        assert weights == pytest.approx([decay ** (k - 1)] + [(1 - decay) * decay ** (k - 1 - j)
                                                              for j in range(1, k)])  # fmt: skip
    avg = wa.averaged_tensors()
    for name, _ in model.named_parameters():
        expected = sum(w * s[name] for w, s in zip(weights, snaps))
        torch.testing.assert_close(avg[name], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_matches_torch_averaged_model(mode: str) -> None:
    model = make_mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # torch's SWA with use_buffers=True crashes on num_batches_tracked (integer addcdiv), so SWA
    # is compared with buffers copied (torch's use_buffers=False) and EMA with buffers averaged.
    policy = "copy" if mode == "swa" else "average"
    wa = WeightAveraging(model, mode=mode, decay=0.9, start=2, every=2, buffers=policy)
    fn = get_swa_multi_avg_fn() if mode == "swa" else get_ema_multi_avg_fn(0.9)
    ref = AveragedModel(model, multi_avg_fn=fn, use_buffers=mode == "ema")
    for batch in data(10, dtype=torch.float32):
        sgd_step(model, opt, batch)
        if wa.update():
            ref.update_parameters(model)
    assert wa.n_averaged == int(ref.n_averaged) == 5
    avg = wa.averaged_tensors()
    ref_tensors = dict(ref.module.named_parameters())
    ref_tensors.update(ref.module.named_buffers())
    for name, t in ref_tensors.items():
        if not t.is_floating_point():
            if mode == "swa":
                assert torch.equal(avg[name], t), name
            continue  # torch's EMA averages num_batches_tracked; flatmin copies integers
        # torch computes SWA's lerp weight 1/(n+1) as a float32 tensor, flatmin as a double.
        torch.testing.assert_close(avg[name], t, rtol=1e-6, atol=1e-7)


def test_foreach_equals_the_reference_loop() -> None:
    results = []
    for foreach in (True, False):
        model = make_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        wa = WeightAveraging(model, mode="ema", decay=0.7, warmup_power=0.5, foreach=foreach)
        for batch in data(5):
            sgd_step(model, opt, batch)
            wa.update()
        results.append(wa.averaged_tensors())
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


@pytest.mark.parametrize("policy", ["average", "copy", "none"])
def test_buffer_policies(policy: str) -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wa = WeightAveraging(model, buffers=policy)
    snaps = []
    for batch in data(3):
        sgd_step(model, opt, batch)
        wa.update()
        snaps.append(snapshot(model))
    avg = wa.averaged_tensors()
    if policy == "none":
        assert not any("running" in n or "num_batches" in n for n in avg)
        return
    expected = sum(s["4.running_var"] for s in snaps) / 3 if policy == "average" else None
    if policy == "copy":
        expected = snaps[-1]["4.running_var"]
    torch.testing.assert_close(avg["4.running_var"], expected, rtol=1e-12, atol=0)
    assert torch.equal(avg["4.num_batches_tracked"], snaps[-1]["4.num_batches_tracked"])


# -- swap and export -----------------------------------------------------------------------------


def test_swap_is_a_noop_before_the_first_average() -> None:
    model = make_mlp()
    wa = WeightAveraging(model, start=5)
    before = snapshot(model)
    assert not wa.update()
    with wa.swap() as inner:
        assert inner is model
        for name, t in snapshot(model).items():
            assert torch.equal(t, before[name])


def test_swap_loads_the_average_and_restores_bit_exactly() -> None:
    model = make_mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    wa = WeightAveraging(model)
    for batch in data(4, dtype=torch.float32):
        sgd_step(model, opt, batch)
        wa.update()
    before = snapshot(model)
    avg = wa.averaged_tensors()
    with wa.swap():
        for name, t in snapshot(model).items():
            assert torch.equal(t, avg[name]), name
        model.train()(data(1, dtype=torch.float32)[0][0]).sum()  # mutates BN buffers in place
        with pytest.raises(RuntimeError, match="inside swap"):
            wa.update()
        with pytest.raises(RuntimeError, match="nested"), wa.swap():
            pass
    for name, t in snapshot(model).items():
        assert torch.equal(t, before[name]), name
    # An exception inside the context restores too.
    with pytest.raises(KeyError), wa.swap():
        raise KeyError("boom")
    for name, t in snapshot(model).items():
        assert torch.equal(t, before[name]), name


def test_averaged_state_dict_loads_into_a_fresh_model_with_tied_weights() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)
            self.dec = nn.Linear(4, 4)
            self.dec.weight = self.enc.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(self.bn(self.enc(x)))

    torch.manual_seed(0)
    model = Tied().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wa = WeightAveraging(model)
    with pytest.raises(RuntimeError, match="no average"):
        wa.averaged_state_dict()
    weights = []
    for x, y in data(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y[:, :4]).backward()
        opt.step()
        wa.update()
        weights.append(model.enc.weight.detach().clone())
    sd = wa.averaged_state_dict()
    assert set(sd) == set(model.state_dict())
    fresh = Tied().double()
    fresh.load_state_dict(sd, strict=True)
    expected = sum(weights) / 3
    torch.testing.assert_close(fresh.dec.weight, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sd["dec.weight"], expected, rtol=1e-12, atol=1e-12)
    x = data(1)[0][0]
    with wa.swap():
        out = model.eval()(x)
    torch.testing.assert_close(fresh.eval()(x), out, rtol=0, atol=0)


def test_legacy_weight_norm_after_a_forward_pass() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # legacy API is deprecated
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2))
        fresh = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2))
    model.double()
    fresh.double()
    x = torch.randn(5, 4, dtype=torch.float64)
    model(x)
    # The premise: deepcopy, and so AveragedModel, rejects this module after a forward pass.
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)
    with pytest.raises(RuntimeError):
        AveragedModel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wa = WeightAveraging(model)
    snaps = []
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        wa.update()
        snaps.append(snapshot(model))
    avg = wa.averaged_tensors()
    assert {"0.weight_g", "0.weight_v"} <= set(avg)
    for name in ("0.weight_g", "0.weight_v", "2.weight"):
        torch.testing.assert_close(avg[name], sum(s[name] for s in snaps) / 3, rtol=1e-12, atol=0)
    fresh.load_state_dict(wa.averaged_state_dict())
    with wa.swap():
        out = model(x)  # the pre-forward hook recomputes weight from the averaged g and v
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)


def test_parametrized_weight_norm() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2)).double()
    fresh = nn.Sequential(weight_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wa = WeightAveraging(model)
    snaps = []
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        wa.update()
        snaps.append(snapshot(model))
    avg = wa.averaged_tensors()
    for name in ("0.parametrizations.weight.original0", "0.parametrizations.weight.original1"):
        torch.testing.assert_close(avg[name], sum(s[name] for s in snaps) / 3, rtol=1e-12, atol=0)
    fresh.load_state_dict(wa.averaged_state_dict(), strict=True)
    with wa.swap():
        out = model(x)
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)


# -- BatchNorm statistics ------------------------------------------------------------------------


def _averaged_mlp(n_steps: int = 4) -> tuple[nn.Module, WeightAveraging]:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    wa = WeightAveraging(model, buffers="copy")
    for batch in data(n_steps, seed=3):
        sgd_step(model, opt, batch)
        wa.update()
    return model, wa


def test_update_bn_equals_full_data_statistics_in_one_pass() -> None:
    _model, wa = _averaged_mlp()
    x = torch.cat([b[0] for b in data(5, seed=7)])  # all the data, one batch
    wa.update_bn([x])
    avg = wa.averaged_tensors()
    # Hand-computed float64 forward of the averaged weights, in train mode (batch statistics).
    h1 = x @ avg["0.weight"].T + avg["0.bias"]
    mean1, var1 = h1.mean(0), h1.var(0, unbiased=True)
    z1 = (h1 - mean1) / torch.sqrt(h1.var(0, unbiased=False) + 1e-5) * avg["1.weight"]
    z1 = torch.relu(z1 + avg["1.bias"])
    h2 = z1 @ avg["3.weight"].T + avg["3.bias"]
    torch.testing.assert_close(avg["1.running_mean"], mean1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(avg["1.running_var"], var1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(avg["4.running_mean"], h2.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(avg["4.running_var"], h2.var(0), rtol=1e-10, atol=1e-12)
    assert int(avg["1.num_batches_tracked"]) == 1


def test_update_bn_equals_torch_update_bn_and_restores_the_live_model() -> None:
    model, wa = _averaged_mlp()
    model[4].momentum = 0.3
    model[1].eval()  # a submodule in eval mode while the parent trains
    before = snapshot(model)
    loader = data(5, seed=11)
    wa.update_bn(loader)
    # torch's reference: a fresh model holding the averaged weights.
    ref = make_mlp()
    ref.load_state_dict(wa.averaged_state_dict())
    update_bn(loader, ref)
    avg = wa.averaged_tensors()
    for name, b in ref.named_buffers():
        torch.testing.assert_close(avg[name], b, rtol=0, atol=0)
    # The live model: statistics, momenta and modes untouched.
    for name, t in snapshot(model).items():
        assert torch.equal(t, before[name]), name
    assert model[4].momentum == 0.3 and model[1].momentum == 0.1
    assert model.training and not model[1].training and model[4].training
    # Used by swap() and the export until the next averaging event.
    with wa.swap():
        assert torch.equal(model[1].running_var, ref[1].running_var)
    assert torch.equal(wa.averaged_state_dict()["4.running_mean"], ref[4].running_mean)
    assert wa.update()
    assert not torch.equal(wa.averaged_tensors()["4.running_mean"], ref[4].running_mean)


def test_update_bn_batch_structures_and_max_batches() -> None:
    class KwModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.net(x * scale)

    model = KwModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wa = WeightAveraging(model)
    for batch in data(2):
        sgd_step(model, opt, batch)
        wa.update()
    loader = data(4, seed=5)
    results = {}
    variants = {
        "tensor": ([x for x, _ in loader], None),
        "tuple": (loader, None),
        "dict": ([{"x": x / 2, "scale": 2.0} for x, _ in loader], None),
        "forward_fn": ([{"inputs": x} for x, _ in loader], lambda m, b: m(b["inputs"])),
    }
    for key, (batches, fn) in variants.items():
        wa.update_bn(batches, forward_fn=fn)
        results[key] = wa.averaged_tensors()["net.4.running_var"].clone()
    for key in ("tuple", "dict", "forward_fn"):
        torch.testing.assert_close(results[key], results["tensor"], rtol=1e-12, atol=1e-12)
    wa.update_bn(loader, max_batches=2)
    two = wa.averaged_tensors()
    wa.update_bn(loader[:2])
    assert torch.equal(two["net.1.running_mean"], wa.averaged_tensors()["net.1.running_mean"])
    assert int(two["net.1.num_batches_tracked"]) == 2


def test_call_model_rejects_unknown_batches() -> None:
    with pytest.raises(TypeError, match="Invalid batch type: int"):
        call_model(nn.Identity(), 3)


# -- checkpoints -----------------------------------------------------------------------------------


def _train(model, opt, wa, batches):
    for batch in batches:
        sgd_step(model, opt, batch)
        wa.update()


@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_resume_mid_averaging_is_identical(mode: str) -> None:
    batches = data(10, seed=4)

    def fresh():
        model = make_mlp(torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        wa = WeightAveraging(model, mode=mode, decay=0.8, start=3, every=2, warmup_power=0.5)
        return model, opt, wa

    model, opt, wa = fresh()
    _train(model, opt, wa, [(x.float(), y) for x, y in batches])

    model2, opt2, wa2 = fresh()
    _train(model2, opt2, wa2, [(x.float(), y) for x, y in batches[:5]])
    wa2.update_bn([x.float() for x, _ in batches[:2]])
    buf = io.BytesIO()
    torch.save({"m": model2.state_dict(), "o": opt2.state_dict(), "a": wa2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model3, opt3, wa3 = fresh()
    model3.load_state_dict(ckpt["m"])
    opt3.load_state_dict(ckpt["o"])
    wa3.load_state_dict(ckpt["a"])
    assert (wa3.count, wa3.n_averaged) == (5, 2)
    with wa2.swap(), wa3.swap():  # the recomputed BN statistics came along
        assert torch.equal(model2[1].running_var, model3[1].running_var)
    _train(model3, opt3, wa3, [(x.float(), y) for x, y in batches[5:]])
    assert (wa3.count, wa3.n_averaged) == (wa.count, wa.n_averaged) == (10, 4)
    for name, t in wa.averaged_tensors().items():
        assert torch.equal(wa3.averaged_tensors()[name], t), name
    for (name, t), t3 in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(t, t3), name


def test_load_state_dict_checks() -> None:
    model = make_mlp()
    wa = WeightAveraging(model)
    sd = wa.state_dict()
    with pytest.raises(ValueError, match="mode"):
        WeightAveraging(model, mode="ema").load_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        WeightAveraging(model, buffers="none").load_state_dict(sd)
    with pytest.raises(ValueError, match="keys"):
        wa.load_state_dict({"shadow": {}})


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def _corrupt(sd: dict, path: tuple, value) -> dict:
    bad = copy.deepcopy(sd)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return bad


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("count",), -1, r"count: -1"),
        (("count",), 2.5, r"count: 2\.5"),
        (("n_averaged",), 7, r"n_averaged=7 after count=5"),
        (("n_averaged",), True, r"n_averaged: True"),
        (("settings", "start"), 1, r"start=1"),
        (("settings", "every"), 3, r"every=3"),
        (("shadow", "3.weight"), torch.zeros(2, 2), r"'3\.weight': shape \(2, 2\)"),
        (("shadow", "0.bias"), [1.0], r"'0\.bias'"),
        (("bn_stats", "9.running_mean"), torch.zeros(6), r"not BN statistics"),
        (("bn_stats", "1.running_var"), torch.zeros(3), r"'1\.running_var': shape \(3,\)"),
    ],
)
def test_load_state_dict_validates_everything_first_and_changes_nothing(path, value, match) -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wa = WeightAveraging(model, start=2, every=2)
    for batch in data(5):
        sgd_step(model, opt, batch)
        wa.update()
    wa.update_bn([x for x, _ in data(2)])
    saved = copy.deepcopy(wa.state_dict())
    assert (saved["count"], saved["n_averaged"]) == (5, 2)

    target = WeightAveraging(make_mlp(seed=3), start=2, every=2)
    for _ in range(3):
        target.update()
    target.update_bn([x for x, _ in data(1)])
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(_corrupt(saved, path, value))
    assert _same(before, target.state_dict())
    target.load_state_dict(saved)  # the intact one loads
    assert _same(saved, target.state_dict())


def test_a_state_dict_without_settings_from_flatmin_0_1_still_loads() -> None:
    model = make_mlp()
    wa = WeightAveraging(model)
    wa.update()
    legacy = {k: v for k, v in wa.state_dict().items() if k != "settings"}
    fresh = WeightAveraging(make_mlp(seed=2))
    fresh.load_state_dict(legacy)
    assert fresh.n_averaged == 1


# -- wrappers, options and errors ------------------------------------------------------------------


def test_data_parallel_wrapper_is_unwrapped() -> None:
    model = make_mlp()
    wrapped = nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    wa = WeightAveraging(wrapped)
    assert all(not n.startswith("module.") for n in wa.state_dict()["shadow"])
    wa.update()
    fresh = make_mlp(seed=5)
    fresh.load_state_dict(wa.averaged_state_dict())
    for name, p in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p)


def test_cpu_storage_device_and_update_bn_without_batches() -> None:
    model = make_mlp()
    wa = WeightAveraging(model, device="cpu")
    assert all(t.device.type == "cpu" for t in wa.state_dict()["shadow"].values())
    with pytest.raises(RuntimeError, match="before the first average"):
        wa.update_bn(data(1))
    wa.update()
    with pytest.raises(ValueError, match="no batch"):
        wa.update_bn([])
    with pytest.raises(ValueError, match="max_batches"):
        wa.update_bn(data(1), max_batches=0)
    # The failed call left the live model and the average as they were.
    assert wa.averaged_tensors().keys() == wa.state_dict()["shadow"].keys()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"mode": "polyak"}, ValueError, "Invalid mode: 'polyak'"),
        ({"decay": 1.5}, ValueError, r"Invalid decay: 1.5 \(expected 0 <= decay <= 1\)"),
        ({"decay": "0.9"}, TypeError, "Invalid decay"),
        ({"start": -1}, ValueError, r"Invalid start: -1 \(expected >= 0\)"),
        ({"every": 0}, ValueError, r"Invalid every: 0 \(expected >= 1\)"),
        ({"every": 1.5}, TypeError, "Invalid every: 1.5"),
        ({"buffers": "all"}, ValueError, "Invalid buffers: 'all'"),
        ({"warmup_power": 0}, ValueError, "Invalid warmup_power: 0"),
        ({"warmup_gamma": -1.0}, ValueError, "Invalid warmup_gamma"),
        ({"foreach": None}, TypeError, "Invalid foreach"),
    ],
)
def test_invalid_arguments(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        WeightAveraging(make_mlp(), **kwargs)


def test_invalid_model() -> None:
    with pytest.raises(TypeError, match="Invalid model: list"):
        WeightAveraging([nn.Linear(2, 2)])  # type: ignore[arg-type]
