"""docs/own_task.md's example (``examples/own_task.py``) through ``run()``, the CLI and resume.

The example is a user's file outside the package, found by import path from the repository root;
its report has the layout of a built-in task's report.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import flatmin.bench
from flatmin.bench import checkpoint, get_method
from flatmin.bench.checkpoint import STATE_FILE, CheckpointError, load_training_state
from flatmin.bench.train_state import TrainState
from flatmin.cli import main
from helpers.toy_tasks import TASKS, toy_dataset

ROOT = Path(__file__).resolve().parents[2]
OWN = "examples.own_task:my_task"
OWN_NOISY = "examples.own_task:my_noisy_task"
METHODS = ["baseline", "swa", "sam", "wasam"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the user runs from the directory that holds examples/
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(ROOT))])
    for name in [m for m in sys.modules if m == "examples" or m.startswith("examples.")]:
        monkeypatch.delitem(sys.modules, name)  # each test imports the user's file afresh


def _skeleton(report: str, task: str, domain: str) -> list[str]:
    """The report's layout: headings, table headers and cells per row (names and numbers out)."""
    lines = report.replace(task, "TASK").replace(f"### {domain}", "### DOMAIN").splitlines()
    out = []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.startswith("#") or nxt.startswith("|---"):
            out.append(line)
        elif line.startswith("| "):
            out.append(f"row of {line.count('|') - 1} cells")
    return [re.sub(r"\d+(\.\d+)?", "N", line) for line in out]


def test_example_runs_through_run_with_a_builtin_layout(tmp_path):
    own = flatmin.bench.run(tasks=[OWN_NOISY], methods=METHODS, seeds=2, out=tmp_path / "own",
                            epochs=2)  # fmt: skip
    sam = own.get(OWN_NOISY, "sam")
    assert sam.seeds == (0, 1) and len(sam.test_acc) == 2 and sam.hyper.rho == 0.05
    assert sam.accuracy.mean == pytest.approx(100 * sum(sam.test_acc) / 2)
    base = own.get(OWN_NOISY, "baseline")
    diffs = [100 * (a - b) for a, b in zip(sam.test_acc, base.test_acc, strict=True)]
    assert sam.vs_baseline.mean == pytest.approx(sum(diffs) / 2) and sam.vs_baseline.n == 2
    assert base.vs_baseline is None and own.get(OWN_NOISY, "wasam").hyper.start == 0.75
    with pytest.raises(KeyError, match="No result for"):
        own.get(OWN, "sam")
    builtin = flatmin.bench.run(tasks=["digits-noisy40"], methods=METHODS, seeds=2,
                                out=tmp_path / "digits", epochs=1)  # fmt: skip
    shape = [(r.method, r.seeds, r.hyper) for r in own.results]
    assert [(r.method, r.seeds, r.hyper) for r in builtin.results] == shape
    mine = _skeleton((tmp_path / "own" / "report.md").read_text(), OWN_NOISY, "tabular")
    theirs = _skeleton((tmp_path / "digits" / "report.md").read_text(), "digits-noisy40",
                       "vision")  # fmt: skip
    assert "## Memorisation (label-noise tasks)" in mine
    assert mine == theirs
    rerun = flatmin.bench.run(tasks=[OWN_NOISY], methods=METHODS, seeds=2, out=tmp_path / "own",
                              epochs=2)  # fmt: skip
    assert rerun.summary.ran == 0 and rerun.results == own.results  # resumed from the records


def test_run_options_and_task_objects(tmp_path):
    from dataclasses import replace

    with pytest.raises(TypeError, match=r"Invalid options: \['no_such_option'\]"):
        flatmin.bench.run(tasks=[OWN], out=tmp_path, no_such_option=1)
    with pytest.raises(TypeError, match="Invalid task: 3"):
        flatmin.bench.run(tasks=[3], out=tmp_path)
    task = replace(TASKS["toy-a"], data=toy_dataset)
    with pytest.raises(ValueError, match="worker processes cannot import"):
        flatmin.bench.run(tasks=[task], methods=["baseline"], out=tmp_path, jobs=2)
    res = flatmin.bench.run(tasks=task, methods=["baseline", "sam"], seeds=[3, 4], out=tmp_path,
                            epochs=1, report=False)  # fmt: skip
    assert [(r.method, r.seeds) for r in res.results] == [("baseline", (3, 4)), ("sam", (3, 4))]


def test_example_by_import_path_in_worker_processes(tmp_path):
    res = flatmin.bench.run(tasks=[OWN], methods=["baseline", "sam"], seeds=2, out=tmp_path,
                            epochs=1, jobs=2, report=False)  # fmt: skip
    assert res.summary.ran == 4 and res.summary.failed == 0
    assert str(ROOT) in sys.path  # the driver added the current directory for its workers


def test_cli_bench_and_train_take_the_import_path(tmp_path, capsys):
    argv = ["bench", "--tasks", OWN, "--methods", "baseline", "sam", "--seeds", "1",
            "--epochs", "1", "--jobs", "1", "--no-progress", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    assert f"| {OWN} | MLP-16-64 |" in (tmp_path / "b" / "report.md").read_text()
    assert main(["bench", "--tasks", "examples.own_task:nope", "--out", str(tmp_path / "c")]) == 2
    assert "has no 'nope'" in capsys.readouterr().err
    out = tmp_path / "t"
    assert main(["train", "--task", OWN, "--method", "sam", "--epochs", "1", "--no-progress",
                 "--out", str(out)]) == 0  # fmt: skip
    assert (out / "checkpoint.pt").exists()


def test_example_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    argv = ["train", "--task", OWN, "--method", "swa", "--epochs", "3", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    save = checkpoint.save_training_state

    def save_then_interrupt(path, state):
        save(path, state)
        if state.fit.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_training_state", save_then_interrupt)
    assert main([*argv, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert main([*argv, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for key in ("final", "averaged"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])


def _state(tmp_path, monkeypatch) -> dict:
    """A real training state of the example after its first epoch (the run interrupted)."""
    out = tmp_path / "s"
    save = checkpoint.save_training_state

    def save_then_interrupt(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_training_state", save_then_interrupt)
    argv = ["train", "--task", OWN, "--method", "sam", "--epochs", "2", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 130
    monkeypatch.undo()
    return load_training_state(out / STATE_FILE)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("fit"), r"lacks \['fit'\]"),
        (lambda s: s.update(fit="garbage"), r"wrong type: fit \(str\)"),
        (lambda s: s["fit"].pop("rng"), r"its 'fit' lacks \['rng'\]"),
        (lambda s: s["fit"].update(epoch="2"), r"its 'fit' has values of the wrong type: epoch"),
        (lambda s: s.update(fold=1), "in fold 1 with 0 finished folds"),
    ],
)
def test_malformed_training_state_is_one_clear_error(tmp_path, monkeypatch, capsys, edit, match):
    state = _state(tmp_path, monkeypatch)
    TrainState.from_dict(state)  # the real one is valid
    edit(state)
    path = tmp_path / "s" / STATE_FILE
    checkpoint.save_training_state(path, state)  # a valid digest: only the content is wrong
    with pytest.raises(CheckpointError, match=f"Invalid training state: '{path}': .*{match}"):
        load_training_state(path)
    capsys.readouterr()
    argv = ["train", "--task", OWN, "--method", "sam", "--epochs", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "s"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Invalid --resume" in err and "Traceback" not in err


def test_example_with_the_optuna_tuner(tmp_path):
    pytest.importorskip("optuna")
    from flatmin.tune.bench import OptunaTuner

    res = flatmin.bench.run(tasks=[OWN], methods=["baseline", "sam"], seeds=2, out=tmp_path,
                            tune=True, tuner=OptunaTuner(trials=2), epochs=1, report=False)
    rho = res.get(OWN, "sam").hyper.rho
    assert rho == res.summary.hypers[(OWN, "sam")].rho
    # A continuous search's choice, not a point of SAM's grid (the grid tuner's values).
    assert rho is not None and rho not in get_method("sam").grids["rho"].values


@pytest.mark.slow
def test_example_on_ray_workers(tmp_path):
    """Ray workers import the user's file by its path (the driver's directory travels)."""
    pytest.importorskip("ray")
    res = flatmin.bench.run(tasks=[OWN], methods=["baseline", "sam"], seeds=2, out=tmp_path,
                            epochs=1, executor="ray", jobs=2, report=False)  # fmt: skip
    assert res.summary.ran == 4 and res.summary.failed == 0
    assert [len(r.test_acc) for r in res.results] == [2, 2]


def test_the_whole_protocol_on_the_example(tmp_path):
    """Validation grids (tuning seeds, extension), ablation and flatness study on a user task."""
    res = flatmin.bench.run(tasks=[OWN_NOISY], methods=METHODS, seeds=2, out=tmp_path, epochs=2,
                            tune=True, ablation_task=OWN_NOISY, analysis_task=OWN_NOISY)
    summary = res.summary
    sam = next(c for c in summary.tuning if c.method == "sam")
    assert {len(s) for s in sam.per_seed} == {2}  # both tuning seeds at every point
    assert len(sam.points) >= len(get_method("sam").grids["rho"].values)
    assert res.get(OWN_NOISY, "sam").hyper.rho == sam.chosen[0]
    assert {r.budget_factor for r in summary.ablation} == {0.5, 2.0}
    assert summary.flatness is not None and summary.flatness["task"] == OWN_NOISY
    assert all(rep["recorded_final_test_acc"] == rep["retrained_final_test_acc"]
               for rep in summary.flatness["reproduced"].values())  # fmt: skip
    text = (tmp_path / "report.md").read_text()
    for section in ("## Budget ablation", "## Flatness of the solutions", "## Validation grids"):
        assert section in text


def test_a_state_without_the_batch_order_generator_is_refused(tmp_path, monkeypatch):
    from flatmin.bench import Hyper, RunSpec, train

    state = _state(tmp_path, monkeypatch)
    state["fit"]["generator"] = None  # well-typed, but this run draws shuffled batches
    with pytest.raises(ValueError, match="no batch-order generator state"):
        train(RunSpec(OWN, "sam", 0, hyper=Hyper(rho=0.05), epochs=2), resume=state)
