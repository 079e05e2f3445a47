"""flatmin.bench.loggers: what a logger writes is read back (TensorBoard's EventAccumulator,
MLflow's client) and equals what was logged — by hand and from a real tiny training run."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from flatmin.bench import Hyper, RunSpec, train
from flatmin.bench.loggers import (
    LOGGERS,
    TAGS,
    MLflowLogger,
    RunLogger,
    TensorBoardLogger,
    chain,
    open_logger,
    run_name,
    run_params,
)
from helpers.toy_tasks import TASKS, toy_dataset

PARAMS = {"task": "toy-a", "method": "sam", "seed": 3, "hyper": {"rho": 0.05}, "folds": None}
EPOCHS = [
    {"epoch": 1, "lr": 0.1, "train_loss": 1.25, "train_acc": 0.5, "val_loss": 1.5, "val_acc": 0.4},
    {"epoch": 2, "lr": 0.05, "train_loss": 0.75, "train_acc": 0.7, "val_loss": 1.0, "val_acc": 0.6},
    {"epoch": 3, "lr": 0.0, "train_loss": math.nan, "train_acc": 0.8, "val_acc": 0.7},
]
FINAL = {"test_acc": 0.625, "train_acc": 0.875, "noise_memorised": None, "wall_time": 2.5}


# -- reading back ------------------------------------------------------------------------------
def _tb_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _tb_hparams(run_dir) -> dict[str, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def _f32(value: float) -> float:
    return float(np.float32(value))


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One local MLflow store for the module (creating its database takes seconds)."""
    pytest.importorskip("mlflow")
    return MLflowLogger(tmp_path_factory.mktemp("mlflow"))


def _ml_history(logger: MLflowLogger, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = logger.client.get_run(run_id)
    return {
        key: sorted((m.step, m.value) for m in logger.client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }


def _run_id(logger: MLflowLogger, name: str) -> str:
    (run,) = logger.client.search_runs([logger.experiment_id], f"attributes.run_name = '{name}'")
    return run.info.run_id


def _expected(epochs=EPOCHS, params=PARAMS):
    """The scalars the logger must write for ``epochs`` (wall time apart), by tag and step."""
    out: dict[str, list[tuple[int, float]]] = {}
    for m in epochs:
        for k, v in m.items():
            if k != "epoch" and math.isfinite(v):
                out.setdefault(TAGS[k], []).append((m["epoch"], v))
        out.setdefault("rho", []).append((m["epoch"], params["hyper"]["rho"]))
    last = epochs[-1]["epoch"]
    for k, v in FINAL.items():
        if v is not None:
            out[f"final/{k}"] = [(last, v)]
    return out


def _log_by_hand(logger: RunLogger, name: str) -> None:
    logger.start_run(name, PARAMS)
    for m in EPOCHS:
        logger(m["epoch"], 3, m)
    logger.end_run("ok", FINAL)


# -- by hand -------------------------------------------------------------------------------------
def test_tensorboard_events_equal_the_logged_values(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path)
    _log_by_hand(logger, "by-hand")
    scalars = _tb_scalars(tmp_path / "by-hand")
    wall = scalars.pop("time/wall_s")
    assert set(scalars) == {
        "train/loss", "train/acc", "val/loss", "val/acc", "lr", "rho", "final/test_acc",
        "final/train_acc", "final/wall_time",
    }  # fmt: skip
    assert scalars == {t: [(s, _f32(v)) for s, v in e] for t, e in _expected().items()}
    # The wall clock of each epoch, in order (the train/loss NaN of epoch 3 is not logged).
    assert [s for s, _ in wall] == [1, 2, 3]
    assert all(b >= a >= 0 for (_, a), (_, b) in itertools.pairwise(wall))
    assert _tb_hparams(tmp_path / "by-hand") == {
        "task": "toy-a", "method": "sam", "seed": 3.0, "hyper.rho": 0.05, "folds": "None",
        "status": "ok",
    }  # fmt: skip


def test_mlflow_metrics_and_params_equal_the_logged_values(mlflow_store):
    _log_by_hand(mlflow_store, "by-hand")
    run_id = _run_id(mlflow_store, "by-hand")
    history = _ml_history(mlflow_store, run_id)
    wall = history.pop("time/wall_s")
    assert history == _expected()  # float64: exact
    assert [s for s, _ in wall] == [1, 2, 3]
    run = mlflow_store.client.get_run(run_id)
    assert run.data.params == {
        "task": "toy-a", "method": "sam", "seed": "3", "hyper.rho": "0.05", "folds": "None",
    }  # fmt: skip
    assert run.info.status == "FINISHED" and run.info.run_name == "by-hand"


def test_mlflow_run_failed_inside_the_context_ends_failed(mlflow_store):
    with pytest.raises(ZeroDivisionError), mlflow_store.run("crash", PARAMS) as on_epoch:
        on_epoch(1, 2, EPOCHS[0])
        _ = 1 / 0
    assert mlflow_store.client.get_run(_run_id(mlflow_store, "crash")).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), mlflow_store.run("ctrl-c", PARAMS):
        raise KeyboardInterrupt
    assert mlflow_store.client.get_run(_run_id(mlflow_store, "ctrl-c")).info.status == "KILLED"


def test_folds_follow_each_other_in_steps(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path)
    with logger.run("cv", {}) as on_epoch:
        for fold_loss in (1.0, 2.0, 3.0):  # three folds of two epochs
            for epoch in (1, 2):
                on_epoch(epoch, 2, {"train_loss": fold_loss + epoch / 10})
    steps = _tb_scalars(tmp_path / "cv")["train/loss"]
    assert steps == [(s, _f32(v)) for s, v in [(1, 1.1), (2, 1.2), (3, 2.1), (4, 2.2), (5, 3.1),
                                                (6, 3.2)]]  # fmt: skip


# -- a real tiny training run --------------------------------------------------------------------
def _spec(method: str = "sam") -> RunSpec:
    return RunSpec("toy-a", method, seed=1, hyper=Hyper(rho=0.05) if method == "sam" else Hyper())


def _train(on_epoch=None):
    return train(_spec(), task=TASKS["toy-a"], dataset=toy_dataset(), on_epoch=on_epoch).record


def _strip(record):
    return {k: v for k, v in record.items() if k != "wall_time"}


@pytest.mark.parametrize("kind", sorted(LOGGERS))
def test_real_training_through_the_callback(kind, tmp_path, request):
    pytest.importorskip(kind)
    logger = (
        request.getfixturevalue("mlflow_store") if kind == "mlflow" else TensorBoardLogger(tmp_path)
    )
    seen: list[dict[str, float]] = []
    spec = _spec()
    config = spec.config(TASKS["toy-a"])
    with logger.run(run_name(config), run_params(config)) as on_epoch:
        record = _train(chain(lambda e, n, m: seen.append(dict(m)), on_epoch))
        logger.finish(record)
    if kind == "mlflow":
        events = _ml_history(logger, _run_id(logger, run_name(config)))
        same = lambda a, b: a == b  # noqa: E731 - float64 both sides
    else:
        events = _tb_scalars(tmp_path / run_name(config))
        same = lambda a, b: a == _f32(b)  # noqa: E731 - TensorBoard stores float32

    curves, epochs = record["curves"], record["epochs"]
    assert epochs == len(seen) == 4 and [m["epoch"] for m in seen] == [1, 2, 3, 4]
    for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc"):
        logged = events[TAGS[key]]
        assert [s for s, _ in logged] == curves["epoch"] == [1, 2, 3, 4]
        # The exact values the loop passed, and the record's curves (7 significant digits).
        assert all(same(v, m[key]) for (_, v), m in zip(logged, seen, strict=True))
        assert [float(f"{m[key]:.7g}") for m in seen] == curves[key]
    assert [v for _, v in events["rho"]] == [_f32(0.05) if kind != "mlflow" else 0.05] * 4
    assert [s for s, _ in events["time/wall_s"]] == [1, 2, 3, 4]
    for key, value in record["final"].items():
        if value is not None:
            assert events[f"final/{key}"] == [(4, value if kind == "mlflow" else _f32(value))]
    assert same(events["final/wall_time"][0][1], record["wall_time"])


def test_log_record_replays_a_records_curves(mlflow_store):
    record = _train()
    mlflow_store.log_record(record)
    run_id = _run_id(mlflow_store, run_name(record))
    history = _ml_history(mlflow_store, run_id)
    curves = record["curves"]
    for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc"):
        assert history[TAGS[key]] == list(zip(curves["epoch"], curves[key], strict=True))
    assert "time/wall_s" not in history  # unknown per epoch in a record
    assert history["final/wall_time"] == [(4, record["wall_time"])]
    run = mlflow_store.client.get_run(run_id)
    assert run_name(record) == f"toy-a-sam-s1-{record['hash'][:8]}"
    assert run.data.params["hyper.rho"] == "0.05" and run.data.params["recipe.lr"] == "0.1"
    assert run.info.status == "FINISHED"


def test_training_is_unchanged_by_a_logger(tmp_path):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    plain = _train()
    torch.manual_seed(0)
    with TensorBoardLogger(tmp_path).run("x", {}) as on_epoch:
        logged = _train(on_epoch)
    assert _strip(logged) == _strip(plain)


# -- protocol and errors -------------------------------------------------------------------------
def test_protocol_misuse_and_bad_values(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(RuntimeError, match=r"log_epoch\(\) without an open run"):
        logger.log_epoch(1, 1, {})
    with pytest.raises(RuntimeError, match=r"end_run\(\) without an open run"):
        logger.end_run()
    with pytest.raises(ValueError, match=r"Invalid run name: ''"):
        logger.start_run("")
    logger.start_run("a")
    with pytest.raises(RuntimeError, match="already open"):
        logger.start_run("b")
    with pytest.raises(ValueError, match=r"Invalid status: 'done'"):
        logger.end_run("done")
    logger.close()  # ends the open run as killed
    assert _tb_hparams(tmp_path / "a")["status"] == "killed"
    with pytest.raises(ValueError, match=r"Unknown logger: 'wandb' \(known: tensorboard, mlflow\)"):
        open_logger("wandb", tmp_path)
    assert isinstance(open_logger("tensorboard", tmp_path), TensorBoardLogger)


@pytest.mark.parametrize(
    ("cls", "blocked"),
    [(TensorBoardLogger, "torch.utils.tensorboard"), (MLflowLogger, "mlflow.tracking")],
)
def test_missing_extra_is_a_clear_import_error(cls, blocked, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, blocked, None)
    extra = "tensorboard" if cls is TensorBoardLogger else "mlflow"
    with pytest.raises(ImportError, match=rf"pip install 'flatmin\[{extra}\]'"):
        cls(tmp_path)


def test_importing_the_module_imports_no_backend():
    code = (
        "import sys, flatmin.bench.loggers; "
        "print(sorted(m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_params_and_name():
    assert run_params({"b": [1, 2], "a": {"x": {"y": True}}, "c": 1.5}) == {
        "a.x.y": True, "b": "[1, 2]", "c": 1.5,
    }  # fmt: skip
    assert run_name({"task": "a b/c", "method": "sam", "seed": 0}) == "a_b_c-sam-s0"
