"""Nested cross-validation (#22): each outer fold is a task, tuned on its own validation split.

A cross-validated task enters the benchmark as its fold tasks ``<task>@fold<f>``; the runner tunes
and evaluates each like any task with fixed splits, then pools the folds per method and seed into
one result of the task (Σ correct / Σ total over the folds; every sample tested once).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

import flatmin.bench
from flatmin.bench import BenchConfig, Hyper, RunSpec, Task, get_task, run_grid, train
from flatmin.bench.methods import START_GRID, get_method
from flatmin.bench.records import MethodResult, parse_record, pool_folds
from flatmin.bench.report import _hyper_table, summarize
from flatmin.bench.spec import average_key
from flatmin.tasks import Recipe, cross_validation_split, split_fold_name
from helpers.toy_tasks import TASKS, ToyResolver, toy_dataset, toy_graph_dataset

RECIPE = Recipe("sgd", lr=0.1, weight_decay=0.0, batch_size=16, epochs=2)


def _mlp(ds):
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, ds.num_classes))


TOY_CV = replace(TASKS["toy-a"], name="toy-cv", folds=3, data=toy_dataset)


class _CVResolver(ToyResolver):
    """The toy tasks and ``toy-cv`` (3 folds of the toy data)."""

    def task(self, name: str) -> Task:
        return TOY_CV if name == "toy-cv" else super().task(name)


# -- fold tasks --------------------------------------------------------------------------------


def test_a_fold_task_has_exactly_the_nested_splits_of_its_fold(user_module):
    parent = get_task(f"{user_module}:folded")
    whole = parent.load_dataset()
    for f in range(3):
        task = get_task(f"{user_module}:folded@fold{f}")  # an import path with a fold
        assert task.name == f"{user_module}:folded@fold{f}" and task.folds is None
        assert split_fold_name(task.name) == (f"{user_module}:folded", f)
        ds = task.load("quick", seed=0).dataset
        expected = cross_validation_split(whole, 3, f)
        for s in ("train", "val", "test"):
            assert torch.equal(getattr(ds, s).inputs, getattr(expected, s).inputs)
        # the same data as the fold's run inside the cross-validated task
        assert torch.equal(ds.test.targets, parent.load("quick", fold=f).dataset.test.targets)


def test_no_graph_of_a_test_fold_is_in_that_folds_train_or_val():
    graphs = replace(TASKS["toy-graph"], name="toy-graph-cv", folds=4, data=toy_graph_dataset())
    tested = []
    for f in range(4):
        ds = graphs.fold(f).load("quick").dataset
        ids = {s: {id(g) for g in getattr(ds, s).graphs} for s in ("train", "val", "test")}
        assert not ids["test"] & (ids["train"] | ids["val"]) and not ids["train"] & ids["val"]
        tested += ids["test"]
    assert len(tested) == len(set(tested)) == 80  # every graph tested once over the folds


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("digits@fold0", "Invalid fold: 0 .task digits has fixed splits"),
        ("mutag@fold10", r"Invalid fold: 10 .task mutag has folds 0\.\.9"),
        ("mutag@fold03", "Unknown task: 'mutag@fold03'"),
    ],
)
def test_bad_fold_names_are_refused(name, match):
    with pytest.raises(ValueError, match=match):
        get_task(name)


def test_grids_refuse_a_fold_beside_its_task_and_a_folded_ablation_task(tmp_path):
    base = dict(out=tmp_path, methods=("baseline",), seeds=(0,), progress=False)
    with pytest.raises(ValueError, match="'toy-cv@fold1' is a fold of 'toy-cv'"):
        run_grid(BenchConfig(tasks=("toy-cv", "toy-cv@fold1"), **base), resolver=_CVResolver())
    with pytest.raises(ValueError, match=r"'toy-cv' is cross-validated \(3 folds.*toy-cv@fold0"):
        run_grid(BenchConfig(tasks=("toy-cv",), analysis_task="toy-cv", **base),
                 resolver=_CVResolver())  # fmt: skip


# -- tuning per outer fold ---------------------------------------------------------------------


def _fake_tune_record(spec: RunSpec, task: Task, val_acc: float) -> dict:
    """A finished tuning run scoring ``val_acc`` (and its averages) on the validation split."""
    rec = {**spec.config(task), "hash": spec.config_hash(task), "status": "ok",
           "final": {"val_acc": val_acc}, "curves": {}, "wall_time": 0.0}  # fmt: skip
    if get_method(spec.method).keeps_averages:
        rec["averages"] = {average_key(s): {"val_acc": val_acc} for s in START_GRID}
    return rec


def test_each_outer_fold_chooses_rho_on_its_own_validation_records(tmp_path):
    """Fold f's validation records peak at a different rho: each fold's choice follows its own."""
    rhos = get_method("sam").grids["rho"].values
    best = {0: rhos[1], 1: rhos[2], 2: rhos[-2]}  # inside the grid: no extension
    look = _CVResolver()
    cfg = BenchConfig(out=tmp_path, tasks=("toy-cv",), methods=("baseline", "sam"), seeds=(0,),
                      tune=True, tune_seeds=(100, 101), run=False, progress=False, report=False)
    lines = []
    for f in range(3):
        fold = TOY_CV.fold(f)
        for rho in rhos:
            for seed in cfg.tune_seeds:
                spec = RunSpec(fold.name, "sam", seed, "quick", Hyper(rho=rho), stage="tune")
                score = 0.9 if rho == best[f] else 0.5  # only fold f's records rank rho
                lines.append(json.dumps(_fake_tune_record(spec, fold, score)))
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_grid(cfg, resolver=look)
    chosen = {c.task: c.chosen[0] for c in summary.tuning if c.method == "sam"}
    assert chosen == {f"toy-cv@fold{f}": best[f] for f in range(3)}
    assert {summary.hypers[(f"toy-cv@fold{f}", "sam")].rho for f in range(3)} == set(best.values())


def test_the_hyper_table_shows_each_folds_choice():
    hypers = {("t@fold0", "sam"): Hyper(rho=0.02), ("t@fold1", "sam"): Hyper(rho=0.1),
              ("t@fold2", "sam"): Hyper(rho=0.02), ("u", "sam"): Hyper(rho=0.05),
              ("t@fold0", "baseline"): Hyper(), ("t@fold1", "baseline"): Hyper()}  # fmt: skip
    table = _hyper_table(hypers, ["t", "u"], ["baseline", "sam"])
    assert table[2] == "| t | – | rho=0.02–0.1 (per fold: 0.02, 0.1, 0.02) |"
    assert table[3] == "| u | – | rho=0.05 |"


# -- pooling -----------------------------------------------------------------------------------


def _counts(r: MethodResult) -> tuple[int, int]:
    n = r.run.sizes["test"]
    return round(r.final.test_acc * n), n


def test_a_user_task_with_folds_runs_end_to_end_and_pools_its_folds(tmp_path):
    cv = Task("cv", "tabular", "toy-cv-data", "MLP", _mlp, quick=RECIPE, data=toy_dataset, folds=3)
    res = flatmin.bench.run(tasks=[cv], methods=["baseline", "swa", "sam"], seeds=2, out=tmp_path,
                            hypers={"cv": {"sam": Hyper(rho=0.1)}})  # fmt: skip
    summary = res.summary
    assert summary.failed == 0 and {r.task for r in summary.records} == {"cv"}
    assert {r.task for r in summary.fold_records} == {"cv@fold0", "cv@fold1", "cv@fold2"}
    for seed in (0, 1):
        for m in ("baseline", "swa", "sam"):
            (pooled,) = [r for r in summary.records if (r.method, r.seed) == (m, seed)]
            folds = [r for r in summary.fold_records if (r.method, r.seed) == (m, seed)]
            correct, total = map(sum, zip(*(_counts(r) for r in folds), strict=True))
            assert total == 204 and pooled.final.test_acc == correct / total
            assert pooled.run.sizes == {"train": sum(r.run.sizes["train"] for r in folds),
                                        "val": sum(r.run.sizes["val"] for r in folds),
                                        "test": 204, "folds": 3}  # fmt: skip
        # the same runs as the folds trained inside one cross-validated run
        inside = train(RunSpec("cv", "sam", seed, hyper=Hyper(rho=0.1)), task=cv).record
        (sam,) = [r for r in summary.records if (r.method, r.seed) == ("sam", seed)]
        assert sam.final.test_acc == inside["final"]["test_acc"]
    (row,) = res.rows
    assert row.task == "cv" and row.test_size == 204 and row.baseline.n == 2
    sam = res.get("cv", "sam")
    assert sam.fold_hypers == (Hyper(rho=0.1),) * 3 and sam.hyper == Hyper(rho=0.1)
    assert sam.test_acc == tuple(r.final.test_acc for r in summary.records if r.method == "sam")
    report = (tmp_path / "report.md").read_text()
    assert "| cv | MLP | 204 (0.49) |" in report
    assert "3-fold CV, pooled" in report and "cv@fold" not in report.split("## Validation")[0]
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv) == 1 + 3 * 2 and all(line.startswith("cv,") for line in csv[1:])


def _fold_result(fold: int, status: str, test_acc: float, n: int) -> MethodResult:
    rec = {"hash": f"h{fold}", "status": status, "task": f"t@fold{fold}", "method": "baseline",
           "seed": 0, "reason": None if status == "ok" else "non-finite loss",
           "recipe": {"lr": 0.1, "weight_decay": 0.0, "batch_size": 8, "epochs": 2},
           "curves": {"epoch": [1, 2]}, "wall_time": 1.5,
           "sizes": {"train": 40, "val": 5, "test": n}}  # fmt: skip
    if status == "ok":
        rec["final"] = {"test_acc": test_acc, "val_acc": 0.5, "train_acc": 1.0}
    record = parse_record(rec)
    return MethodResult.parse({**rec, "hyper": {"rho": 0.05 * (fold + 1)}}, record)


def test_pooled_accuracy_is_the_folds_counts_and_a_failed_fold_fails_the_cell():
    parts = [_fold_result(0, "ok", 6 / 7, 7), _fold_result(1, "ok", 2 / 6, 6),
             _fold_result(2, "ok", 5 / 6, 6)]  # fmt: skip
    pooled = pool_folds("t", parts)
    assert pooled.ok and pooled.final.test_acc == 13 / 19  # not the mean of the fold accuracies
    assert pooled.run.sizes["test"] == 19 and pooled.wall_time == 4.5 and pooled.hyper == {}
    bad = pool_folds("t", [parts[0], _fold_result(1, "failed", 0.0, 6), parts[2]])
    assert bad.status == "failed" and bad.reason == "fold 1 (h1): non-finite loss"
    assert bad.final.test_acc is None
    (row,) = summarize([pooled, replace(bad, seed=1)], ["baseline"])
    assert row.baseline.n == 1 and row.baseline.mean == pytest.approx(100 * 13 / 19)
