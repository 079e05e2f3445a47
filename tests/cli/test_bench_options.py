"""``flatmin bench``'s options reach the BenchConfig that ``run_grid`` gets (nothing is trained)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from flatmin import bench
from flatmin.bench import BenchConfig
from flatmin.bench.runner import GridSummary
from flatmin.cli import main

_OPTIONS = ["bench", "--tasks", "digits", "--tune", "--tune-seeds", "3", "--tuner", "optuna",
            "--tune-trials", "3", "--ablation-task", "digits", "--analysis-task", "digits",
            "--no-progress"]  # fmt: skip
_RAY = ["--executor", "ray", "--cpus-per-run", "1.5", "--gpus-per-run", "0"]


@pytest.fixture
def grid(monkeypatch):
    """Replace ``flatmin.bench.run_grid`` (the CLI calls it as ``bench.run_grid``): the configs
    it was called with, and a stub summary of one ok run."""
    calls: list[tuple[tuple, dict]] = []

    def fake_run_grid(*args, **kwargs):
        calls.append((args, kwargs))
        return GridSummary(
            planned=7, skipped=2, ran=5, failed=0, wall_time=3.0,
            records=[SimpleNamespace(status="ok")],
        )

    monkeypatch.setattr(bench, "run_grid", fake_run_grid)
    return calls


def _config(grid, capsys, tmp_path) -> BenchConfig:
    assert len(grid) == 1, grid
    (cfg,), kwargs = grid[0]
    assert kwargs == {"on_record": None} and isinstance(cfg, BenchConfig)  # no --log
    assert cfg.out == tmp_path
    assert f"7 runs: 5 trained, 2 already done, 0 not ok; 3 s. Report: {tmp_path}" in (
        capsys.readouterr().out
    )
    return cfg


def _assert_tuning_options(cfg: BenchConfig) -> None:
    # The quick suite's own values differ: tune False, tuner "grid", 12 trials, seeds (100, 101).
    assert cfg.tasks == ("digits",)
    assert cfg.tune is True
    assert cfg.tune_seeds == (100, 101, 102)
    assert cfg.tuner.name == "optuna"
    assert cfg.tuner.trials == 3
    assert cfg.ablation_task == cfg.analysis_task == "digits"
    assert cfg.progress is False


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="needs Optuna")
def test_tuning_options_reach_the_config(grid, capsys, tmp_path):
    assert main([*_OPTIONS, "--out", str(tmp_path)]) == 0
    cfg = _config(grid, capsys, tmp_path)
    _assert_tuning_options(cfg)
    assert cfg.executor == "local"
    assert cfg.cpus_per_run is None and cfg.gpus_per_run is None


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="needs Optuna")
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="--executor ray needs Ray")
def test_ray_options_reach_the_config(grid, capsys, tmp_path):
    assert main([*_OPTIONS, *_RAY, "--out", str(tmp_path)]) == 0
    cfg = _config(grid, capsys, tmp_path)
    _assert_tuning_options(cfg)
    assert cfg.executor == "ray"
    assert cfg.cpus_per_run == 1.5
    assert cfg.gpus_per_run == 0.0
    assert cfg.ray_address is None


def test_a_stub_summary_without_an_ok_run_exits_1(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "run_grid", lambda cfg: GridSummary(planned=1, failed=1))
    assert main(["bench", "--tasks", "digits", "--no-progress", "--out", str(tmp_path)]) == 1


def test_a_subset_of_a_suites_tasks_drops_the_others_settings(tmp_path):
    """`--tasks mutag` on the full suite: the other tasks' extra methods, budgets and hypers, and
    an ablation/analysis task not selected, do not apply (they made the grid invalid)."""
    from flatmin.bench import BenchConfig, get_suite

    suite = get_suite("full")
    cfg = BenchConfig.from_suite(suite, tmp_path, tasks=("mutag",))
    assert cfg.tasks == ("mutag",)
    assert set(cfg.extra_methods) <= {"mutag"} and set(cfg.hypers) <= {"mutag"}
    assert set(cfg.task_budgets) <= {"mutag"}
    assert cfg.ablation_task is None and cfg.analysis_task is None
    cfg.validate()
    # Named explicitly, an ablation task outside the tasks is still an error.
    bad = BenchConfig.from_suite(suite, tmp_path, tasks=("mutag",), ablation_task="digits-noisy40")
    with pytest.raises(ValueError, match="Invalid ablation/analysis task: 'digits-noisy40'"):
        bad.validate()
    # Without --tasks the suite is unchanged.
    full = BenchConfig.from_suite(suite, tmp_path)
    assert full.extra_methods == dict(suite.extra_methods)
    assert full.ablation_task == suite.ablation_task
