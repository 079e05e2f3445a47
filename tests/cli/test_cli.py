"""CLI: exit codes, bad arguments, and train → landscape → sharpness on the digits task."""

from __future__ import annotations

import json
import math

import pytest

from flatmin.bench import evaluate, read_records
from flatmin.bench.checkpoint import load_checkpoint
from flatmin.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--suite", "huge"],
         "Unknown suite: 'huge' (known: quick, full, gpu, when)"),
        (["bench", "--tasks", "cifar10"], "Unknown task: 'cifar10' (known: digits"),
        (["bench", "--methods", "sam", "adamw"], "Unknown method: 'adamw' (known: baseline"),
        (["bench", "--seeds", "0"], "Invalid seeds"),
        (["bench", "--jobs", "0"], "Invalid jobs"),
        (["bench", "--epochs", "0"], "Invalid epochs"),
        (["train", "--task", "nope", "--method", "sam", "--out", "x"], "Unknown task: 'nope'"),
        (["train", "--task", "digits", "--method", "nope", "--out", "x"], "Unknown method"),
        (["train", "--task", "digits", "--method", "sam", "--budget", "huge", "--out", "x"],
         "Invalid budget"),
        (["landscape", "missing.pt"], "missing.pt"),
        (["sharpness", "missing.pt"], "missing.pt"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_2_with_the_valid_names(argv, message, capsys, tmp_path):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["train", "--task", "digits"], ["bench", "--seeds", "two"], ["landscape"], ["frobnicate"]],
)
def test_argparse_errors_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().err


def test_bench_runs_then_resumes(tmp_path, capsys):
    argv = [
        "bench", "--tasks", "digits", "--methods", "baseline", "swa", "--seeds", "1",
        "--epochs", "2", "--jobs", "1", "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    # SWA is read from the baseline's run: one run per seed.
    assert "1 runs: 1 trained, 0 already done" in out and "| digits |" in out
    assert (tmp_path / "report.md").exists() and (tmp_path / "results.csv").exists()
    assert main(argv) == 0
    assert "1 runs: 0 trained, 1 already done" in capsys.readouterr().out
    assert len(read_records(tmp_path / "results.jsonl")) == 1
    assert main([*argv, "--report-only"]) == 0


def test_train_landscape_sharpness(tmp_path, capsys):
    ckpts = {}
    for method in ("swa", "sam"):
        out = tmp_path / method
        argv = [
            "train", "--task", "digits", "--method", method, "--seed", "0", "--epochs", "2",
            "--out", str(out), "--no-progress",
        ]  # fmt: skip
        assert main(argv) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["method"] == method
        ckpts[method] = out / "checkpoint.pt"
        # The checkpoint reproduces the recorded accuracies: the reported (averaged for SWA)
        # weights and the final live weights.
        for weights, key in (("auto", "test_acc"), ("final", "live_test_acc")):
            ck = load_checkpoint(ckpts[method], weights=weights)
            _, acc = evaluate(ck.model, ck.data.test, ck.data.loss_fn, ck.data.correct_fn)
            assert acc == pytest.approx(metrics["final"][key], abs=1e-12)
    assert load_checkpoint(ckpts["swa"]).weights == "averaged"
    with pytest.raises(ValueError, match="has no average"):
        load_checkpoint(ckpts["sam"], weights="averaged")
    with pytest.raises(ValueError, match="Invalid task"):
        load_checkpoint(ckpts["sam"], task="mutag")
    capsys.readouterr()

    land = tmp_path / "land"
    argv = [
        "landscape", str(ckpts["swa"]), str(ckpts["sam"]), "--task", "digits", "--out", str(land),
        "--points", "5", "--max-batches", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    names = {p.name for p in land.iterdir()}
    assert {"rays_test_loss.png", "asymmetry.json", "asymmetry.png"} <= names
    assert "interpolation_swa-s0-avg_to_sam-s0.npz" in names  # between the checkpoints
    assert "interpolation_swa-s0-final_to_swa-s0-avg.npz" in names  # SWA: final vs average
    asym = json.loads((land / "asymmetry.json").read_text())
    for rec in asym.values():
        lm, _, lp = rec["loss"]["test"]
        assert rec["difference"]["test"] == pytest.approx(lp - lm)
    capsys.readouterr()

    argv = [
        "sharpness", str(ckpts["sam"]), "--task", "digits", "--max-batches", "1",
        "--hessian-iters", "5", "--trace-samples", "3", "--out", str(tmp_path / "sharp.json"),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "sharp.json").read_text())
    for key in ("worst_case_sharpness", "adaptive_sharpness", "hessian_trace"):
        assert key in printed
    assert math.isfinite(printed["hessian_top_eigenvalue"])
    assert printed["worst_case_sharpness"]["rho"] == 0.05 and printed["weights"] == "final"


@pytest.mark.parametrize("device", ["", "  "])
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--task", "digits", "--method", "sam", "--out", "x"],
        ["bench", "--tasks", "digits"],
        ["tune", "--task", "digits", "--method", "sam"],
        ["landscape", "c.pt"],
        ["sharpness", "c.pt"],
    ],
)
def test_an_empty_device_is_refused_not_taken_for_the_cpu(argv, device, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--device", device])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(
        f"flatmin {argv[0]}: error: argument --device: {device!r} (expected auto, cpu, cuda, "
        "cuda:N or mps)\n"
    )
    assert not (tmp_path / "x").exists()


def test_landscape_refuses_checkpoints_of_different_tasks(tmp_path, capsys):
    ckpts = []
    for task in ("digits", "digits-noisy40"):
        out = tmp_path / task
        argv = ["train", "--task", task, "--method", "baseline", "--epochs", "1", "--out",
                str(out), "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        ckpts.append(str(out / "checkpoint.pt"))
    capsys.readouterr()
    land = tmp_path / "land"
    argv = ["landscape", *ckpts, "--out", str(land), "--points", "3", "--max-batches", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"flatmin landscape: error: Invalid checkpoints: the tasks differ ({ckpts[0]}: digits, "
        f"{ckpts[1]}: digits-noisy40); landscape compares checkpoints of one task (with --task "
        "T, all are evaluated on T if they share its dataset and model)\n"
    )
    assert not land.exists()
    # Evaluated on one task (same dataset and model), the two are comparable.
    assert main([*argv, "--task", "digits"]) == 0
    assert (land / "interpolation_baseline-s0_to_baseline-s0_2.npz").exists()
