"""flatmin.tune: stability score, known optimum, pruning, lucky seeds, kill/resume, CLI errors."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from flatmin import cli  # noqa: E402
from flatmin._proc import Interrupted  # noqa: E402
from flatmin.tune import (  # noqa: E402
    NoTrialCompleted,
    Param,
    Score,
    SeedRun,
    StudyConflictError,
    TrialFailed,
    TrialRecord,
    bench_space,
    family_space,
    search,
    stability_score,
    startup_points,
)
from flatmin.tune.result import best_trial, score_bound  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
RHO = Param("rho", 0.01, 2.0, log=True)


# --- the stability score ----------------------------------------------------------------------


def test_stability_score_matches_numpy():
    values = [0.91, 0.95, 0.62, 0.88]
    s = stability_score(values, spread_penalty=1.5)
    ref = np.asarray(values, dtype=np.float64)
    assert s.mean == pytest.approx(ref.mean(), abs=1e-15)
    assert s.std == pytest.approx(ref.std(ddof=0), abs=1e-15)
    assert s.value == pytest.approx(ref.mean() - 1.5 * ref.std(ddof=0), abs=1e-15)
    assert (s.min, s.max) == (0.62, 0.95)


def test_two_seeds_penalty_one_is_the_worse_seed_and_zero_the_mean():
    # rho 1.0 on digits-noisy40 (issue 17): one seed 97 %, the other 52 %.
    assert stability_score([0.97, 0.52]).value == pytest.approx(0.52, abs=1e-15)
    assert stability_score([0.97, 0.52], spread_penalty=0).value == pytest.approx(0.745)


@pytest.mark.parametrize(
    ("values", "penalty", "match"),
    [
        ([], 1.0, r"Invalid values: \[\]"),
        ([0.9, math.nan], 1.0, "Invalid value: nan"),
        ([0.9, math.inf], 1.0, "Invalid value: inf"),
        ([0.9], -0.5, "Invalid spread_penalty: -0.5"),
        ([0.9], math.nan, "Invalid spread_penalty: nan"),
    ],
)
def test_stability_score_rejects(values, penalty, match):
    with pytest.raises(ValueError, match=match):
        stability_score(values, penalty)


@pytest.mark.parametrize(
    ("values", "n_seeds", "penalty"),
    [([0.7], 2, 1.0), ([0.7], 2, 2.0), ([0.9, 0.8], 3, 1.0), ([0.9, 0.6, 0.8], 5, 1.5),
     ([0.5, 0.5], 3, 0.8), ([0.9, 0.7], 4, 1.2)],
)  # fmt: skip
def test_score_bound_is_the_supremum_over_the_missing_seeds(values, n_seeds, penalty):
    bound = score_bound(values, n_seeds, penalty)
    r = n_seeds - len(values)
    rng = np.random.default_rng(0)
    # Never exceeded by any completion (unequal ones included) ...
    for x in rng.uniform(-3.0, 4.0, size=(2000, r)):
        assert stability_score([*values, *x], penalty).value <= bound + 1e-12
    # ... and reached by an equal completion (scipy's bounded Brent as the reference).
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda x: -stability_score([*values, *([x] * r)], penalty).value,
        bounds=(-3.0, 4.0), method="bounded", options={"xatol": 1e-10},
    )  # fmt: skip
    assert -res.fun == pytest.approx(bound, abs=1e-8)


def test_score_bound_special_cases():
    assert score_bound([0.7374], 2, 1.0) == 0.7374  # two seeds, penalty 1: the first seed
    assert score_bound([0.9], 3, 1.0) == math.inf  # λ²k < r: two missing seeds could be anything
    assert score_bound([0.9], 2, 0.5) == math.inf
    assert score_bound([0.9, 0.8], 2, 1.0) == pytest.approx(0.8)  # nothing missing: the score
    with pytest.raises(ValueError, match="Invalid values: 3 of 2 seeds"):
        score_bound([0.1, 0.2, 0.3], 2)


def _trial(number, values, state="complete"):
    score = stability_score(values) if state == "complete" else None
    return TrialRecord(number, state, {"rho": 0.1 * (number + 1)}, score=score)


def test_best_trial_ties_go_to_the_smaller_spread_then_the_earlier_trial():
    # Scores are equal (0.90): [0.90, 0.90] has std 0, [0.92, 0.90] has std 0.01.
    trials = [_trial(0, [0.92, 0.90]), _trial(1, [0.90, 0.90]), _trial(2, [0.90, 0.90])]
    assert best_trial(trials).number == 1
    assert best_trial([_trial(0, [0.99, 0.99], "pruned"), _trial(1, [0.5, 0.5])]).number == 1
    assert best_trial([_trial(0, [0.9, 0.9], "pruned")]) is None


# --- the space ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "rho", "low": 0.2, "high": 0.1}, "Invalid range for rho"),
        ({"name": "rho", "low": 0.0, "high": 1.0, "log": True}, "log scale"),
        ({"name": "rho", "low": 0.1, "high": math.inf}, "Invalid range for rho"),
        ({"name": "k", "low": 1.5, "high": 4, "integer": True}, "integer parameter"),
        ({"name": "2x", "low": 0.0, "high": 1.0}, "Invalid parameter name"),
    ],
)
def test_param_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Param(**kwargs)


def test_startup_points_halve_the_largest_gap_on_the_log_scale():
    points = startup_points([RHO], 4)
    quantiles = [0.5, 0.25, 0.75, 0.125]
    expected = [0.01 * (2.0 / 0.01) ** u for u in quantiles]
    assert [p["rho"] for p in points] == pytest.approx(expected, rel=1e-12)
    # Second dimension in base 3 (1/3, 2/3, 1/9, …), integers rounded into the range.
    k = Param("k", 2, 10, integer=True)
    assert [p["k"] for p in startup_points([RHO, k], 3)] == [round(2 + 8 / 3), round(2 + 16 / 3), 3]


def test_family_presets_and_the_benchmark_space_cover_the_grids():
    from flatmin.bench.methods import METHODS

    assert [p.name for p in family_space("asam")] == ["rho", "eta"]
    for name, m in METHODS.items():
        if not m.tuned_by and not m.grids:
            continue
        space = {p.name: p for p in bench_space(name)}
        assert set(space) == set(m.tuned_by) | set(m.grids)
        grids = {**{p: METHODS[o].grids.get(p) for p, o in m.tuned_by.items()}, **m.grids}
        for param, grid in grids.items():
            for v in grid.values if grid is not None else ():
                assert space[param].contains(v), (name, param, v)
    assert {p.name: p.log for p in bench_space("wasam")} == {"rho": True, "start": False}
    narrowed = bench_space("sam", {"rho": (0.1, 1.0)})
    assert (narrowed[0].low, narrowed[0].high, narrowed[0].log) == (0.1, 1.0, True)
    with pytest.raises(ValueError, match="no hyper-parameters to tune"):
        bench_space("baseline")
    with pytest.raises(ValueError, match="'start' is not tuned for 'sam'"):
        bench_space("sam", {"start": (0.5, 0.9)})


# --- search on synthetic objectives ---------------------------------------------------------


def _peak(rho: float, best: float = 0.3) -> float:
    """A smooth peak on the log scale: 0.95 at ``best``, 0.2 lower a decade away."""
    return 0.95 - 0.2 * (math.log10(rho) - math.log10(best)) ** 2


def test_search_finds_a_known_optimum():
    calls = []

    def train_fn(params, seed, report):
        calls.append((params["rho"], seed))
        target = _peak(params["rho"]) + 0.002 * (seed - 100.5)  # seeds differ a little
        for epoch in range(1, 6):
            report(epoch, target * (1 - 0.5**epoch))

    result = search(train_fn, [RHO], n_trials=20, pruner="none")
    best = result.best
    assert best is not None and result.count("complete") == 20
    assert abs(math.log10(best.params["rho"] / 0.3)) < 0.1  # within a factor 1.26 of 0.3
    assert {s for _, s in calls} == {100, 101}  # tuning seeds, not evaluation seeds 0, 1, …
    assert best.score.value == pytest.approx(
        stability_score([r.final for r in best.runs]).value, abs=1e-12
    )


def _curve_fn(final_of, epochs=8, log=None):
    """Training functions whose value climbs to ``final_of(rho, seed)`` over ``epochs``."""

    def train_fn(params, seed, report):
        final = final_of(params["rho"], seed)
        for epoch in range(1, epochs + 1):
            if log is not None:
                log.append((params["rho"], seed, epoch))
            report(epoch, final * (0.6 + 0.4 * epoch / epochs))

    return train_fn


GOOD = [{"rho": 0.2}, {"rho": 0.25}, {"rho": 0.3}]


@pytest.mark.parametrize("pruner", ["median", "halving"])
def test_pruning_stops_a_clearly_worse_trial(pruner):
    log = []
    fn = _curve_fn(lambda rho, seed: 0.3 if rho > 1 else 0.9, log=log)
    result = search(fn, [RHO], n_trials=4, initial=[*GOOD, {"rho": 1.5}], pruner=pruner, warmup=2)
    bad = result.trials[3]
    assert bad.params["rho"] == 1.5 and bad.state == "pruned"
    # Never during the warm-up: the first report after it (epoch 3 of seed 100) stops it.
    assert bad.pruned_at == (100, 3) and bad.epochs == 3
    assert len([e for r, _, e in log if r == 1.5]) == 3
    assert result.trials[0].state == "complete" and result.best.params["rho"] != 1.5


def test_without_a_pruner_the_worse_trial_runs_to_the_end():
    fn = _curve_fn(lambda rho, seed: 0.3 if rho > 1 else 0.9)
    result = search(fn, [RHO], n_trials=4, initial=[*GOOD, {"rho": 1.5}], pruner="none")
    assert result.trials[3].state == "complete" and result.trials[3].epochs == 16


@pytest.mark.parametrize(("seeds", "trained"), [(2, [100]), (3, [100, 101])])
def test_a_trial_that_cannot_win_stops_between_seeds(seeds, trained):
    log = []
    fn = _curve_fn(lambda rho, seed: 0.8 if rho > 1 else 0.9, log=log)
    result = search(fn, [RHO], n_trials=2, seeds=seeds, initial=[{"rho": 0.2}, {"rho": 1.5}])
    loser = result.trials[1]
    # Two seeds: its first seed (0.8) already caps its score below 0.9. Three seeds: one seed
    # cannot rule it out (the other two could be anything), two equal ones (0.8, 0.8) can.
    assert loser.state == "pruned" and "cannot win" in loser.reason
    assert sorted({s for r, s, _ in log if r == 1.5}) == trained
    assert [r.final for r in loser.runs] == pytest.approx([0.8] * len(trained))
    full = search(fn, [RHO], n_trials=2, seeds=seeds, initial=[{"rho": 0.2}, {"rho": 1.5}],
                  pruner="none")  # fmt: skip
    assert full.trials[1].state == "complete"


def test_trials_stopped_between_seeds_still_feed_the_median():
    # One complete trial (0.9), two stopped after seed 100 (0.8: cannot win): the median at each
    # step of seed 100 has three values, and the clearly worse trial is pruned inside its seed.
    fn = _curve_fn(lambda rho, seed: {0.2: 0.9, 1.5: 0.3}.get(rho, 0.8))
    points = [{"rho": 0.2}, {"rho": 0.05}, {"rho": 0.06}, {"rho": 1.5}]
    result = search(fn, [RHO], n_trials=4, initial=points, warmup=2)
    assert [t.state for t in result.trials] == ["complete", "pruned", "pruned", "pruned"]
    assert result.trials[1].pruned_at == (100, 8) and result.trials[3].pruned_at == (100, 3)


def test_a_lucky_seed_does_not_win():
    # rho >= 0.7: seed 100 is lucky (0.99), seed 101 is not (0.85); mean 0.92 beats the stable
    # values' 0.90, but their worse seed does not.
    def final(rho, seed):
        if rho >= 0.7:
            return 0.99 if seed == 100 else 0.85
        return 0.90 - 0.01 * abs(math.log10(rho / 0.1))

    points = [{"rho": 1.0}, {"rho": 0.1}]
    kw = {"n_trials": 10, "initial": points, "pruner": "none"}
    stable = search(_curve_fn(final), [RHO], **kw)
    assert stable.best.params["rho"] < 0.7
    lucky = [t for t in stable.trials if t.params["rho"] >= 0.7]
    assert lucky and all(t.score.mean > stable.best.score.mean for t in lucky)
    # The same search on one seed, or scored on the plain mean, picks the lucky value: the test
    # above would fail if the score ignored the seeds' spread.
    assert search(_curve_fn(final), [RHO], seeds=[100], **kw).best.params["rho"] >= 0.7
    assert search(_curve_fn(final), [RHO], spread_penalty=0, **kw).best.params["rho"] >= 0.7
    # With pruning (and the between-seeds stop) the stable value wins as well.
    pruned = search(_curve_fn(final), [RHO], **{**kw, "pruner": "median"})
    assert pruned.best.params["rho"] < 0.7


def test_a_diverging_seed_fails_the_trial_and_the_search_goes_on():
    def train_fn(params, seed, report):
        if params["rho"] > 1:
            report(1, 0.5)
            report(2, math.nan)
        if params["rho"] > 0.5:
            raise TrialFailed("loss diverged")
        report(1, 0.8)

    result = search(train_fn, [RHO], n_trials=3, initial=[{"rho": 1.5}, {"rho": 0.7}, GOOD[0]])
    states = [(t.state, t.reason) for t in result.trials]
    assert states[0] == ("failed", "seed 100: non-finite value nan at epoch 2")
    assert states[1] == ("failed", "loss diverged")
    assert states[2] == ("complete", None) and result.best.number == 2
    assert result.trials[0].runs[0].values[1] != result.trials[0].runs[0].values[1]  # NaN kept


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_trials": 0}, ValueError, "Invalid n_trials: 0"),
        ({"seeds": 0}, ValueError, "Invalid seeds: 0"),
        ({"seeds": [100, 100]}, ValueError, "distinct"),
        ({"warmup": -1}, ValueError, "Invalid warmup: -1"),
        ({"timeout": 0.0}, ValueError, "Invalid timeout: 0.0"),
        ({"pruner": "hyperband"}, ValueError, "Invalid pruner: 'hyperband'"),
        ({"spread_penalty": -1.0}, ValueError, "Invalid spread_penalty"),
        ({"initial": [{"rho": 5.0}]}, ValueError, r"rho=5.0 \(outside \[0.01, 2.0\]\)"),
        ({"initial": [{"eta": 0.1}]}, ValueError, "unknown parameter 'eta'"),
    ],
)
def test_search_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        search(lambda p, s, r: 0.5, [RHO], **kwargs)


def test_every_pruner_name_builds_its_pruner():
    # search.PRUNERS (no Optuna needed: the CLI's choices) and _pruners.FACTORIES stay one list.
    from flatmin.tune._pruners import FACTORIES, CurrentMedianPruner, make_pruner
    from flatmin.tune.search import PRUNERS

    assert tuple(FACTORIES) == PRUNERS
    built = {name: type(make_pruner(name, 3)) for name in PRUNERS}
    assert built == {
        "median": CurrentMedianPruner,
        "halving": optuna.pruners.SuccessiveHalvingPruner,
        "none": optuna.pruners.NopPruner,
    }
    with pytest.raises(ValueError, match="Invalid pruner: 'hyperband' \\(expected one of median"):
        make_pruner("hyperband", 3)


def test_reporter_rejects_epochs_that_do_not_increase():
    def train_fn(params, seed, report):
        report(2, 0.5)
        report(2, 0.6)

    with pytest.raises(ValueError, match=r"Invalid epoch: 2 \(expected > 2\)"):
        search(train_fn, [RHO], n_trials=1)


def test_a_directory_keeps_one_search(tmp_path):
    fn = _curve_fn(lambda rho, seed: 0.9, epochs=2)
    search(fn, [RHO], n_trials=2, out=tmp_path)
    with pytest.raises(
        StudyConflictError,
        match=r"other settings \(seeds \[100, 101\] there, \[100, 101, 102\] here\)",
    ):
        search(fn, [RHO], n_trials=2, out=tmp_path, seeds=3)
    assert search(fn, [RHO], n_trials=2, out=tmp_path).finished == 2  # same settings: resumes
    (tmp_path / "file").write_text("")
    with pytest.raises(StudyConflictError, match="not a directory"):
        search(fn, [RHO], n_trials=2, out=tmp_path / "file")


# --- kill -9 mid-study, then resume -------------------------------------------------------------

_SCRIPT = """
import json, os, sys, time
from flatmin.tune import Param, search

LOG = os.environ["TUNE_LOG"]
BLOCK = os.environ.get("TUNE_BLOCK_TRIAL")


def train_fn(params, seed, report):
    with open(LOG, "a") as f:
        f.write(json.dumps([os.getpid(), report.number, params["rho"], seed]) + "\\n")
    if BLOCK is not None and report.number == int(BLOCK):
        open(LOG + ".blocked", "w").close()
        time.sleep(120)  # killed here
    for epoch in range(1, 4):
        report(epoch, (0.95 - 0.1 * abs(params["rho"] - 0.3)) * epoch / 3)


def run(out):
    return search(train_fn, [Param("rho", 0.01, 2.0, log=True)], n_trials=6, out=out, pruner="none")


if __name__ == "__main__":
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run(sys.argv[1])
"""


def _calls(log: Path, pid: int) -> list[tuple[int, float, int]]:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [(n, rho, seed) for p, n, rho, seed in rows if p == pid]


def test_a_killed_search_resumes_without_redoing_finished_trials(tmp_path, monkeypatch):
    script = tmp_path / "study_script.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    log, out = tmp_path / "calls.jsonl", tmp_path / "study"
    env = {**os.environ, "TUNE_LOG": str(log), "TUNE_BLOCK_TRIAL": "3"}
    child = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not Path(str(log) + ".blocked").exists():
            assert child.poll() is None, "the search ended before trial 3"
            assert time.monotonic() < deadline, "trial 3 never started"
            time.sleep(0.05)
        spec = importlib.util.spec_from_file_location("study_script", script)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setenv("TUNE_LOG", str(log))
        monkeypatch.delenv("TUNE_BLOCK_TRIAL", raising=False)
        spec.loader.exec_module(module)
        with pytest.raises(
            StudyConflictError,
            match=f"another search is running in .* \\(process {child.pid} holds study.lock\\)",
        ):
            module.run(out)  # the live search holds the directory
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    before = _calls(log, child.pid)
    assert sorted({n for n, _, _ in before}) == [0, 1, 2, 3]
    rho_of = {n: rho for n, rho, _ in before}
    written = json.loads((out / "tune.json").read_text())["trials"]  # by the killed process
    assert [t["state"] for t in written] == ["complete"] * 3  # rewritten after each trial

    result = module.run(out)
    after = _calls(log, os.getpid())
    # Trials 0-2 were finished: not one of their runs again. Trial 3 (killed) is retried first.
    assert [n for n, _, _ in after] == [4, 4, 5, 5, 6, 6]
    assert after[0][1] == rho_of[3]
    states = {t.number: t.state for t in result.trials}
    assert states == {0: "complete", 1: "complete", 2: "complete", 3: "interrupted",
                      4: "complete", 5: "complete", 6: "complete"}  # fmt: skip
    assert result.trials[4].retry_of == 3 and result.finished == 6
    assert [t.runs for t in result.trials[:3]] == [
        tuple(SeedRun.from_dict(r) for r in t["runs"]) for t in written[:3]
    ]
    # A third run has nothing left to do.
    assert module.run(out).finished == 6 and _calls(log, os.getpid()) == after


# --- the benchmark adapter and the CLI ------------------------------------------------------


def test_the_adapter_reports_the_benchmark_runs_own_validation_curve():
    from flatmin.bench import Hyper, RunSpec, train
    from flatmin.tune import bench_train_fn

    seen = []

    class Stop(Exception):
        pass

    class Reporter:
        number = 0

        def __call__(self, epoch, value):
            seen.append((epoch, value))

    value = bench_train_fn("digits", "sam", "quick", epochs=2)({"rho": 0.05}, 100, Reporter())
    spec = RunSpec("digits", "sam", 100, "quick", Hyper(rho=0.05), 2, stage="tune")
    curves = train(spec, eval_val=True).record["curves"]
    assert [e for e, _ in seen] == [1, 2]
    assert [v for _, v in seen] == pytest.approx(curves["val_acc"], abs=1e-6)
    assert value == seen[-1][1]

    class Pruning(Reporter):
        def __call__(self, epoch, value):
            seen.append(epoch)
            raise Stop  # what TrialPruned does inside train(): ends the run at this epoch

    seen.clear()
    with pytest.raises(Stop):
        bench_train_fn("digits", "sam", "quick", epochs=3)({"rho": 0.05}, 100, Pruning())
    assert seen == [1]


def test_cli_tune_runs_then_resumes(tmp_path, capsys):
    argv = ["tune", "--task", "digits", "--method", "sam", "--epochs", "2", "--trials", "3",
            "--seeds", "1", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "digits sam: best rho=" in out and "over seeds 100" in out
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert len(saved["trials"]) == 3 and saved["config"]["task"] == "digits"
    assert (tmp_path / "tune.png").stat().st_size > 0 and (tmp_path / "study.db").exists()
    assert cli.main(argv) == 0  # resumes: nothing left to train, the same trials
    assert "3 trials: " in capsys.readouterr().out
    assert json.loads((tmp_path / "tune.json").read_text())["trials"] == saved["trials"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "cifar10", "--method", "sam"], "Unknown task: 'cifar10'"),
        (["--task", "digits", "--method", "nope"], "Unknown method: 'nope'"),
        (["--task", "digits", "--method", "baseline"], "no hyper-parameters to tune"),
        (["--task", "digits", "--method", "sam", "--trials", "0"], "argument --trials"),
        (["--task", "digits", "--method", "sam", "--seeds", "x"], "argument --seeds"),
        (["--task", "digits", "--method", "sam", "--timeout", "-1"], "argument --timeout"),
        (["--task", "digits", "--method", "sam", "--epochs", "0"], "argument --epochs"),
        (["--task", "digits", "--method", "sam", "--pruner", "hb"], "argument --pruner"),
        (["--task", "digits", "--method", "sam", "--budget", "huge"], "argument --budget"),
        (["--task", "digits", "--method", "sam", "--range", "rho"], "invalid range: 'rho'"),
        (["--task", "digits", "--method", "sam", "--range", "rho=1:0.1"], "Invalid range for"),
        (["--task", "digits", "--method", "sam", "--range", "eta=1:2"], "'eta' is not tuned"),
        (["--task", "digits", "--method", "sam", "--warmup", "1"], "Invalid warmup: 1.0"),
        (["--task", "digits", "--method", "sam", "--spread-penalty", "-1"], "spread_penalty"),
        (["--task", "digits", "--method", "sam", "--device", "tpu"], "Invalid device: 'tpu'"),
        (["--task", "digits", "--method", "sam", "--precision", "fp64"], "argument --precision"),
        (
            ["--task", "digits", "--method", "samk", "--precision", "fp16"],
            "Invalid precision: 'fp16' for method 'samk'",
        ),
    ],
)
def test_cli_bad_arguments_exit_2(argv, message, capsys, tmp_path):
    try:
        rc = cli.main(["tune", *argv, "--out", str(tmp_path / "o")])
    except SystemExit as exc:  # argparse's own checks
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and "flatmin tune: error:" in err and message in err
    assert not (tmp_path / "o").exists()


def test_cli_out_holding_another_search_exits_2(tmp_path, capsys):
    (tmp_path / "o").write_text("a file")
    rc = cli.main(["tune", "--task", "digits", "--method", "sam", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "flatmin tune: error: Invalid --out:" in err and "not a directory" in err


def test_cli_without_optuna_exits_2_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    assert cli.main(["tune", "--task", "digits", "--method", "sam"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatmin tune: error:") and "pip install 'flatmin[tune]'" in err


def test_score_round_trips_through_the_result_file(tmp_path):
    fn = _curve_fn(lambda rho, seed: 0.9 - 0.01 * (seed - 100), epochs=2)
    result = search(fn, [RHO], n_trials=2, out=tmp_path)
    saved = json.loads((tmp_path / "tune.json").read_text())
    for t, d in zip(result.trials, saved["trials"], strict=True):
        assert Score(**d["score"]) == t.score
        assert d["state"] == "complete" and d["values"] == {"100": 0.9, "101": 0.89}


def test_package_docstring_example_runs():
    import doctest

    import flatmin.tune

    result = doctest.testmod(flatmin.tune, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_the_docs_example_runs(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).parents[2] / "docs" / "tune.md").read_text()
    block = text.split("<!-- tune-example -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second run resumes: nothing left to train
        exec(compile(block, "docs/tune.md", "exec"), {"__name__": "__main__"})
        out = capsys.readouterr().out
        assert "best rho" in out and (tmp_path / "runs/tune-mlp/tune.png").exists()
    saved = json.loads((tmp_path / "runs/tune-mlp/tune.json").read_text())
    assert saved["n_trials"] == 8 and len(saved["trials"]) == 8


@pytest.mark.parametrize(
    ("exc", "rc", "message"),
    [
        (KeyboardInterrupt(), 130,
         "flatmin tune: interrupted by SIGINT; finished trials are kept: rerun the same command "
         "to resume"),
        (Interrupted(signal.SIGTERM), 143, "flatmin tune: interrupted by SIGTERM; finished trials"),
        (NoTrialCompleted("No trial completed for digits sam"), 1,
         "flatmin tune: error: No trial completed for digits sam"),
        # Any other error of a run is not "no trial completed": cli.main reports it as a crash.
        (RuntimeError("CUDA error: an illegal memory access"), 1,
         "flatmin tune: error: RuntimeError: CUDA error: an illegal memory access (`flatmin "
         "--debug tune ...`"),
    ],
)  # fmt: skip
def test_cli_interrupted_or_nothing_completed(exc, rc, message, monkeypatch, capsys, tmp_path):
    import flatmin.tune.bench

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(flatmin.tune.bench, "suggest_hyper", fail)
    argv = ["tune", "--task", "digits", "--method", "sam", "--out", str(tmp_path)]
    assert cli.main(argv) == rc
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


class _FakeTrain:
    """``flatmin.bench.train.train`` without training: records each spec, reports ``val_acc``."""

    def __init__(self):
        self.specs = []

    def __call__(self, spec, on_epoch=None, eval_val=False, **kwargs):
        import types

        self.specs.append(spec)
        n = spec.epochs or 2
        value = 0.9 - 0.1 * abs(math.log10(spec.hyper.rho / 0.1))
        for epoch in range(1, n + 1):
            on_epoch(epoch, n, {"val_acc": value * epoch / n})
        return types.SimpleNamespace(record={"status": "ok", "final": {"val_acc": value}})


def test_the_device_and_precision_reach_every_tuning_run(monkeypatch, tmp_path, capsys):
    import torch

    from flatmin.tune import suggest_hyper

    # The adapter's names (flatmin.tune.bench is the only code that builds benchmark runs).
    adapter = importlib.import_module("flatmin.tune.bench")
    fake = _FakeTrain()
    monkeypatch.setattr(adapter, "train", fake)
    # A GPU without one: "cuda" resolves to cuda:0 (RunSpec only builds a torch.device of it).
    real = adapter.resolve_device
    monkeypatch.setattr(
        adapter, "resolve_device",
        lambda name: torch.device("cuda", 0) if str(name).startswith("cuda") else real(name),
    )  # fmt: skip

    _, result = suggest_hyper("digits", "sam", seeds=1, n_trials=2, epochs=2, pruner="none",
                              device="cuda", precision="bf16")  # fmt: skip
    assert {(s.device, s.precision, s.stage) for s in fake.specs} == {("cuda:0", "bf16", "tune")}
    assert len(fake.specs) == 2
    assert (result.config["device"], result.config["precision"]) == ("cuda", "bf16")

    # cpu and fp32 are left out of the study's settings: older studies keep their identity.
    fake.specs.clear()
    _, result = suggest_hyper("digits", "sam", seeds=1, n_trials=1, epochs=2, pruner="none")
    assert {(s.device, s.precision) for s in fake.specs} == {("cpu", "fp32")}
    assert result.config == {"task": "digits", "method": "sam", "budget": "quick", "epochs": 2}

    # flatmin tune --device/--precision
    fake.specs.clear()
    argv = ["tune", "--task", "digits", "--method", "sam", "--epochs", "2", "--trials", "2",
            "--seeds", "1", "--out", str(tmp_path), "--no-progress", "--device", "cuda",
            "--precision", "bf16"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert {(s.device, s.precision) for s in fake.specs} == {("cuda:0", "bf16")}
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert (saved["config"]["device"], saved["config"]["precision"]) == ("cuda", "bf16")
    # The same directory on the CPU is another search: refused, not mixed with the GPU's.
    argv_cpu = argv[: argv.index("--device")]
    assert cli.main(argv_cpu) == 2
    assert "device 'cuda' there, None here" in capsys.readouterr().err


def test_bench_optuna_tuner_searches_on_the_grids_device_and_precision(tmp_path):
    from flatmin.bench import BenchConfig
    from flatmin.tasks import get_task
    from flatmin.tune.bench import OptunaTuner

    cfg = BenchConfig(out=tmp_path, tasks=("digits",), methods=("baseline", "sam"), seeds=(0,),
                      tune=True, progress=False, device="cuda:0", precision="bf16",
                      tune_seeds=(100, 101))  # fmt: skip
    session = OptunaTuner(trials=5, batch=3).start(cfg, {"digits": get_task("digits")})
    specs = session.ask({})
    # One batch of 3 trials of SAM's search, each a tuning run per tuning seed.
    assert {(s.task, s.method, s.stage, s.device, s.precision) for s in specs} == {
        ("digits", "sam", "tune", "cuda:0", "bf16")
    }
    assert sorted(s.seed for s in specs) == [100, 100, 100, 101, 101, 101]
    assert len({s.hyper.rho for s in specs}) == 3


# --- the benchmark's --tuner optuna ----------------------------------------------------------


@pytest.mark.data
def test_bench_with_the_optuna_tuner_uses_the_searched_values(tmp_path):
    from flatmin.bench import BenchConfig, TuneRecord, read_records, run_grid
    from flatmin.tune.bench import OptunaTuner

    cfg = BenchConfig(
        out=tmp_path, tasks=("digits",), methods=("baseline", "sam", "samk"), seeds=(0,),
        budget="quick", tune=True, tuner=OptunaTuner(trials=2), tune_seeds=(100,), epochs=1,
        progress=False,
    )  # fmt: skip
    summary = run_grid(cfg)
    (search,) = summary.searches
    assert (search.task, search.method) == ("digits", "sam")
    assert search.trials == {"complete": 2, "failed": 0}
    best = search.chosen["rho"]
    assert summary.hypers[("digits", "sam")].rho == pytest.approx(best)
    assert summary.hypers[("digits", "samk")].rho == pytest.approx(best)  # taken from SAM's
    assert not summary.tuning
    trials = [r for r in read_records(tmp_path / "results.jsonl") if isinstance(r, TuneRecord)]
    assert len(trials) == 2 and best in {r.hyper["rho"] for r in trials}
    text = (tmp_path / "report.md").read_text()
    assert "## Optuna searches" in text and "`--tuner optuna`" in text
    # Resumed: the finished search is not run again and gives the same choice.
    again = run_grid(cfg)
    assert again.hypers == summary.hypers and again.ran == 0


def test_bench_optuna_tuner_without_optuna_is_a_clear_error(monkeypatch, tmp_path):
    from flatmin.bench import BenchConfig
    from flatmin.tune.bench import OptunaTuner

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    cfg = BenchConfig(out=tmp_path, tasks=("digits",), methods=("baseline", "sam"), seeds=(0,),
                      tune=True, tuner=OptunaTuner())  # fmt: skip
    with pytest.raises(ValueError, match=r"pip install 'flatmin\[tune\]'"):
        cfg.validate()
    with pytest.raises(ValueError, match=r"Invalid tune_trials: 0 \(expected an integer >= 1\)"):
        OptunaTuner(trials=0).check()
