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
from pathlib import Path

import pytest
import torch

from flatmin.bench import (
    BenchConfig,
    Hyper,
    RunSpec,
    get_method,
    method_names,
    read_records,
    run_grid,
    select_hyper,
    start_epoch,
    train,
)
from flatmin.bench.store import append_record
from flatmin.bench.train import per_sample_losses
from test_bench_support import TASKS, ToyResolver, toy_dataset

TESTS = Path(__file__).parent


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
    with pytest.raises(ValueError, match="known: baseline, swa, sam"):
        get_method("adam-sam")


def test_swa_and_wasam_do_not_change_training():
    """Averaging only watches: SWA's live weights equal the baseline's, WASAM's equal SAM's."""
    task, ds = TASKS["toy-a"], toy_dataset()
    runs = {
        m: train(RunSpec("toy-a", m, 3, epochs=3), task=task, dataset=ds)
        for m in ("baseline", "swa", "sam", "wasam")
    }
    for plain, averaged in (("baseline", "swa"), ("sam", "wasam")):
        a, b = runs[plain].model.state_dict(), runs[averaged].model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert runs[averaged].record["curves"]["lr"] == runs[plain].record["curves"]["lr"]
    # The LR schedule is the task's (cosine to 0 at the last step), not replaced by averaging.
    assert runs["swa"].record["curves"]["lr"][-1] == pytest.approx(0.0, abs=1e-12)
    assert (
        runs["sam"].record["curves"]["train_loss"]
        != runs["baseline"].record["curves"]["train_loss"]
    )


def test_swa_average_is_mean_of_epoch_end_weights():
    snapshots: list[dict[str, torch.Tensor]] = []
    models: list[torch.nn.Module] = []
    base = TASKS["toy-a"]

    def build(ds):
        models.append(base.build_model(ds))
        return models[-1]

    from dataclasses import replace

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
    # Once the average exists, the reported test accuracy is the average's, not the live one's.
    assert res.record["averaging_start_epoch"] == first


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_and_records(method):
    res = train(RunSpec("toy-a", method, 0, epochs=2), task=TASKS["toy-a"], dataset=toy_dataset())
    rec = res.record
    assert rec["status"] == "ok" and rec["epochs"] == 2
    assert rec["sizes"] == {"train": 96, "val": 48, "test": 60}
    for key in ("test_acc", "test_loss", "train_acc", "train_loss", "val_acc"):
        assert 0.0 <= rec["final"][key] < 10.0
    assert rec["best_val"]["epoch"] in (1, 2)
    best = rec["best_val"]["epoch"] - 1
    assert rec["best_val"]["test_acc"] == pytest.approx(rec["curves"]["test_acc"][best], rel=1e-6)
    assert rec["curves"]["val_acc"][best] == max(rec["curves"]["val_acc"])
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["hash"] == RunSpec("toy-a", method, 0, epochs=2).config_hash(TASKS["toy-a"])


def test_config_hash_distinguishes_what_matters():
    t = TASKS["toy-a"]
    h = RunSpec("toy-a", "sam", 0).config_hash(t)
    assert h == RunSpec("toy-a", "sam", 0, hyper=Hyper(rho=0.05)).config_hash(t)  # the default
    others = {
        RunSpec("toy-a", "sam", 1).config_hash(t),
        RunSpec("toy-a", "sam", 0, hyper=Hyper(rho=0.1)).config_hash(t),
        RunSpec("toy-a", "sam", 0, epochs=3).config_hash(t),
        RunSpec("toy-a", "sam", 0, stage="tune").config_hash(t),
        RunSpec("toy-a", "asam", 0).config_hash(t),
    }
    assert h not in others and len(others) == 5


# -- runner ---------------------------------------------------------------------------------------


def test_nonfinite_loss_fails_the_run_and_the_grid_goes_on(tmp_path):
    cfg = _cfg(tmp_path, tasks=("toy-nan", "toy-a"), methods=("baseline", "sam"), seeds=(0,))
    summary = run_grid(cfg, resolver=ToyResolver())
    recs = {(r["task"], r["method"]): r for r in read_records(tmp_path / "results.jsonl")}
    assert len(recs) == 4
    for m in ("baseline", "sam"):
        assert recs[("toy-nan", m)]["status"] == "failed"
        assert "non-finite training loss" in recs[("toy-nan", m)]["reason"]
        assert recs[("toy-a", m)]["status"] == "ok"
    assert summary.failed == 2
    assert "## Failed runs" in (tmp_path / "report.md").read_text()
    # A rerun skips the failed runs (a non-finite loss is deterministic).
    again = run_grid(cfg, resolver=ToyResolver())
    assert again.ran == 0 and again.skipped == 4


def test_rerun_skips_everything_and_survives_a_torn_line(tmp_path):
    cfg = _cfg(tmp_path, tasks=("toy-a",), methods=("baseline", "swa"), seeds=(0,))
    first = run_grid(cfg, resolver=ToyResolver())
    assert (first.ran, first.skipped) == (2, 0)
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b'{"hash": "deadbeef", "task": "toy-a", "sta')  # a crash mid-write
    assert len(read_records(tmp_path / "results.jsonl")) == 2
    cfg2 = _cfg(tmp_path, tasks=("toy-a",), methods=("baseline", "swa", "sam"), seeds=(0,))
    second = run_grid(cfg2, resolver=ToyResolver())
    assert (second.ran, second.skipped) == (1, 2)
    recs = read_records(tmp_path / "results.jsonl")
    assert sorted(r["method"] for r in recs) == ["baseline", "sam", "swa"]


def test_error_runs_are_retried(tmp_path):
    cfg = _cfg(tmp_path, tasks=("toy-a",), methods=("baseline",), seeds=(0,))
    h = RunSpec("toy-a", "baseline", 0).config_hash(TASKS["toy-a"])
    append_record(tmp_path / "results.jsonl", {"hash": h, "status": "error", "reason": "boom"})
    summary = run_grid(cfg, resolver=ToyResolver())
    assert summary.ran == 1
    assert [r["status"] for r in read_records(tmp_path / "results.jsonl")] == ["error", "ok"]


def test_validation_grid_selection(tmp_path):
    """select_hyper picks the best final validation accuracy; ties go to the default."""
    cfg = _cfg(tmp_path, tasks=("toy-a",), methods=("baseline", "swa", "sam", "wasam"), tune=True)
    t = TASKS["toy-a"]
    records = {}
    accs = {
        ("sam", "rho"): {0.01: 0.5, 0.02: 0.7, 0.05: 0.6, 0.1: 0.7, 0.2: None},
        ("swa", "start"): {0.5: 0.8, 0.75: 0.8},
    }
    for (owner, param), table in accs.items():
        for value, acc in table.items():
            spec = RunSpec("toy-a", owner, 100, hyper=Hyper(**{param: value}), stage="tune")
            rec = (
                {"status": "failed"} if acc is None else {"status": "ok", "final": {"val_acc": acc}}
            )
            records[spec.config_hash(t)] = rec
    hypers, choices = select_hyper(cfg, records, ToyResolver())
    # rho: 0.02 and 0.1 tie at 0.7, neither is the default 0.05 -> the smaller one.
    assert hypers[("toy-a", "sam")] == Hyper(rho=0.02)
    # start: a tie that includes the default 0.75 -> the default.
    assert hypers[("toy-a", "swa")] == Hyper(start=0.75)
    assert hypers[("toy-a", "wasam")] == Hyper(rho=0.02, start=0.75)
    assert hypers[("toy-a", "baseline")] == Hyper()
    sam_choice = next(c for c in choices if c.owner == "sam")
    assert sam_choice.val_acc == (0.5, 0.7, 0.6, 0.7, None)


def test_tuned_grid_runs_validation_grid_first(tmp_path):
    cfg = _cfg(tmp_path, tasks=("toy-a",), methods=("baseline", "sam"), seeds=(0,), tune=True,
               epochs=1)  # fmt: skip
    summary = run_grid(cfg, resolver=ToyResolver())
    recs = read_records(tmp_path / "results.jsonl")
    tune = [r for r in recs if r["stage"] == "tune"]
    assert sorted(r["hyper"]["rho"] for r in tune) == [0.01, 0.02, 0.05, 0.1, 0.2]
    assert all(r["seed"] == 100 for r in tune)
    chosen = summary.tuning[0].chosen
    best = max(r["final"]["val_acc"] for r in tune)
    assert next(r for r in tune if r["hyper"]["rho"] == chosen)["final"]["val_acc"] == best
    sam_eval = next(r for r in recs if r["stage"] == "eval" and r["method"] == "sam")
    assert sam_eval["hyper"]["rho"] == chosen
    assert "## Validation grid" in (tmp_path / "report.md").read_text()


_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_bench_support import ToyResolver
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
    assert k <= done < 12
    summary = run_grid(_cfg(out), resolver=ToyResolver())
    assert summary.skipped == done and summary.ran == 12 - done
    hashes = [r["hash"] for r in read_records(results)]
    assert len(hashes) == len(set(hashes)) == 12
    assert _masked_report(out) == _masked_report(ref)
    assert _csv_without_time(out) == _csv_without_time(ref)


@pytest.mark.slow
def test_parallel_jobs_match_sequential(tmp_path):
    run_grid(_cfg(tmp_path / "seq"), resolver=ToyResolver())
    run_grid(_cfg(tmp_path / "par", jobs=2), resolver=ToyResolver())
    assert _csv_without_time(tmp_path / "par") == _csv_without_time(tmp_path / "seq")
    lines = (tmp_path / "par" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["status"] == "ok" for line in lines)


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
    from test_bench_support import toy_graphs

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
    from test_bench_support import toy_graph_dataset

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
