"""Runner, training loop and methods of flatmin.bench on tiny synthetic tasks."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flatmin.bench import (
    BenchConfig,
    EvalRecord,
    Hyper,
    RunSpec,
    TuneRecord,
    get_method,
    method_names,
    read_records,
    run_grid,
    start_epoch,
    train,
)
from flatmin.bench.methods import START_GRID
from flatmin.bench.store import append_record
from flatmin.bench.train import per_sample_losses
from helpers.toy_tasks import TASKS, ToyResolver, toy_dataset

TESTS = Path(__file__).parents[1]  # the tests' root: helpers.* importable


def _cfg(out: Path, **kw) -> BenchConfig:
    base = dict(
        out=out, tasks=("toy-a", "toy-b"), methods=("baseline", "swa", "sam"), seeds=(0, 1),
        progress=False,
    )  # fmt: skip
    base.update(kw)
    return BenchConfig(**base)


def _masked_report(out: Path) -> str:
    """report.md without the wall-clock section (the only part that depends on timing)."""
    text = (out / "report.md").read_text()
    start = text.index("## Relative wall-clock cost")
    end = text.index("## ", start + 3)
    return text[:start] + text[end:]


def _csv_without_time(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as f:
        return [{k: v for k, v in row.items() if k != "wall_time"} for row in csv.DictReader(f)]


# -- methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "epochs", "expected"),
    [(0.75, 8, 7), (0.5, 4, 3), (0.0, 5, 1), (0.99, 3, 3), (0.75, 1, 1), (0.5, 30, 16)],
)
def test_start_epoch_closed_form(start, epochs, expected):
    assert start_epoch(start, epochs) == expected
    # The averaged epochs are exactly those that end after the first `start` fraction.
    assert expected == next(e for e in range(1, epochs + 1) if e > start * epochs)


@pytest.mark.parametrize(("start", "epochs"), [(-0.1, 5), (1.0, 5), (0.5, 0)])
def test_start_epoch_rejects(start, epochs):
    with pytest.raises(ValueError, match="Invalid"):
        start_epoch(start, epochs)


def test_unknown_method_lists_names():
    with pytest.raises(ValueError, match="known: baseline, swa, swa-lr, sam"):
        get_method("adam-sam")


def test_averages_only_watch_the_trajectory():
    """A run keeps 3 averages or 1 (a view): its live weights and curves are the same."""
    task, ds = TASKS["toy-a"], toy_dataset()
    for traj, view in (("baseline", "swa"), ("sam", "wasam")):
        shared = train(RunSpec("toy-a", traj, 3, epochs=4), task=task, dataset=ds)
        alone = train(RunSpec("toy-a", view, 3, hyper=Hyper(start=0.5), epochs=4), task=task,
                      dataset=ds)  # fmt: skip
        assert set(shared.averagers) == set(START_GRID) and set(alone.averagers) == {0.5}
        a, b = shared.model.state_dict(), alone.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert shared.record["curves"] == alone.record["curves"]
        # The view reports the average; the trajectory its final weights and every average.
        assert alone.record["final"]["test_acc"] == shared.record["averages"]["0.5"]["test_acc"]
        assert alone.record["final"]["live_test_acc"] == shared.record["final"]["test_acc"]
    # The LR schedule is the task's (cosine to 0 at the last step), not replaced by averaging.
    assert shared.record["curves"]["lr"][-1] == pytest.approx(0.0, abs=1e-12)


def _hand_loop(spec: RunSpec, start: float):
    """SWA / WASAM written out with flatmin's public classes, one snapshot per epoch."""
    from flatmin import WASAM, WeightAveraging

    task = TASKS[spec.task]
    data = task.load(spec.budget, seed=spec.seed, dataset=toy_dataset())
    recipe = data.recipe
    model = data.make_model()
    first = start_epoch(start, recipe.epochs)
    if spec.method == "sam":
        opt = WASAM(model, recipe.optimizer_class, rho=spec.hyper.rho, start=first,
                    average_on_step=False, **recipe.optimizer_kwargs())  # fmt: skip
        avg = opt.averaging
    else:
        opt = recipe.optimizer_class(model.parameters(), **recipe.optimizer_kwargs())
        avg = WeightAveraging(model, mode="swa", start=first)
    sched = recipe.make_scheduler(opt, len(data.train))
    for _ in range(recipe.epochs):
        for x, y in data.train:

            def closure(x=x, y=y):
                opt.zero_grad(set_to_none=True)
                loss = data.loss_fn(model(x), y)
                loss.backward()
                return loss

            if spec.method == "sam":
                opt.step(closure, model=model)
            else:
                opt.step(closure)
            sched.step()
        avg.update()
    avg.update_bn(data.train_eval)
    return model, avg


@pytest.mark.parametrize(("method", "rho"), [("baseline", None), ("sam", 0.1)])
def test_shared_trajectory_averages_equal_separate_swa_and_wasam_bit_for_bit(method, rho):
    spec = RunSpec("toy-a", method, 2, hyper=Hyper(rho=rho)).resolved()
    shared = train(spec, task=TASKS["toy-a"], dataset=toy_dataset())
    for start in START_GRID:
        model, avg = _hand_loop(spec, start)
        mine = shared.averagers[start]
        assert mine.n_averaged == avg.n_averaged
        a, b = mine.averaged_state_dict(), avg.averaged_state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    live = model.state_dict()
    assert all(torch.equal(live[k], shared.model.state_dict()[k]) for k in live)


def test_swa_lr_holds_its_learning_rate_from_the_start_epoch():

    spec = RunSpec("toy-a", "swa-lr", 0, hyper=Hyper(start=0.5, swa_lr=0.2), epochs=6)
    res = train(spec, task=TASKS["toy-a"], dataset=toy_dataset())
    lr = res.record["curves"]["lr"]  # the LR for the step after each epoch's last one
    recipe = replace(TASKS["toy-a"].recipe("quick"), epochs=6)
    first = start_epoch(0.5, 6)  # 4: the constant LR covers epochs 4..6
    spe = 96 // 16
    for epoch in range(1, 7):
        step = epoch * spe
        factor = recipe.lr_factor(step, spe) if step < (first - 1) * spe else 0.2
        assert lr[epoch - 1] == pytest.approx(recipe.lr * factor)
    assert lr[-1] == pytest.approx(0.2 * recipe.lr) and lr[1] > lr[-1]
    assert res.averager is res.averagers[0.5] and res.averager.n_averaged == 6 - first + 1
    assert res.record["averaging_start_epoch"] == first


def test_swa_average_is_mean_of_epoch_end_weights():
    snapshots: list[dict[str, torch.Tensor]] = []
    models: list[torch.nn.Module] = []
    base = TASKS["toy-a"]

    def build(ds):
        models.append(base.build_model(ds))
        return models[-1]


    task = replace(base, build_model=build)

    def on_epoch(epoch, epochs, metrics):
        snapshots.append({k: v.detach().clone() for k, v in models[0].named_parameters()})

    res = train(
        RunSpec("toy-a", "swa", 0, hyper=Hyper(start=0.5), epochs=6),
        task=task, dataset=toy_dataset(), on_epoch=on_epoch,
    )  # fmt: skip
    first = start_epoch(0.5, 6)  # = 4: epochs 4, 5, 6 are averaged
    assert res.averager is not None and res.averager.n_averaged == 6 - first + 1
    avg = res.averager.averaged_tensors()
    for name in snapshots[0]:
        expected = torch.stack([s[name].double() for s in snapshots[first - 1 :]]).mean(0)
        torch.testing.assert_close(avg[name].double(), expected, rtol=1e-6, atol=1e-7)
    assert res.record["averaging_start_epoch"] == first


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_and_records(method):
    spec = RunSpec("toy-a", method, 0, epochs=2)
    res = train(spec, task=TASKS["toy-a"], dataset=toy_dataset())
    rec = res.record
    assert rec["status"] == "ok" and rec["epochs"] == 2
    assert rec["sizes"] == {"train": 96, "val": 48, "test": 60}
    for key in ("test_acc", "test_loss", "train_acc", "train_loss", "val_acc", "live_test_acc"):
        assert 0.0 <= rec["final"][key] < 10.0
    assert rec["final"]["train_acc_clean"] is None and rec["final"]["noise_memorised"] is None
    assert len(rec["curves"]["val_acc"]) == 2  # eval runs validate every epoch
    assert set(rec.get("averages", {})) == (
        {"0.5", "0.75", "0.9"}
        if get_method(method).is_trajectory and get_method(method).keeps_averages
        else set()
    )
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["hash"] == spec.config_hash(TASKS["toy-a"])


def test_tuning_runs_validate_only_at_the_end():
    res = train(RunSpec("toy-a", "sam", 100, epochs=2, stage="tune"), task=TASKS["toy-a"],
                dataset=toy_dataset())  # fmt: skip
    rec = res.record
    assert rec["curves"]["val_acc"] == [] and rec["final"]["val_acc"] > 0
    # Nothing but validation is evaluated: not the test set, not the training set.
    assert rec["final"]["test_acc"] is None and rec["final"]["train_acc"] is None
    for avg in rec["averages"].values():
        assert avg["val_acc"] > 0 and avg["test_acc"] is None
    from flatmin.bench.store import record_problem

    assert record_problem(rec) is None
    assert (
        record_problem({**rec, "stage": "eval"}) == "'final.test_acc' is None (expected a number)"
    )


def test_config_hash_distinguishes_what_matters():
    t = TASKS["toy-a"]
    h = RunSpec("toy-a", "sam", 0).config_hash(t)
    assert h == RunSpec("toy-a", "sam", 0, hyper=Hyper(rho=0.05)).config_hash(t)  # the default
    assert h == RunSpec("toy-a", "sam", 0, hyper=Hyper(rho=0.05, alpha=0.3)).config_hash(t)
    others = {
        RunSpec("toy-a", "sam", 1).config_hash(t),
        RunSpec("toy-a", "sam", 0, hyper=Hyper(rho=0.1)).config_hash(t),
        RunSpec("toy-a", "sam", 0, epochs=3).config_hash(t),
        RunSpec("toy-a", "sam", 0, stage="tune").config_hash(t),
        RunSpec("toy-a", "asam", 0).config_hash(t),
        RunSpec("toy-a", "wasam", 0).config_hash(t),
        RunSpec("toy-a", "swa-lr", 0, hyper=Hyper(swa_lr=0.3)).config_hash(t),
        RunSpec("toy-a", "swa-lr", 0, hyper=Hyper(start=0.5)).config_hash(t),
        RunSpec("toy-a", "looksam", 0, hyper=Hyper(alpha=0.3)).config_hash(t),
    }
    assert h not in others and len(others) == 9


# -- cross-validation and memorisation ---------------------------------------------------------


def test_cross_validated_run_tests_every_sample_once():

    from flatmin.tasks import cross_validation_split
    from helpers.toy_tasks import toy_graph_dataset

    ds = toy_graph_dataset()
    pooled = [*ds.train.graphs, *ds.val.graphs, *ds.test.graphs]
    seen: list[int] = []
    for fold in range(4):
        split = cross_validation_split(ds, 4, fold)
        ids = {
            name: [id(g) for g in getattr(split, name).graphs] for name in ("train", "val", "test")
        }
        assert not set(ids["train"]) & set(ids["val"]) and not set(ids["train"]) & set(ids["test"])
        assert not set(ids["val"]) & set(ids["test"])  # nested: val is from the outer train set
        assert len(ids["train"]) + len(ids["val"]) + len(ids["test"]) == len(pooled)
        seen += ids["test"]
    assert sorted(seen) == sorted(id(g) for g in pooled)  # every graph tested exactly once
    task = replace(TASKS["toy-graph"], folds=4)
    rec = train(RunSpec("toy-graph", "baseline", 0, epochs=1), task=task, dataset=ds).record
    assert rec["status"] == "ok" and rec["folds"] == 4
    assert rec["sizes"]["test"] == len(pooled) and rec["sizes"]["folds"] == 4
    with pytest.raises(ValueError, match="Invalid fold"):
        task.load("quick", dataset=ds, fold=4)
    assert len(task.load("quick", dataset=ds).dataset.test) == len(
        cross_validation_split(ds, 4, 0).test
    )
    with pytest.raises(ValueError, match="Invalid fold"):
        TASKS["toy-graph"].load("quick", dataset=ds, fold=0)


def test_memorisation_counts_against_a_lookup_model():
    """train / true-label / memorised accuracies of a model whose predictions are fixed."""
    from flatmin.bench.evaluation import final_counts as _final_counts
    from flatmin.data import Dataset, TensorSplit
    from flatmin.tasks import Recipe, Task

    n = 40
    y = torch.arange(n) % 4
    split = TensorSplit(torch.arange(n, dtype=torch.float32).unsqueeze(1), y)
    ds = Dataset("lookup", "vision", split, split, split, 4, ("a", "b", "c", "d"))
    task = Task("lookup", "vision", "lookup", "table", lambda d: torch.nn.Identity(),
                quick=Recipe("sgd", 0.1, 0.0, 8, 1), full=Recipe("sgd", 0.1, 0.0, 8, 1),
                label_noise=0.5)  # fmt: skip
    data = task.load("quick", dataset=ds)
    noisy, clean = data.dataset.train.targets, data.dataset.train.clean_targets
    flipped = torch.nonzero(noisy != clean).flatten()
    assert flipped.numel() == 20
    # Predict the noisy label on the first 5 flipped samples, the true label everywhere else.
    pred = clean.clone()
    pred[flipped[:5]] = noisy[flipped[:5]]

    class Table(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(pred[x[:, 0].long()], 4).float()

    counts = _final_counts(Table(), data)
    assert counts["train"].acc == pytest.approx((20 + 5) / 40)  # noisy labels: clean half + 5
    assert counts["train_clean"].acc == pytest.approx((40 - 5) / 40)
    assert counts["noise_memorised"].acc == pytest.approx(5 / 20)
    assert counts["noise_memorised"].n == 20


# -- runner ---------------------------------------------------------------------------------------


def test_nonfinite_loss_fails_the_run_and_the_grid_goes_on(tmp_path):
    cfg = _cfg(tmp_path, tasks=("toy-nan", "toy-a"), methods=("baseline", "sam"), seeds=(0,))
    summary = run_grid(cfg, resolver=ToyResolver())
    recs = {(r.task, r.method): r for r in read_records(tmp_path / "results.jsonl")}
    assert len(recs) == 4
    for m in ("baseline", "sam"):
        assert recs[("toy-nan", m)].status == "failed"
        assert "non-finite training loss" in recs[("toy-nan", m)].reason
        assert recs[("toy-a", m)].status == "ok"
    assert summary.failed == 2
    assert "## Failed runs" in (tmp_path / "report.md").read_text()
    # A rerun skips the failed runs (a non-finite loss is deterministic).
    again = run_grid(cfg, resolver=ToyResolver())
    assert again.ran == 0 and again.skipped == 4


def test_rerun_skips_everything_and_survives_a_torn_line(tmp_path):
    cfg = _cfg(tmp_path, tasks=("toy-a",), methods=("baseline", "swa"), seeds=(0,))
    first = run_grid(cfg, resolver=ToyResolver())
    assert (first.ran, first.skipped) == (1, 0)  # SWA is read from the baseline's run
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b'{"hash": "deadbeef", "task": "toy-a", "sta')  # a crash mid-write
    assert len(read_records(tmp_path / "results.jsonl")) == 1
    cfg2 = _cfg(tmp_path, tasks=("toy-a",), methods=("baseline", "swa", "sam"), seeds=(0,))
    second = run_grid(cfg2, resolver=ToyResolver())
    assert (second.ran, second.skipped) == (1, 1)
    recs = read_records(tmp_path / "results.jsonl")
    assert sorted(r.method for r in recs) == ["baseline", "sam"]


def test_error_runs_are_retried(tmp_path):
    cfg = _cfg(tmp_path, tasks=("toy-a",), methods=("baseline",), seeds=(0,))
    h = RunSpec("toy-a", "baseline", 0).config_hash(TASKS["toy-a"])
    append_record(tmp_path / "results.jsonl", {"hash": h, "status": "error", "reason": "boom"})
    summary = run_grid(cfg, resolver=ToyResolver())
    assert summary.ran == 1
    assert [r.status for r in read_records(tmp_path / "results.jsonl")] == ["error", "ok"]


def test_a_failed_tuning_run_is_retrained_once_and_its_new_record_chosen_from(tmp_path):
    """An ``error`` record in the validation grid is retrained, and the choice reads the new one."""
    kw = dict(tasks=("toy-a",), methods=("baseline", "sam"), seeds=(0,), tune=True,
              tune_seeds=(100, 101), epochs=1)  # fmt: skip
    clean = run_grid(_cfg(tmp_path / "clean", **kw), resolver=ToyResolver())
    rho = clean.hypers[("toy-a", "sam")].rho
    recs = read_records(tmp_path / "clean" / "results.jsonl")
    (tmp_path / "again").mkdir()
    for r in recs:
        append_record(tmp_path / "again" / "results.jsonl", r.to_dict())
    chosen = next(r for r in recs if r.stage == "tune" and r.method == "sam"
                  and r.seed == 100 and r.hyper["rho"] == rho)  # fmt: skip
    append_record(tmp_path / "again" / "results.jsonl",
                  {"hash": chosen.hash, "status": "error", "reason": "boom"})  # fmt: skip
    again = run_grid(_cfg(tmp_path / "again", **kw), resolver=ToyResolver())
    assert again.ran == 1 and again.hypers == clean.hypers
    sam = next(c for c in again.tuning if c.method == "sam")
    assert None not in sam.scores


def test_tuned_grid_runs_validation_grid_first(tmp_path):
    cfg = _cfg(tmp_path, tasks=("toy-a",), methods=("baseline", "swa", "sam", "wasam"),
               seeds=(0,), tune=True, tune_seeds=(100, 101), epochs=1)  # fmt: skip
    summary = run_grid(cfg, resolver=ToyResolver())
    recs = read_records(tmp_path / "results.jsonl")
    tune = [r for r in recs if isinstance(r, TuneRecord)]
    assert {r.seed for r in tune} == {100, 101}
    assert {r.method for r in tune} == {"baseline", "sam"}  # views train nothing
    sam = next(c for c in summary.tuning if c.method == "sam")
    rhos = sorted({r.hyper["rho"] for r in tune if r.method == "sam"})
    assert rhos == sorted(p[0] for p in sam.points) and len(rhos) >= 6
    best = max(s for s in sam.scores if s is not None)
    assert sam.scores[[p[0] for p in sam.points].index(sam.chosen[0])] == best
    evals = [r for r in recs if isinstance(r, EvalRecord)]
    assert len(evals) + len(tune) == len(recs)
    assert {r.method for r in evals} == {"baseline", "sam"}
    sam_rhos = {r.hyper["rho"] for r in evals if r.method == "sam"}
    assert sam_rhos == {
        summary.hypers[("toy-a", "sam")].rho,
        summary.hypers[("toy-a", "wasam")].rho,
    }
    text = (tmp_path / "report.md").read_text()
    assert "## Validation grids" in text and "## Chosen hyper-parameters" in text
    # A rerun trains nothing and replays the same choices.
    again = run_grid(cfg, resolver=ToyResolver())
    assert again.ran == 0 and again.hypers == summary.hypers


def test_fixed_hypers_ablation_and_variants(tmp_path):
    cfg = _cfg(
        tmp_path, tasks=("toy-a", "toy-b"), methods=("baseline", "swa", "sam", "wasam"),
        seeds=(0, 1), hypers={"toy-a": {"sam": Hyper(rho=0.2), "wasam": Hyper(rho=0.2, start=0.9)}},
        extra_methods={"toy-a": ("samk",)}, variants=("samk",), ablation_task="toy-a",
        ablation_factors=(0.5, 2.0), epochs=2,
    )  # fmt: skip
    summary = run_grid(cfg, resolver=ToyResolver())
    res = {(r.task, r.method, r.seed): r for r in summary.records}
    assert len(res) == (5 + 4) * 2
    assert res[("toy-a", "sam", 0)].hyper == {"rho": 0.2}
    assert res[("toy-b", "sam", 0)].hyper == {"rho": 0.05}  # default elsewhere
    assert res[("toy-a", "samk", 1)].hyper == {"rho": 0.05}  # samk has no fixed rho
    assert ("toy-b", "samk", 0) not in res
    # 2 tasks x 2 seeds x (baseline, sam) + samk on toy-a x 2 seeds; ablation: 2 factors x 4.
    assert summary.planned == 8 + 2 + 8
    assert {(r.budget_factor, r.record.epochs) for r in summary.ablation} == {(0.5, 1), (2.0, 4)}
    text = (tmp_path / "report.md").read_text()
    assert "## Budget ablation" in text and "## Cheap SAM variants" in text


_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from helpers.toy_tasks import ToyResolver
from flatmin.bench import BenchConfig, run_grid
cfg = BenchConfig(out=Path({out!r}), tasks=("toy-a", "toy-b"), methods=("baseline", "swa", "sam"),
                  seeds=(0, 1), progress=False)
run_grid(cfg, resolver=ToyResolver())
"""


def test_resume_after_kill_gives_each_run_once_and_the_same_report(tmp_path):
    # Reference: the uninterrupted grid.
    ref = tmp_path / "ref"
    run_grid(_cfg(ref), resolver=ToyResolver())
    # The same grid in a subprocess, killed after k finished runs.
    out = tmp_path / "killed"
    script = tmp_path / "grid.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(tests=str(TESTS), out=str(out))))
    env = {**os.environ, "TOY_SLEEP": "0.3"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    results = out / "results.jsonl"
    k = 3
    deadline = time.monotonic() + 60
    try:
        while len(read_records(results)) < k:
            assert proc.poll() is None, "the grid ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = len(read_records(results))
    assert k <= done < 8
    summary = run_grid(_cfg(out), resolver=ToyResolver())
    assert summary.skipped == done and summary.ran == 8 - done
    hashes = [r.hash for r in read_records(results)]
    assert len(hashes) == len(set(hashes)) == 8
    assert _masked_report(out) == _masked_report(ref)
    assert _csv_without_time(out) == _csv_without_time(ref)


@pytest.mark.slow
def test_parallel_jobs_match_sequential(tmp_path):
    run_grid(_cfg(tmp_path / "seq"), resolver=ToyResolver())
    run_grid(_cfg(tmp_path / "par", jobs=2), resolver=ToyResolver())
    assert _csv_without_time(tmp_path / "par") == _csv_without_time(tmp_path / "seq")
    lines = (tmp_path / "par" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["status"] == "ok" for line in lines)


# -- ESAM's per-sample losses ----------------------------------------------------------------------


def test_per_sample_losses_tensor_inputs_match_single_sample_losses():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    outputs: list[torch.Tensor] = []
    fn = per_sample_losses(model, x, y, outputs)
    whole = fn(None)
    singles = torch.stack(
        [torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) for i in range(6)]
    )
    torch.testing.assert_close(whole, singles)
    torch.testing.assert_close(fn(torch.tensor([4, 1])), singles[[4, 1]])
    assert len(outputs) == 1 and outputs[0].shape == (6, 3)


def test_per_sample_losses_graph_subset_equals_collating_the_subset():
    from flatmin.data.batching import collate_graphs
    from flatmin.tasks.models import GraphClassifier
    from helpers.toy_tasks import toy_graphs

    split = toy_graphs(5, 7)
    torch.manual_seed(0)
    model = GraphClassifier(3, 2, conv="gin", hidden=8, layers=2).eval()  # no batch statistics
    batch = collate_graphs(split.graphs)
    fn = per_sample_losses(model, batch, split.targets, [])
    index = torch.tensor([3, 0])
    direct = model(collate_graphs([split.graphs[3], split.graphs[0]]))
    expected = torch.nn.functional.cross_entropy(direct, split.targets[index], reduction="none")
    torch.testing.assert_close(fn(index), expected)
    torch.testing.assert_close(fn(None)[index], expected)


def test_per_sample_losses_node_level_counts_labelled_nodes_only():
    from flatmin.data import IGNORE_INDEX
    from flatmin.data.batching import GraphBatch
    from flatmin.tasks.models import NodeGCN

    torch.manual_seed(0)
    x = torch.randn(6, 4)
    edges = torch.tensor([[0, 1, 2, 3, 4, 1], [1, 0, 3, 2, 5, 2]])
    g = GraphBatch(x, edges, torch.zeros(6, dtype=torch.long), 1)
    targets = torch.tensor([1, IGNORE_INDEX, 0, IGNORE_INDEX, 2, 1])
    model = NodeGCN(4, 3, hidden=8)
    fn = per_sample_losses(model, g, targets, [])
    whole = fn(None)
    assert whole.shape == (4,)
    out = model(g)
    labelled = [0, 2, 4, 5]
    ref = torch.nn.functional.cross_entropy(out[labelled], targets[labelled], reduction="none")
    torch.testing.assert_close(whole, ref)
    torch.testing.assert_close(fn(torch.tensor([2])), ref[[2]])
    # The mean of the per-sample losses is the task's loss (cross-entropy, ignore_index=-100).
    torch.testing.assert_close(whole.mean(), torch.nn.functional.cross_entropy(out, targets))


def test_esam_trains_on_graph_batches():
    from helpers.toy_tasks import toy_graph_dataset

    res = train(
        RunSpec("toy-graph", "esam", 0), task=TASKS["toy-graph"], dataset=toy_graph_dataset()
    )
    assert res.record["status"] == "ok" and res.record["steps"] == 2 * (48 // 8)


def test_suites_cover_the_protocol():
    from flatmin.bench import get_suite
    from flatmin.tasks import get_task

    for name in ("quick", "full"):
        suite = get_suite(name)
        assert {get_task(t).domain for t in suite.tasks} == {"vision", "text", "graph"}
        assert {"baseline", "swa", "sam", "wasam"} <= set(suite.methods)
        assert suite.methods[0] == "baseline" and suite.seeds >= 2
        assert any(get_task(t).label_noise > 0 for t in suite.tasks)
        for m in suite.methods:
            get_method(m)
    assert get_suite("full").tune and get_suite("full").seeds >= 3
    with pytest.raises(ValueError, match="known: quick, full"):
        get_suite("medium")


def test_flatness_study_reproduces_the_runs_and_is_resumed(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = _cfg(tmp_path, tasks=("toy-a",), methods=("baseline", "swa", "sam", "wasam"),
               seeds=(0,), analysis_task="toy-a", epochs=3)  # fmt: skip
    summary = run_grid(cfg, resolver=ToyResolver())
    study = summary.flatness
    assert study["methods"] == ["baseline", "swa", "sam", "wasam"]
    for m, rep in study["reproduced"].items():
        assert rep["recorded_final_test_acc"] == rep["retrained_final_test_acc"], m
    for m in study["methods"]:
        for split in ("train", "test"):
            v = study["measures"][m][split]
            assert v["lambda_max"] > 0 and v["trace"] > 0 and v["worst_case_sharpness"] >= 0
        # Each checkpoint carries its method's own result: a view's is its average's.
        meta = torch.load(tmp_path / "checkpoints" / f"{m}.pt", weights_only=True)["record"]
        (result,) = [r for r in summary.records if r.method == m]
        assert meta["method"] == m and "averages" not in meta
        assert meta["final"]["test_acc"] == result.final.test_acc
    assert set(study["interpolations"]) == {"baseline→swa", "baseline→sam", "baseline→wasam"}
    line = study["interpolations"]["baseline→sam"]
    assert line["coords"][0] == -0.5 and line["coords"][-1] == 1.5
    assert min(abs(c) for c in line["coords"]) < 1e-12  # the path passes through both ends
    assert min(abs(c - 1) for c in line["coords"]) < 1e-12
    text = (tmp_path / "report.md").read_text()
    assert "## Flatness of the solutions" in text and "reproduced the recorded runs" in text
    for name in ("flatness_rays.png", "flatness_interpolation.png", "flatness_spectrum.png"):
        assert (tmp_path / name).stat().st_size > 1000
    stamp = (tmp_path / "flatness.json").stat().st_mtime_ns
    again = run_grid(cfg, resolver=ToyResolver())
    assert again.ran == 0 and again.flatness == study
    assert (tmp_path / "flatness.json").stat().st_mtime_ns == stamp  # loaded, not recomputed


def test_quick_suite_hypers_are_the_committed_full_runs_choices(tmp_path):
    """``QUICK_HYPERS`` must equal what the committed full run chose on validation data.

    The grid is replanned from ``docs/results/results.jsonl`` without training (``run=False``):
    a rerun of the full suite that changes a choice fails here until the quick suite follows.
    """
    import shutil

    from flatmin.bench.suites import QUICK_HYPERS, get_suite
    from flatmin.tasks import get_task, split_fold_name

    committed = Path(__file__).resolve().parents[2] / "docs" / "results" / "results.jsonl"
    shutil.copy(committed, tmp_path / "results.jsonl")
    full = get_suite("full")
    cfg = BenchConfig.from_suite(full, tmp_path, run=False, report=False, progress=False,
                                 analysis_task=None)  # fmt: skip
    summary = run_grid(cfg)
    assert summary.ran == 0 and summary.planned == summary.skipped  # every tuning run recorded
    for task, methods in QUICK_HYPERS.items():
        for name, hyper in methods.items():
            assert summary.hypers[(task, name)] == hyper, (task, name)
    # A cross-validated task's choices are its folds' (nested CV: one per outer fold).
    quick = get_suite("quick").tasks
    assert {split_fold_name(t)[0] for t in QUICK_HYPERS} == set(quick)
    for task in quick:
        if (k := get_task(task).folds) is not None:
            assert {f"{task}@fold{f}" for f in range(k)} <= set(QUICK_HYPERS)
