"""``--task package.module:attr``: the user's own task, found from the working directory."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest

from flatmin.cli import main

MYTASKS = textwrap.dedent("""
    import dataclasses

    from flatmin.tasks import get_task

    # The user's own task: here a renamed copy of digits (same data and model).
    task = dataclasses.replace(get_task("digits"), name="my-digits")
    MARK = "the user's module"
""")


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder holding ``mytasks.py``, as the working directory; sys.path restored after."""
    (tmp_path / "mytasks.py").write_text(MYTASKS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    sys.modules.pop("mytasks", None)
    yield tmp_path
    sys.modules.pop("mytasks", None)


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("train", ["train", "--method", "sam", "--out", "x", "--task"]),
        ("bench", ["bench", "--tasks", "digits"]),
        ("bench", ["bench", "--analysis-task"]),
        ("tune", ["tune", "--method", "sam", "--task"]),
        ("landscape", ["landscape", "c.pt", "--task"]),
        ("sharpness", ["sharpness", "c.pt", "--task"]),
    ],
)
def test_an_import_path_is_importable_from_the_working_directory(
    user_folder, monkeypatch, command, argv
):
    seen = []

    def handler(args):  # in place of the command: can it import the user's module?
        try:
            seen.append(importlib.import_module("mytasks").MARK)
        except ImportError:
            seen.append(None)
        return 0

    monkeypatch.setattr(importlib.import_module(f"flatmin.cli.{command}"), "run", handler)
    assert main([*argv, "digits"]) == 0  # a built-in name leaves sys.path alone
    assert seen == [None] and str(user_folder) not in sys.path
    assert main([*argv, "mytasks:task"]) == 0
    assert seen == [None, "the user's module"] and sys.path[0] == str(user_folder)


def test_train_landscape_sharpness_on_the_users_task(user_folder, capsys):
    out = user_folder / "run"
    argv = ["train", "--task", "mytasks:task", "--method", "baseline", "--epochs", "1",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["status"] == "ok"
    ckpt = str(out / "checkpoint.pt")
    argv = ["landscape", ckpt, ckpt, "--task", "mytasks:task", "--out", str(user_folder / "land"),
            "--points", "3", "--max-batches", "1"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    argv = ["sharpness", ckpt, "--task", "mytasks:task", "--max-batches", "1",
            "--hessian-iters", "2", "--trace-samples", "2"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err


def test_bench_on_the_users_task(user_folder, capsys):
    argv = ["bench", "--tasks", "mytasks:task", "--methods", "baseline", "--seeds", "1",
            "--epochs", "1", "--jobs", "1", "--out", str(user_folder / "b"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "1 runs: 1 trained" in capsys.readouterr().out


def test_tune_on_the_users_task(user_folder, capsys):
    pytest.importorskip("optuna")
    argv = ["tune", "--task", "mytasks:task", "--method", "sam", "--trials", "1", "--seeds", "1",
            "--epochs", "1", "--out", str(user_folder / "t"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert (user_folder / "t" / "tune.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_bench_takes_a_users_task_by_path_with_the_optuna_tuner(tmp_path, monkeypatch, executor):
    """Issue #22's acceptance: a task in a file outside the package, through `flatmin bench
    --tasks module:attr --tune --tuner optuna` on either executor, gives the built-in layout."""
    pytest.importorskip("optuna")
    if executor == "ray":
        pytest.importorskip("ray")
    monkeypatch.chdir(Path(__file__).parents[2])  # examples/ is importable from here
    out = tmp_path / executor
    argv = ["bench", "--tasks", "examples.own_task:my_task", "--methods", "baseline", "sam",
            "--seeds", "2", "--epochs", "1", "--tune", "--tuner", "optuna", "--tune-trials", "2",
            "--jobs", "2", "--executor", executor, "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    tune = [r for r in records if r["stage"] == "tune" and r["method"] == "sam"]
    assert tune and all(r["task"] == "examples.own_task:my_task" for r in records)
    assert {r["seed"] for r in records if r["stage"] == "eval"} == {0, 1}
    assert "## Test accuracy (final epoch)" in (out / "report.md").read_text()
