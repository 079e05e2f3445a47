"""flatmin.integrations.lightning: one Lightning run equals the same steps written by hand.

The references are plain loops over flatmin's public API (SAM.step with model= and same_rng=,
accumulation_closure, sam_step_amp, WeightAveraging), run on the same data in the same order,
with the global RNG seeded alike; every comparison is to 1e-6 or exact.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="needs the 'lightning' extra")

import flatmin  # noqa: E402
from flatmin.integrations.lightning import SAMModule, WeightAveragingCallback  # noqa: E402
from flatmin.optim.accumulation import accumulation_closure  # noqa: E402
from flatmin.optim.amp import sam_step_amp  # noqa: E402

F = nn.functional
DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "lightning.md"

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)
for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)

N, BATCH, SEED = 48, 8, 123


def _net(dropout=0.2, bn=True):
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8) if bn else nn.Identity()
    return nn.Sequential(nn.Linear(5, 8), norm, nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)


def _loader():
    x, y = _data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def _sam(params, kind=flatmin.SAM, **kw):
    opts = {"rho": 0.1, "lr": 0.1, "momentum": 0.9, **kw}
    return kind(params, torch.optim.SGD, **opts)


class Net(SAMModule):
    """The test module: a small BN + dropout MLP trained with SAM(SGD, momentum)."""

    def __init__(self, make_opt=None, dropout=0.2, bn=True):
        super().__init__()
        self.net = _net(dropout, bn)
        self.make_opt = make_opt or (lambda m: _sam(m.parameters()))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return self.make_opt(self)


def _trainer(**kw):
    opts = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    opts.update(kw)
    return pl.Trainer(**opts)


def _fit(module, **kw):
    trainer = _trainer(**kw)
    torch.manual_seed(SEED)
    trainer.fit(module, _loader())
    return trainer


def _batches():
    x, y = _data()
    return list(zip(x.split(BATCH), y.split(BATCH)))


def _windows(k):
    batches = _batches()
    return [batches[s : s + k] for s in range(0, len(batches), k)]


def _reference(epochs=2, k=1, dropout=0.2, bn=True, make_opt=None, step=None):
    """SAM by hand: accumulation_closure over each window, SAM.step(model=, same_rng=True)."""
    net = _net(dropout, bn)
    opt = (make_opt or (lambda n: _sam(n.parameters())))(net)
    torch.manual_seed(SEED)
    for _ in range(epochs):
        list(_loader())  # Lightning's epoch iterator draws its base seed from the global RNG
        for micro in _windows(k):
            closure = accumulation_closure(
                opt, lambda b: F.cross_entropy(net(b[0]), b[1]), micro, weights=[1 / k] * len(micro)
            )
            if step is None:
                opt.step(closure, model=net, same_rng=True)
            else:
                step(opt, closure, net)
    return net, opt


def _assert_same(module_net, ref_net, atol=1e-6):
    for (name, a), b in zip(module_net.state_dict().items(), ref_net.state_dict().values()):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)


# -- automatic optimization ---------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
def test_automatic_equals_hand_written_sam(k):
    # BN (frozen in the second pass), dropout (same masks), momentum, accumulation of k.
    module = Net()
    trainer = _fit(module, accumulate_grad_batches=k)
    assert trainer.global_step == 2 * len(_windows(k))
    ref, _ = _reference(k=k)
    _assert_same(module.net, ref, atol=1e-6)


class _Plain(pl.LightningModule):
    """A plain LightningModule returning SAM: what SAMModule exists to replace."""

    def __init__(self, manual=False):
        super().__init__()
        self.net = _net(dropout=0.0, bn=False)
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss)
        opt.first_step(zero_grad=True)
        self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
        opt.second_step(zero_grad=True)
        return None

    def configure_optimizers(self):
        return _sam(self.parameters())


def test_plain_lightning_module_with_accumulation_is_refused_naming_samodule():
    # The trap: with accumulate_grad_batches=2 a plain LightningModule would take ε̂ from both
    # micro-batches and the second pass from the last one only (0.2 off SAM on the accumulated
    # batch after 2 steps). SAMModule equals the reference (test above); this stops at step 1.
    plain = _Plain()
    before = [w.detach().clone() for w in plain.parameters()]
    with pytest.raises(RuntimeError, match=r"accumulate_grad_batches > 1.*SAMModule"):
        _fit(plain, accumulate_grad_batches=2)
    assert all(torch.equal(a, b) for a, b in zip(before, plain.parameters()))  # no step taken
    # Without accumulation the plain module is SAM on each batch: neither refused nor warned.
    plain = _Plain()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
        _fit(plain, max_epochs=1)
    ref, _ = _reference(epochs=1, k=1, dropout=0.0, bn=False)
    _assert_same(plain.net, ref)


def test_plain_lightning_module_manual_first_step_is_refused_naming_samodule():
    # first_step/second_step on self.optimizers() left global_step at 0 (max_steps, schedulers,
    # checkpoints never moved).
    with pytest.raises(RuntimeError, match=r"first_step\(\) called on Lightning's optimizer "
                                           r"wrapper.*SAMModule.*sam_step\(closure\)"):
        _fit(_Plain(manual=True), max_epochs=1)


def test_bn_statistics_frozen_and_logging_at_w():
    seen = []

    class Logged(Net):
        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            seen.append((self.in_sam_second_pass, loss.detach()))
            self.log("train_loss", loss)
            return loss

    module = Logged()
    trainer = _fit(module, max_epochs=1, accumulate_grad_batches=2)
    bn = module.net[1]
    assert int(bn.num_batches_tracked) == N // BATCH  # once per batch, not twice
    assert [flag for flag, _ in seen] == [False, False, True, True] * 3
    # The logged value is the last first-pass loss (at w), not the one at w + ε̂.
    last_first_pass = [loss for flag, loss in seen if not flag][-1]
    assert torch.equal(trainer.callback_metrics["train_loss"], last_first_pass)


def test_freeze_and_same_rng_switches_are_honoured():
    module = Net()
    module.sam_freeze_bn = False
    module.sam_same_rng = False
    _fit(module, max_epochs=1)
    assert int(module.net[1].num_batches_tracked) == 2 * (N // BATCH)
    ref, _ = _reference(epochs=1)
    diff = max(
        (a - b).abs().max().item() for a, b in zip(module.net.parameters(), ref.parameters())
    )
    assert diff > 1e-4


def test_gradient_clipping_by_norm_clips_the_sam_gradient():
    module = Net(dropout=0.0)
    _fit(module, gradient_clip_val=0.05)
    ref, _ = _reference(dropout=0.0, make_opt=lambda n: _sam(n.parameters(), max_grad_norm=0.05))
    _assert_same(module.net, ref, atol=1e-6)


@pytest.mark.parametrize("kind", [flatmin.SAMEveryK, flatmin.LookSAM])
def test_one_pass_variants_with_accumulation(kind):
    # On in-between steps these run the closure once (no second pass, no replay).
    def make(m):
        return _sam(m.parameters(), kind=kind, k=2)

    module = Net(make_opt=make)
    _fit(module, accumulate_grad_batches=2)
    ref, _ = _reference(k=2, make_opt=make)
    _assert_same(module.net, ref, atol=1e-6)


# -- precision ----------------------------------------------------------------------------------
def test_bf16_mixed_equals_autocast_reference():
    module = Net()
    _fit(module, precision="bf16-mixed", accumulate_grad_batches=2)

    def step(opt, closure, net):
        def autocast_closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return closure()

        opt.step(autocast_closure, model=net, same_rng=True)

    ref, _ = _reference(k=2, step=step)
    _assert_same(module.net, ref, atol=1e-6)


@pytest.mark.parametrize(
    ("k", "init_scale", "rho"),
    [(1, 2.0**10, 0.1), (2, 2.0**10, 0.1), (1, 2.0**20, 1.0), (2, 2.0**20, 1.0)],
)
def test_fp16_scaler_equals_sam_step_amp(k, init_scale, rho):
    # On CPU Lightning turns precision="16-mixed" into bf16, so the plugin is given explicitly
    # (fp16 autocast and a CPU GradScaler). 2**20 with rho=1 overflows the first steps, in the
    # first pass and, later, only at w + ε̂ (the weights are restored, the step skipped).
    from lightning.pytorch.plugins.precision import MixedPrecision

    def make(m):
        return _sam(m.parameters(), rho=rho)

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    module = Net(make_opt=make)
    _fit(module, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], accumulate_grad_batches=k)

    ref_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    net = _net()
    opt = make(net)
    skips = []
    torch.manual_seed(SEED)
    for _ in range(2):
        list(_loader())
        for micro in _windows(k):
            calls = []

            def loss_fn(b, calls=calls):
                calls.append(1)
                with torch.autocast("cpu", dtype=torch.float16):
                    return F.cross_entropy(net(b[0]), b[1])

            closure = accumulation_closure(
                opt,
                loss_fn,
                micro,
                weights=[1 / k] * len(micro),
                backward=lambda loss: ref_scaler.scale(loss).backward(),
            )
            res = sam_step_amp(opt, ref_scaler, closure, model=net, same_rng=True)
            if res.skipped:
                skips.append("second pass" if len(calls) > len(micro) else "first pass")
    _assert_same(module.net, net, atol=1e-6)
    assert scaler.get_scale() == ref_scaler.get_scale()
    if init_scale > 2.0**16:
        assert set(skips) == {"first pass", "second pass"}


# -- manual optimization ------------------------------------------------------------------------
class Manual(Net):
    def __init__(self, accumulate=1, schedule=True, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False
        self.accumulate = accumulate
        self.schedule = schedule

    def configure_optimizers(self):
        opt = self.make_opt(self)
        if not self.schedule:
            return opt
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.accumulate == 1:

            def closure():
                loss = F.cross_entropy(self.net(x), y)
                self.manual_backward(loss)
                return loss

        else:
            micro = list(zip(x.chunk(self.accumulate), y.chunk(self.accumulate)))
            closure = accumulation_closure(
                self.optimizers().optimizer,
                lambda b: F.cross_entropy(self.net(b[0]), b[1]),
                micro,
                backward=self.manual_backward,
            )
        loss = self.sam_step(closure)
        if self.schedule:
            self.lr_schedulers().step()
        self.log("train_loss", loss)


@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_manual_sam_step_counts_steps_and_equals_hand_written(tmp_path, accumulate):
    module = Manual(accumulate=accumulate, dropout=0.0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = _fit(module, max_steps=5, max_epochs=-1, enable_checkpointing=True, callbacks=[ckpt])
    assert trainer.global_step == 5  # max_steps stops the run: global_step advances
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
    ]

    net = _net(dropout=0.0)
    opt = _sam(net.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for xb, yb in _batches()[:5]:
        micro = list(zip(xb.chunk(accumulate), yb.chunk(accumulate)))
        opt.step(
            accumulation_closure(opt, lambda b: F.cross_entropy(net(b[0]), b[1]), micro),
            model=net,
            same_rng=True,
        )
        sched.step()
    _assert_same(module.net, net, atol=1e-6)
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_manual_fp16_sam_step_equals_sam_step_amp():
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = Manual(dropout=0.0, schedule=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer = _fit(module, max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert trainer.global_step == N // BATCH

    net = _net(dropout=0.0)
    opt = _sam(net.parameters())
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for xb, yb in _loader():

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(net(xb), yb)
            ref_scaler.scale(loss).backward()
            return loss

        sam_step_amp(opt, ref_scaler, closure, model=net, same_rng=True)
    _assert_same(module.net, net, atol=1e-6)


# -- checkpoints and averaging ------------------------------------------------------------------
def _resume_pair(tmp_path, make_module, callbacks=lambda: [], epochs=4, at=2):
    """An uninterrupted run, and one resumed from the checkpoint at the end of epoch ``at``."""
    full, full_cbs = make_module(), callbacks()
    _fit(full, max_epochs=epochs, callbacks=full_cbs)

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    _fit(make_module(), max_epochs=at, enable_checkpointing=True, callbacks=[ckpt, *callbacks()])
    path = tmp_path / f"epoch={at - 1}-step={at * (N // BATCH)}.ckpt"
    resumed, resumed_cbs = make_module(), callbacks()
    trainer = _trainer(max_epochs=epochs, callbacks=resumed_cbs)
    trainer.fit(resumed, _loader(), ckpt_path=str(path))
    return full, full_cbs, resumed, resumed_cbs, trainer


def _assert_bit_identical(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    def make():
        return Net(dropout=0.0)

    full, _, resumed, _, trainer = _resume_pair(tmp_path, make)
    _assert_bit_identical(full.net, resumed.net)
    state = trainer.optimizers[0].state_dict()
    assert state["base"]["state"], "the base optimizer's momentum is in the checkpoint"


def test_resume_without_optimizer_state_would_differ(tmp_path):
    # The test above can fail: continuing from the checkpoint's weights alone (fresh momentum)
    # gives other weights.
    full = Net(dropout=0.0)
    _fit(full, max_epochs=4)
    first = Net(dropout=0.0)
    _fit(first, max_epochs=2)
    restarted = Net(dropout=0.0)
    restarted.load_state_dict(first.state_dict())
    _fit(restarted, max_epochs=2)
    diff = max(
        (a - b).abs().max().item() for a, b in zip(full.parameters(), restarted.parameters())
    )
    assert diff > 1e-4


def test_wasam_and_averaging_callback_resume_bit_identical(tmp_path):
    def make():
        return Net(dropout=0.0, make_opt=lambda m: _sam(m, kind=flatmin.WASAM, start=3))

    def callbacks():
        return [
            WeightAveragingCallback(mode="ema", decay=0.8, apply_on_train_end=False),
            WeightAveragingCallback(from_optimizer=True, apply_on_train_end=False),
        ]

    full, full_cbs, resumed, cbs, trainer = _resume_pair(tmp_path, make, callbacks)
    _assert_bit_identical(full.net, resumed.net)
    for a, b in zip(full_cbs, cbs):
        sa, sb = a.averaging.state_dict(), b.averaging.state_dict()
        assert (sa["count"], sa["n_averaged"]) == (sb["count"], sb["n_averaged"])
        for name in sa["shadow"]:
            assert torch.equal(sa["shadow"][name], sb["shadow"][name]), name
    wasam = trainer.optimizers[0]
    assert wasam.averaging is cbs[1].averaging
    assert wasam.averaging.n_averaged == 4 * N // BATCH - 2  # steps 3..24 averaged


def test_weight_averaging_callback_equals_hand_written():
    module = Net(dropout=0.0)
    cb = WeightAveragingCallback(mode="ema", decay=0.8, start=2)
    _fit(module, callbacks=[cb])

    net = _net(dropout=0.0)
    opt = _sam(net.parameters())
    avg = flatmin.WeightAveraging(net, mode="ema", decay=0.8, start=2)
    for _ in range(2):
        for xb, yb in _loader():

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = F.cross_entropy(net(xb), yb)
                loss.backward()
                return loss

            opt.step(closure, model=net, same_rng=True)
            avg.update()
    avg.update_bn(_loader())
    net.load_state_dict(avg.averaged_state_dict())
    _assert_same(module.net, net, atol=1e-6)


def test_validation_sees_the_average_and_training_weights_come_back():
    seen = {}

    class Val(Net):
        def validation_step(self, batch, batch_idx):
            seen.setdefault(self.current_epoch, self.net[0].weight.detach().clone())

    module = Val(dropout=0.0)
    cb = WeightAveragingCallback(mode="swa", apply_on_train_end=False)
    trainer = _trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[cb])
    torch.manual_seed(SEED)
    trainer.fit(module, _loader(), _loader())
    avg = cb.averaging.averaged_tensors()["net.0.weight"]
    assert torch.equal(seen[1], avg)
    assert not torch.equal(module.net[0].weight, avg)


def test_lightning_ema_callback_beside_sam_module():
    from lightning.pytorch.callbacks import EMAWeightAveraging

    module = Net(dropout=0.0, bn=False)
    _fit(module, callbacks=[EMAWeightAveraging(decay=0.8)])  # writes the EMA into the module

    net = _net(dropout=0.0, bn=False)
    opt = _sam(net.parameters())
    ema = flatmin.WeightAveraging(net, mode="ema", decay=0.8)
    for _ in range(2):
        for xb, yb in _loader():

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = F.cross_entropy(net(xb), yb)
                loss.backward()
                return loss

            opt.step(closure, model=net)
            ema.update()
    net.load_state_dict(ema.averaged_state_dict())
    _assert_same(module.net, net, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_lightning_swa_callback_beside_sam_module(k):
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    starts = []

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            starts.append([p.detach().clone() for p in pl_module.parameters()])

    module = Net(dropout=0.0)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
    _fit(module, max_epochs=4, accumulate_grad_batches=k, callbacks=[Probe(), swa])
    # Lightning averages the weights at the start of epochs 1, 2, 3 (0-based), writes the mean
    # into the module and runs an extra epoch without backward to recompute BN statistics. That
    # epoch's last batch reaches optimizer_step; SAMModule runs the forward only, so the weights
    # stay the mean (a plain optimizer would step there with the stale gradients).
    for i, p in enumerate(module.parameters()):
        mean = (starts[1][i] + starts[2][i] + starts[3][i]) / 3
        torch.testing.assert_close(p.detach(), mean, atol=1e-6, rtol=0)
    bn = module.net[1]
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == N // BATCH
    assert module._sam_micro == []


# -- misuse: raise instead of training wrongly --------------------------------------------------
def test_first_step_through_lightning_wrapper_raises():
    class Misuse(Manual):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
            opt.first_step(zero_grad=True)

    module = Misuse(dropout=0.0)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match=r"sam_step\(closure\)"):
        _fit(module, max_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize("target", ["module", "net"])
def test_step_with_model_keyword_raises(target):
    class Misuse(Net):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            model = self if target == "module" else self.net
            optimizer.step(closure=optimizer_closure, model=model)

    with pytest.raises(TypeError, match="never reaches SAM"):
        _fit(Misuse(), max_epochs=1)


def test_sam_step_in_automatic_optimization_raises():
    class Misuse(Net):
        def training_step(self, batch, batch_idx):
            return self.sam_step(lambda: F.cross_entropy(self.net(batch[0]), batch[1]))

    with pytest.raises(RuntimeError, match="manual optimization"):
        _fit(Misuse(), max_epochs=1)


def test_overridden_batch_start_hook_without_super_raises():
    class Misuse(Net):
        def on_train_batch_start(self, batch, batch_idx):
            return None

    with pytest.raises(RuntimeError, match="without calling super"):
        _fit(Misuse(), max_epochs=1, accumulate_grad_batches=2)


@pytest.mark.parametrize(
    ("make_opt", "kw", "exc", "match"),
    [
        (lambda m: _sam(m.parameters(), kind=flatmin.ESAM), {}, TypeError, "ESAM"),
        (
            lambda m: _sam(m.parameters(), kind=flatmin.LookSAM),
            {"plugins": "fp16"},
            TypeError,
            "LookSAM",
        ),
        (
            lambda m: _sam(m.parameters()),
            {"gradient_clip_val": 1.0, "gradient_clip_algorithm": "value"},
            ValueError,
            "gradient_clip_algorithm",
        ),
    ],
)
def test_unsupported_configurations_raise_before_training(make_opt, kw, exc, match):
    from lightning.pytorch.plugins.precision import MixedPrecision

    if kw.get("plugins") == "fp16":
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    module = Net(make_opt=make_opt)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(exc, match=match):
        _fit(module, max_epochs=1, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_averaging_callback_errors():
    with pytest.raises(ValueError, match="Invalid unit: 'batch'"):
        WeightAveragingCallback(unit="batch")
    with pytest.raises(TypeError, match="from_optimizer=True"):
        WeightAveragingCallback(from_optimizer=True, mode="ema")
    with pytest.raises(TypeError, match="WASAM"):
        _fit(Net(), max_epochs=1, callbacks=[WeightAveragingCallback(from_optimizer=True)])


def test_plain_optimizer_is_left_alone():
    module = Net(make_opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    trainer = _fit(module, max_epochs=1, accumulate_grad_batches=2)
    assert trainer.global_step == 3


def test_optim_never_imports_integrations():
    import subprocess
    import sys

    code = (
        "import sys, flatmin, flatmin.optim; "
        "bad = [m for m in sys.modules if m.startswith(('flatmin.integrations', 'lightning', "
        "'transformers'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the documentation page ---------------------------------------------------------------------
def test_documentation_code_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "lightning_doc"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # ... but an example that misuses SAM (backward() before step(closure)) fails.
        warnings.filterwarnings("error", message=".*found gradients computed before")
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
