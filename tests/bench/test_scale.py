"""Devices, precision and the training loop's CPU float32 path (issue 14), on the CPU.

The training loop was rewritten to run on accelerators without a host sync per step; its CPU
float32 path must stay bit-identical to the loop the committed benchmark results came from. That
loop is kept here as the reference (``_reference_loop``: ``float(loss)`` and integer counts every
step, the non-finite check at the failing step) and compared with ``train()`` bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from flatmin.bench import BenchConfig, Hyper, RunSpec, get_method, get_suite, read_records, train
from flatmin.bench.device import (
    PRECISIONS,
    DeviceUnavailableError,
    autocast,
    check_support,
    grad_scaler,
    resolve_device,
)
from flatmin.bench.loop import scheduler as _scheduler
from flatmin.bench.methods import BuildContext
from flatmin.bench.train import per_sample_losses
from flatmin.cli import PRECISIONS as CLI_PRECISIONS
from flatmin.cli import main
from flatmin.data import IGNORE_INDEX
from flatmin.data.batching import Batches
from flatmin.data.splits import TensorSplit
from flatmin.optim.sam import SAM
from flatmin.tasks import correct_counts, correct_fn, get_task
from flatmin.tasks.models import WideResNet

# -- the reference: the training loop before devices (live weights and train curves) --------------


def _reference_loop(spec: RunSpec, task: Any, fold: int | None = None) -> dict[str, Any]:
    spec = spec.resolved()
    method = get_method(spec.method)
    trajectory = get_method(method.trajectory)
    data = task.load(spec.budget, seed=spec.seed, fold=fold)
    if spec.epochs is not None:
        data = replace(data, recipe=replace(data.recipe, epochs=spec.epochs))
    recipe = data.recipe
    model = data.make_model()
    opt = trajectory.build(
        BuildContext(
            model, recipe.optimizer_class, recipe.optimizer_kwargs(), spec.hyper, recipe.epochs,
            spec.seed,
        )
    )  # fmt: skip
    sched = _scheduler(opt, recipe, method, spec.hyper, len(data.train))
    curves: dict[str, list[float]] = {"train_loss": [], "train_acc": []}
    step = 0
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        run_loss = torch.zeros((), dtype=torch.float64)
        run_correct, run_count = 0, 0
        for inputs, targets in data.train:
            outputs: list[torch.Tensor] = []
            labelled = torch.nonzero(targets != IGNORE_INDEX).flatten()
            subset = per_sample_losses(model, inputs, targets, outputs)

            def closure(
                index=None, inputs=inputs, targets=targets, outputs=outputs, labelled=labelled,
                subset=subset,
            ):  # fmt: skip
                opt.zero_grad(set_to_none=True)
                if index is not None:
                    losses = subset(index)
                    losses.mean().backward()
                    return losses.detach()
                out = model(inputs)
                if torch.is_grad_enabled():
                    data.loss_fn(out, targets).backward()
                outputs.append(out.detach())
                return F.cross_entropy(out.detach()[labelled], targets[labelled], reduction="none")

            kw = {"model": model} if isinstance(opt, SAM) else {}
            loss = opt.step(closure, **kw).mean()
            value = float(loss.detach())
            if not math.isfinite(value):
                reason = f"non-finite training loss {value} at epoch {epoch}, step {step + 1}"
                return {"status": "failed", "reason": reason, "steps": step}
            sched.step()
            step += 1
            c, n = data.correct_fn(outputs[0], targets)
            run_loss += value * n
            run_correct, run_count = run_correct + c, run_count + n
        curves["train_loss"].append(float(f"{float(run_loss) / max(1, run_count):.7g}"))
        curves["train_acc"].append(float(f"{run_correct / max(1, run_count):.7g}"))
    return {"status": "ok", "weights": model.state_dict(), "curves": curves, "steps": step}


@pytest.mark.parametrize(
    ("task", "method", "epochs"),
    [
        ("digits-noisy40", "baseline", 2),
        ("digits-noisy40", "sam", 2),
        ("digits", "asam", 2),
        ("digits-noisy40", "esam", 1),
        ("digits-noisy40", "looksam", 2),
        ("mutag-gcn", "sam", 2),  # graph batches
        ("drosophila", "baseline", 3),  # one node-classification graph, ignored targets
    ],
)
def test_cpu_fp32_loop_is_bit_identical_to_the_reference(task, method, epochs):
    spec = RunSpec(task, method, 0, "quick", epochs=epochs)
    ref = _reference_loop(spec, get_task(task))
    res = train(spec, eval_val=False)
    got = res.model.state_dict()
    assert got.keys() == ref["weights"].keys()
    for name, tensor in ref["weights"].items():
        assert torch.equal(got[name], tensor), name
    for key in ("train_loss", "train_acc"):
        assert res.record["curves"][key] == ref["curves"][key]
    assert res.record["steps"] == ref["steps"]
    # The defaults are the CPU float32 path, and the hash does not mention them.
    assert (res.record["device"], res.record["precision"], res.record["world_size"]) == (
        "cpu", "fp32", 1,
    )  # fmt: skip
    assert "device" not in spec.config() and "precision" not in spec.config()


def test_cpu_fp32_loop_reports_the_first_nonfinite_step_as_before():
    digits = get_task("digits")
    task = replace(digits, quick=replace(digits.quick, lr=1e4, epochs=2))  # diverges in epoch 1
    for method in ("baseline", "sam"):
        spec = RunSpec("digits", method, 0, "quick")
        ref = _reference_loop(spec, task)
        rec = train(spec, task=task).record
        assert ref["status"] == rec["status"] == "failed"
        assert rec["reason"] == ref["reason"] and rec["steps"] == ref["steps"] > 0
        assert rec["epochs"] == 0  # the failing epoch is not in the curves


def test_cross_validated_fold_matches_the_reference():
    spec = RunSpec("mutag", "baseline", 0, "quick", epochs=2)
    task = replace(get_task("mutag"), folds=3)  # the last fold's model is the reported one
    ref = _reference_loop(spec, task, fold=2)
    res = train(spec, task=task, eval_val=False)
    for name, tensor in ref["weights"].items():
        assert torch.equal(res.model.state_dict()[name], tensor), name


# -- devices and precision ---------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="Invalid device: 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(DeviceUnavailableError, match=f"Invalid device: '{name}' is not"):
                resolve_device(name)
        assert resolve_device("auto") != torch.device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceUnavailableError, match="'mps' is not available"):
            resolve_device("mps")


def test_precision_contexts():
    assert CLI_PRECISIONS == PRECISIONS
    cpu = torch.device("cpu")
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with autocast(cpu, "fp32"):
        assert torch.equal(torch.nn.functional.linear(x, w), x @ w.T)
        assert not torch.is_autocast_enabled("cpu")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(cpu, precision):
            assert torch.nn.functional.linear(x, w).dtype == dtype
    assert grad_scaler(cpu, "fp32") is None and grad_scaler(cpu, "bf16") is None
    assert isinstance(grad_scaler(cpu, "fp16"), torch.amp.GradScaler)
    with pytest.raises(ValueError, match="Invalid precision: 'fp8'"):
        autocast(cpu, "fp8")


def test_config_hash_names_device_type_and_precision_only_when_not_default():
    base = RunSpec("digits", "sam", 0, "quick", Hyper(rho=0.1), epochs=2)
    config = base.config()
    expected = hashlib.sha256(
        json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:16]
    assert base.config_hash() == expected and "device" not in config
    assert replace(base, device="cpu", precision="fp32").config_hash() == base.config_hash()
    gpu0, gpu1 = replace(base, device="cuda:0"), replace(base, device="cuda:1")
    assert gpu0.config()["device"] == "cuda" and gpu0.config_hash() == gpu1.config_hash()
    assert gpu0.config_hash() != base.config_hash()
    bf16 = replace(base, precision="bf16")
    assert bf16.config() == {**config, "precision": "bf16"}
    with pytest.raises(ValueError, match="Invalid precision"):
        RunSpec("digits", "sam", 0, precision="half")
    with pytest.raises(ValueError, match="Invalid device"):
        RunSpec("digits", "sam", 0, device="gpu")


def test_fp16_supports_plain_and_sam_trajectories_only():
    for method in ("baseline", "swa", "swa-lr", "sam", "asam", "wasam"):
        check_support(RunSpec("digits", method, 0, precision="fp16"))
    for method in ("samk", "looksam", "esam"):
        with pytest.raises(ValueError, match=f"Invalid precision: 'fp16' for method '{method}'"):
            check_support(RunSpec("digits", method, 0, precision="fp16"))
    with pytest.raises(ValueError, match="Invalid method for several processes: 'esam'"):
        check_support(RunSpec("digits", "esam", 0), world_size=2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_train_in_that_precision(precision):
    spec = RunSpec("digits", "sam", 0, "quick", epochs=1)
    fp32 = train(spec)
    low = train(replace(spec, precision=precision))
    rec = low.record
    assert rec["status"] == "ok" and rec["precision"] == precision
    assert rec["hash"] != fp32.record["hash"]
    # The arithmetic differs (autocast ran) but only at the precision's resolution: the first
    # epoch's mean training loss agrees with fp32's to the bf16/fp16 rounding of the logits.
    weights = zip(low.model.state_dict().values(), fp32.model.state_dict().values())
    assert any(not torch.equal(a, b) for a, b in weights)
    first_low, first_fp32 = rec["curves"]["train_loss"][0], fp32.record["curves"]["train_loss"][0]
    assert abs(first_low - first_fp32) < 2e-2 * first_fp32
    assert abs(rec["final"]["test_acc"] - fp32.record["final"]["test_acc"]) < 0.05


def test_correct_counts_equal_correct_fn():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(50, 4, generator=g)
    targets = torch.randint(0, 4, (50,), generator=g)
    targets[::3] = IGNORE_INDEX
    c, n = correct_counts(out, targets)
    assert (int(c), int(n)) == correct_fn(out, targets)


# -- data on a device, shards of a batch --------------------------------------------------------


def test_shards_of_every_batch_are_the_unsharded_batch():
    split = TensorSplit(torch.arange(20.0).unsqueeze(1), torch.arange(20))

    def stream(shard=None):
        b = Batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(3),
                    drop_last=True, shard=shard)  # fmt: skip
        return [[t.tolist() for t in batch] for _ in range(2) for batch in b]  # two epochs

    whole = stream()
    parts = [stream((r, 2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 10
    for k, (_, y) in enumerate(whole):
        assert sorted(parts[0][k][1] + parts[1][k][1]) == sorted(y)
        assert parts[0][k][1] == y[0::2] and parts[1][k][1] == y[1::2]
    with pytest.raises(ValueError, match="3 processes cannot share batches of 4"):
        Batches(split, 4, shard=(0, 3))
    with pytest.raises(ValueError, match="Invalid shard"):
        Batches(split, 4, shard=(2, 2))


def test_task_data_moves_to_a_device_once():
    # The meta device stands in for an accelerator: every tensor must arrive there.
    for name in ("digits-noisy40", "mutag-gcn", "drosophila"):
        data = get_task(name).load("quick", seed=0)
        assert data.to("cpu") is data
        moved = data.to("meta", resident=True)
        assert moved.device == torch.device("meta")
        assert next(moved.make_model().parameters()).device.type == "meta"
        for stream in (moved.train, moved.train_eval, moved.val, moved.test):
            inputs, targets = next(iter(stream))
            tensors = [inputs] if isinstance(inputs, torch.Tensor) else list(vars(inputs).values())
            assert all(t.device.type == "meta" for t in tensors if isinstance(t, torch.Tensor))
            assert targets.device.type == "meta"
        assert len(moved.train) == len(data.train) and moved.train.generator is data.train.generator
        if name == "digits-noisy40":
            ds = moved.dataset.train
            assert ds.inputs.device.type == ds.clean_targets.device.type == "meta"
        host = data.to("meta", resident=False)  # too big for the device: batches copied one by one
        assert host.dataset.train is data.dataset.train
        assert next(iter(host.train))[1].device.type == "meta"


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_device_cpu_and_precision_fp32_are_the_default_run(tmp_path):
    argv = ["train", "--task", "digits", "--method", "swa", "--epochs", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert (
        main([*argv, "--out", str(tmp_path / "b"), "--device", "cpu", "--precision", "fp32"]) == 0
    )
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for key in ("final", "averaged"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["hash"] == mb["hash"] and ma["final"] == mb["final"]
    assert mb["device"] == "cpu" and mb["precision"] == "fp32" and mb["world_size"] == 1
    assert mb["versions"]["torch"] == torch.__version__


def test_cli_bf16_run_records_its_precision(tmp_path):
    out = tmp_path / "bf16"
    argv = ["train", "--task", "digits", "--method", "sam", "--epochs", "1", "--no-progress",
            "--precision", "bf16", "--device", "auto", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "bf16" and metrics["status"] == "ok"
    assert metrics["device"] == str(resolve_device("auto"))


def test_cli_bench_and_sharpness_at_a_precision(tmp_path, capsys):
    argv = ["bench", "--tasks", "digits", "--methods", "baseline", "--seeds", "1", "--epochs", "1",
            "--jobs", "1", "--no-progress", "--device", "cpu", "--precision", "bf16",
            "--out", str(tmp_path / "bench")]  # fmt: skip
    assert main(argv) == 0
    (rec,) = [r.to_dict() for r in read_records(tmp_path / "bench" / "results.jsonl")]
    assert rec["precision"] == "bf16" and rec["device"] == "cpu"
    spec = RunSpec("digits", "baseline", 0, "full", epochs=1, precision="bf16")  # quick suite
    assert rec["hash"] == spec.config_hash()
    out = tmp_path / "run"
    argv = ["train", "--task", "digits", "--method", "sam", "--epochs", "1", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    argv = ["sharpness", str(out / "checkpoint.pt"), "--max-batches", "1", "--hessian-iters", "3",
            "--trace-samples", "2", "--precision", "bf16", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["settings"]["precision"] == "bf16" and printed["settings"]["device"] == "cpu"
    assert math.isfinite(printed["worst_case_sharpness"]["mean"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--task", "digits", "--method", "sam", "--out", "OUT", "--device", "cuda"],
        ["bench", "--tasks", "digits", "--seeds", "1", "--out", "OUT", "--device", "cuda:1"],
        ["sharpness", "CKPT", "--device", "cuda"],
        ["landscape", "CKPT", "--out", "OUT", "--device", "cuda"],
    ],
)
def test_cli_unavailable_device_is_exit_2(argv, tmp_path, capsys):
    ckpt = tmp_path / "missing.pt"
    argv = [str(tmp_path / "o") if a == "OUT" else str(ckpt) if a == "CKPT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: Invalid device: 'cuda" in err and "is not available" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "looksam", "--precision", "fp16"], "Invalid precision: 'fp16'"),
        (["--method", "sam", "--sam-mode", "per-replica"], "needs several processes"),
        (["--method", "sam", "--fsdp"], "Invalid --fsdp: FSDP2 shards the model over several"),
        (["--method", "sam", "--device", "tpu"], "Invalid device: 'tpu'"),
    ],
)
def test_cli_train_refuses_unsupported_options(argv, message, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--task", "digits", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bench_precision_is_checked_for_every_method(tmp_path, capsys):
    argv = ["bench", "--tasks", "digits", "--methods", "baseline", "looksam", "--seeds", "1",
            "--precision", "fp16", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    assert "Invalid precision: 'fp16' for method 'looksam'" in capsys.readouterr().err


# -- the GPU-size task and suite --------------------------------------------------------------


def _wrn_parameters(depth: int, k: int, c_in: int, classes: int) -> int:
    """WRN-depth-k parameter count written out from the architecture (Zagoruyko & Komodakis)."""
    n = (depth - 4) // 6
    total = 16 * c_in * 9  # stem
    c = 16
    for width in (16 * k, 32 * k, 64 * k):
        for j in range(n):
            total += 2 * c + c * width * 9 + 2 * width + width * width * 9  # bn1, conv1, bn2, conv2
            if j == 0 and c != width:
                total += c * width  # 1x1 projection
            c = width
    return total + 2 * c + c * classes + classes  # final BN, FC


def test_wide_resnet_shapes_and_parameter_count():
    net = WideResNet(10, depth=16, width=4)
    assert sum(p.numel() for p in net.parameters()) == _wrn_parameters(16, 4, 1, 10) == 2748602
    assert sum(p.numel() for p in WideResNet(10, depth=28, width=10, in_channels=3).parameters()) \
        == _wrn_parameters(28, 10, 3, 10)  # fmt: skip
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    for bad in ({"depth": 15}, {"depth": 4}, {"width": 0}):
        with pytest.raises(ValueError, match="Invalid"):
            WideResNet(10, **bad)


def test_gpu_suite():
    suite = get_suite("gpu")
    assert suite.tasks == ("fashion-mnist-full",) and suite.seeds == 3
    assert suite.methods == ("baseline", "swa", "sam", "wasam")
    assert (suite.device, suite.precision, suite.tune) == ("auto", "bf16", False)
    assert suite.hypers["fashion-mnist-full"]["sam"].rho == 0.05  # Foret et al., Table 7
    cfg = BenchConfig.from_suite(suite, "runs/gpu", device="cpu")
    assert cfg.device == "cpu" and cfg.precision == "bf16"
    cfg.validate()
    task = get_task("fashion-mnist-full")
    assert task.model == "WRN-16-4" and task.full.batch_size == 128
    for name in ("quick", "full"):  # the other suites keep their CPU defaults
        assert (get_suite(name).device, get_suite(name).precision) == ("cpu", "fp32")


@pytest.mark.slow
def test_fashion_mnist_full_smoke_run():
    from helpers.data import load_or_skip

    data = load_or_skip("fashion-mnist-full")
    sizes = {split: len(getattr(data.dataset, split)) for split in ("train", "val", "test")}
    assert all(120 <= n <= 140 for n in sizes.values())  # stratified subsets of about 128
    rec = train(RunSpec("fashion-mnist-full", "baseline", 0, "quick"), eval_val=False).record
    assert rec["status"] == "ok" and rec["epochs"] == 1
    assert rec["steps"] == len(data.train) == sizes["train"] // 128
    assert rec["sizes"] == sizes and rec["model"] == "WRN-16-4"
