"""``--log tensorboard DIR`` / ``--log mlflow URI`` on train, bench and tune: the events read back
equal what the run wrote to its own files (metrics.json, results.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flatmin.bench.loggers import TAGS
from flatmin.cli import main

ROOT = Path(__file__).parents[2]
OWN = "examples.own_task:my_task"


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _expect_curves(rec: dict, got: dict[str, list[tuple[int, float]]]) -> None:
    """Every per-epoch curve of the record is logged at its epoch, and the final metrics too."""
    curves = rec["curves"]
    for key, values in curves.items():
        if key == "epoch":
            continue
        want = [(int(e), float(v)) for e, v in zip(curves["epoch"], values, strict=True)]
        steps = [s for s, _ in got[TAGS[key]]]
        assert steps == [e for e, _ in want], key
        # Event files store float32.
        for (_, a), (_, b) in zip(got[TAGS[key]], want, strict=True):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-7), key
    for key, value in rec["final"].items():
        if value is not None and math.isfinite(value):
            assert got[f"final/{key}"][0][1] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_train_log_tensorboard_equals_metrics_json(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.chdir(ROOT)
    out, tb = tmp_path / "run", tmp_path / "tb"
    argv = ["train", "--task", OWN, "--method", "sam", "--epochs", "3", "--no-progress",
            "--out", str(out), "--log", "tensorboard", str(tb)]  # fmt: skip
    assert main(argv) == 0
    rec = json.loads((out / "metrics.json").read_text())
    (run_dir,) = [p for p in tb.iterdir() if p.is_dir()]
    assert rec["hash"][:8] in run_dir.name
    got = _scalars(run_dir)
    _expect_curves(rec, got)
    # Live extras the record's curves do not hold: wall time per epoch and SAM's rho.
    assert [s for s, _ in got[TAGS["wall_time"]]] == rec["curves"]["epoch"]
    assert [v for _, v in got[TAGS["rho"]]] == pytest.approx([rec["hyper"]["rho"]] * 3)


def test_bench_log_one_run_per_record(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.chdir(ROOT)
    out, tb = tmp_path / "bench", tmp_path / "tb"
    argv = ["bench", "--tasks", OWN, "--methods", "baseline", "sam", "--seeds", "2",
            "--epochs", "2", "--no-progress", "--out", str(out), "--log", "tensorboard", str(tb)]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = {p.name: p for p in tb.iterdir() if p.is_dir()}
    assert len(runs) == len(records) == 4
    for rec in records:
        (name,) = [n for n in runs if rec["hash"][:8] in n]
        _expect_curves(rec, _scalars(runs[name]))
    # A rerun trains nothing and logs nothing more.
    assert main(argv) == 0
    assert len([p for p in tb.iterdir() if p.is_dir()]) == 4


def test_tune_log_mlflow_every_seed_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("optuna")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(ROOT)
    store = tmp_path / "mlruns"
    argv = ["tune", "--task", OWN, "--method", "sam", "--trials", "2", "--seeds", "1",
            "--epochs", "2", "--no-progress", "--out", str(tmp_path / "tune"),
            "--pruner", "none", "--log", "mlflow", str(store)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "tune" / "tune.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "flatmin"]
    runs = client.search_runs([exp.experiment_id])
    finals = sorted(r.data.metrics["final/val_acc"] for r in runs)
    trials = sorted(
        run["final"] for t in summary["trials"] for run in t["runs"] if run["final"] is not None
    )
    assert len(runs) == 2 and finals == pytest.approx(trials)
    for r in runs:
        assert r.info.status == "FINISHED"
        history = client.get_metric_history(r.info.run_id, "val/acc")
        assert [m.step for m in history] == [1, 2]
        assert history[-1].value == pytest.approx(r.data.metrics["final/val_acc"])


@pytest.mark.parametrize("command", ["train", "bench", "tune"])
def test_an_unknown_logger_is_refused_before_anything_runs(tmp_path, capsys, command):
    argv = {
        "train": ["train", "--task", "digits", "--method", "sam", "--out", str(tmp_path / "r")],
        "bench": ["bench", "--suite", "quick", "--out", str(tmp_path / "r")],
        "tune": ["tune", "--task", "digits", "--method", "sam", "--out", str(tmp_path / "r")],
    }[command]
    assert main([*argv, "--log", "wandb", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "Unknown logger: 'wandb'" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
