"""The public Task protocol: a user's own task through resolution, training and the records.

Built-in tasks keep their run hashes (pinned against the committed ``docs/results``); a task found
by import path trains with its own data, loss and clean labels; nested cross-validation never
validates on a fold's test samples; a malformed training state is one clear error.
"""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from flatmin.bench import Hyper, RunSpec, Task, get_task, tensor_dataset, train
from flatmin.bench.train import per_sample_losses
from flatmin.tasks import cross_validation_split, list_tasks
from helpers.toy_tasks import TASKS, toy_dataset
from helpers.user_tasks import USER_MODULE

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "results" / "results.jsonl"


# -- built-in run hashes ------------------------------------------------------------------------


def _spec_of(rec: dict) -> RunSpec:
    task = get_task(rec["task"])
    planned = task.recipe(rec["budget"]).epochs
    epochs = rec["recipe"]["epochs"]
    return RunSpec(
        rec["task"], rec["method"], rec["seed"], rec["budget"], Hyper(**rec["hyper"]),
        None if epochs == planned else epochs, stage=rec["stage"],
    )  # fmt: skip


def test_builtin_run_hashes_equal_the_committed_records():
    """Every committed run of a task with fixed splits keeps its hash (nothing to retrain)."""
    records = [json.loads(line) for line in COMMITTED.read_text().splitlines() if line.strip()]
    fixed = [r for r in records if r.get("folds") is None]
    assert len(fixed) > 300 and {r["stage"] for r in fixed} == {"tune", "eval"}
    for rec in fixed:
        spec = _spec_of(rec)
        assert spec.config_hash(get_task(rec["task"])) == rec["hash"], rec["hash"]
    # A few pinned by hand, so that a change of the hash function itself fails here too.
    pinned = {
        ("digits-noisy40", "tune", "baseline", 100): "e34878624196b81f",
        ("fashion-mnist", "eval", "baseline", 0): "14311f598de6be43",
        ("20newsgroups", "eval", "baseline", 0): "7265551bcff844ec",
    }
    for (task, stage, method, seed), h in pinned.items():
        spec = RunSpec(task, method, seed, "full", stage=stage)
        assert spec.config_hash() == h


# MUTAG's baseline, seed 0, as the committed run recorded it before nested CV (issue #22): one run
# pooling the 10 folds; the rerun replaced it by fold tasks, so it is kept here as a fixture.
_POOLED_MUTAG = {
    "hash": "f61af439ffb46f0d", "task": "mutag", "method": "baseline", "seed": 0,
    "budget": "full", "stage": "eval", "hyper": {}, "folds": 10,
    "average_starts": ["0.5", "0.75", "0.9"],
    "recipe": {"batch_size": 32, "epochs": 100, "fused": True, "lr": 0.01, "momentum": 0.9,
               "optimizer": "adamw", "schedule": "cosine", "test_subset": None,
               "train_subset": None, "val_subset": None, "warmup_epochs": 0,
               "weight_decay": 0.0001},
}  # fmt: skip


def test_cross_validated_task_has_a_new_hash_for_nested_folds():
    rec = _POOLED_MUTAG
    spec = _spec_of(rec)
    config = spec.config()
    assert config["cv"] == "nested" and spec.config_hash() != rec["hash"]
    assert {k: v for k, v in config.items() if k != "cv"} == {
        k: rec[k] for k in config if k != "cv"
    }  # the earlier configuration plus the layout
    # The committed run holds no pooled MUTAG run any more: only its fold tasks.
    tasks = {json.loads(line)["task"] for line in COMMITTED.read_text().splitlines()}
    assert "mutag" not in tasks and {f"mutag@fold{f}" for f in range(10)} <= tasks


# -- resolution by import path ------------------------------------------------------------------




def test_get_task_by_import_path(user_module):
    task = get_task(f"{user_module}:task")
    assert isinstance(task, Task) and task.name == f"{user_module}:task"
    assert task.domain == "tabular" and task.recipe("full") == task.quick  # full defaults to quick
    assert get_task(f"{user_module}:make").name == f"{user_module}:make"  # a factory
    assert get_task(f"{user_module}:Holder.inner").dataset == "mine"  # dotted attributes
    noisy = get_task(f"{user_module}:task-noisy25")
    assert noisy.label_noise == 0.25 and noisy.name == f"{user_module}:task-noisy25"
    assert get_task("digits").name == "digits"  # built-ins unchanged
    assert f"{user_module}:task" not in list_tasks()


@pytest.mark.parametrize(
    ("spec", "exc", "match"),
    [
        ("no-such-task", ValueError, "Unknown task: 'no-such-task'.*package.module:attr"),
        ("usertasks_missing.mod:task", ValueError, "module 'usertasks_missing.mod' does not "),
        ("usertasks_p.broken:task", ValueError, "does not import: RuntimeError: boom"),
        ("usertasks_p.mod:nothing", ValueError, "has no 'nothing'"),
        ("usertasks_p.mod:not_a_task", ValueError, "not_a_task is a int, expected"),
        ("usertasks_p.mod:returns_int", ValueError, "returns_int is a int, expected"),
        ("usertasks_p.mod:", ValueError, "expected package.module:attr"),
        (3, TypeError, "Invalid task: 3"),
    ],
)
def test_get_task_errors(user_module, spec, exc, match):
    with pytest.raises(exc, match=match):
        get_task(spec)


def test_get_task_searches_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_tasks_q.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert get_task("cwd_tasks_q:task").dataset == "mine"
    assert str(tmp_path) in sys.path  # kept for worker processes


# -- nested cross-validation --------------------------------------------------------------------


def test_nested_folds_validate_inside_the_outer_training_set():
    n, k = 60, 4
    y = torch.arange(n) % 3
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)  # the input is the sample's id
    ds = tensor_dataset("ids", train=(x[:30], y[:30]), val=(x[30:40], y[30:40]),
                        test=(x[40:], y[40:]), clean_train_targets=(y[:30] + 1) % 3)  # fmt: skip
    tested = []
    for fold in range(k):
        split = cross_validation_split(ds, k, fold)
        ids = {
            s: set(getattr(split, s).inputs[:, 0].long().tolist()) for s in ("train", "val", "test")
        }
        assert not ids["val"] & ids["test"] and not ids["train"] & ids["val"]
        assert ids["train"] | ids["val"] | ids["test"] == set(range(n))
        assert len(ids["val"]) == round((n - len(ids["test"])) / (k - 1))  # 1 / (k - 1) of it
        assert torch.bincount(split.val.targets).tolist() == [len(ids["val"]) // 3] * 3
        tested += sorted(ids["test"])
        # clean labels travel with their samples (the user's own noise: memorisation)
        clean = split.train.clean_targets
        ids_train = split.train.inputs[:, 0].long()
        expected = torch.where(ids_train < 30, (y[ids_train] + 1) % 3, y[ids_train])
        assert torch.equal(clean, expected)
    assert sorted(tested) == list(range(n))  # every sample tested exactly once


def test_user_task_with_folds_runs_every_fold(user_module):
    task = get_task(f"{user_module}:folded")
    rec = train(RunSpec(f"{user_module}:folded", "baseline", 0), task=task).record
    assert rec["status"] == "ok" and rec["sizes"]["folds"] == 3 and rec["sizes"]["test"] == 90
    assert rec["cv"] == "nested"


# -- a user's data, loss and clean labels -------------------------------------------------------


def _toy_task(**kw) -> Task:
    return replace(TASKS["toy-a"], **{"data": toy_dataset, **kw})


def test_user_loss_is_trained_on_and_mapped_per_sample():
    def ce(out, t):  # cross-entropy, but not the registry's function: the vmap path
        return F.cross_entropy(out, t)

    base = train(RunSpec("toy-a", "sam", 0, epochs=2), task=_toy_task()).record
    own = train(RunSpec("toy-a", "sam", 0, epochs=2), task=_toy_task(loss=ce)).record
    assert own["final"]["test_acc"] == base["final"]["test_acc"]
    assert own["curves"]["train_loss"] == pytest.approx(base["curves"]["train_loss"], rel=1e-5)

    def smooth(out, t):  # a different loss must train a different model
        return F.cross_entropy(out, t, label_smoothing=0.4)

    other = train(RunSpec("toy-a", "sam", 0, epochs=2), task=_toy_task(loss=smooth)).record
    assert other["curves"]["train_loss"] != pytest.approx(base["curves"]["train_loss"], rel=1e-3)
    esam = train(RunSpec("toy-a", "esam", 0, epochs=1), task=_toy_task(loss=smooth)).record
    assert esam["status"] == "ok"
    out, t = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    subset = per_sample_losses(torch.nn.Identity(), out, t, [], smooth)
    manual = torch.stack([smooth(out[i : i + 1], t[i : i + 1]) for i in range(5)])
    assert torch.allclose(subset.losses(out), manual)


def test_clean_labels_turn_on_memorisation():
    ds = toy_dataset()
    flipped = (ds.train.targets + 1) % 3
    noisy = tensor_dataset("toy-noisy", train=(ds.train.inputs, flipped),
                           val=(ds.val.inputs, ds.val.targets),
                           test=(ds.test.inputs, ds.test.targets),
                           clean_train_targets=ds.train.targets)  # fmt: skip
    rec = train(RunSpec("toy-a", "baseline", 0), task=_toy_task(data=noisy)).record["final"]
    # Every training label is flipped: memorised = train accuracy on the labels trained on.
    assert rec["noise_memorised"] == rec["train_acc"]
    assert rec["train_acc_clean"] is not None and rec["train_acc_clean"] != rec["train_acc"]
    plain = train(RunSpec("toy-a", "baseline", 0), task=_toy_task()).record["final"]
    assert plain["train_acc_clean"] is None and plain["noise_memorised"] is None


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2,), float(i)), i % 2


def test_tensor_dataset_from_map_style_datasets():
    ds = tensor_dataset("pairs", train=_Pairs(6), val=_Pairs(4), test=_Pairs(4))
    assert ds.train.inputs.shape == (6, 2) and ds.train.targets.tolist() == [0, 1] * 3
    assert ds.num_classes == 2 and ds.class_names == ("0", "1")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"train": [1, 2]}, TypeError, "Invalid train split"),
        ({"train": (torch.zeros(3, 2), torch.zeros(3))}, ValueError, "Invalid train targets"),
        ({"train": (torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))}, ValueError,
         "3 inputs but 4 targets"),
        ({"num_classes": 1}, ValueError, r"Invalid labels: range \[0, 1\]"),
        ({"clean_train_targets": torch.zeros(5, dtype=torch.long)}, ValueError,
         "Invalid clean_train_targets"),
        ({"class_names": ("a",)}, ValueError, "1 names for 2 classes"),
    ],
)  # fmt: skip
def test_tensor_dataset_errors(kwargs, exc, match):
    xy = (torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    args = {"train": xy, "val": xy, "test": xy, **kwargs}
    with pytest.raises(exc, match=match):
        tensor_dataset("bad", **args)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"quick": None}, TypeError, "Invalid task quick"),
        ({"name": ""}, TypeError, "Invalid task name"),
        ({"build_model": 3}, TypeError, "Invalid task build_model"),
        ({"loss": "ce"}, TypeError, "Invalid task loss"),
        ({"data": [1, 2]}, TypeError, "Invalid task data: list"),
        ({"folds": 2}, ValueError, "Invalid folds: 2"),
        ({"outer_fold": (3, 3)}, ValueError, r"Invalid outer_fold: \(3, 3\)"),
        ({"outer_fold": (0, 3), "folds": 3}, ValueError, "Invalid outer_fold"),
        ({"outer_fold": (0, 3, 1)}, ValueError, "Invalid outer_fold"),
        ({"label_noise": 1.5}, ValueError, "Invalid label_noise"),
    ],
)
def test_task_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        replace(TASKS["toy-a"], **kwargs)


def test_data_that_is_not_a_dataset_is_refused():
    task = _toy_task(data=lambda: {"x": 1})
    with pytest.raises(TypeError, match="Invalid data of task 'toy-a': dict"):
        task.load()


def test_user_task_with_folds_through_the_tuned_grid(user_module, tmp_path):
    import flatmin.bench

    name = f"{user_module}:folded"
    res = flatmin.bench.run(tasks=[name], methods=["baseline", "sam"], seeds=1, out=tmp_path,
                            tune=True, report=False)  # fmt: skip
    assert res.summary.failed == 0 and res.summary.tuning
    # nested: each outer fold is tuned as its own task, on its own inner validation split
    tuned = [r.to_dict() for r in res.summary.tune_records if r.method == "sam"]
    assert {r["task"] for r in tuned} == {f"{name}@fold{f}" for f in range(3)}
    assert all(r["sizes"] == {"train": 30, "val": 30, "test": 30} for r in tuned)
    sam = res.get(name, "sam")
    assert sam.seeds == (0,) and len(sam.fold_hypers) == 3 and res.rows[0].test_size == 90
