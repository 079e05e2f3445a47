"""The tuning protocol (flatmin.bench.plan) on synthetic validation scores.

The runner is simulated: every run that a round of plan_tuning asks for gets a record whose
validation accuracy is a known function of its hyper-parameters and seed, so that every choice can
be predicted by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from flatmin.bench import BenchConfig, Hyper, RunSpec, plan_eval, plan_tuning
from flatmin.bench.methods import ASAM_RHO_GRID, RHO_GRID, START_GRID, Grid, get_method
from flatmin.bench.plan import eval_trajectory, free_params, tuned_methods
from flatmin.bench.train import average_key
from helpers.toy_tasks import TASKS


def _cfg(methods, tasks=("toy-a",), **kw) -> BenchConfig:
    return BenchConfig(
        out=Path("unused"), tasks=tasks, methods=methods, seeds=(0, 1), tune=True, **kw
    )


def simulate(cfg, score, max_rounds=30):
    """Run plan_tuning in rounds like the runner, answering every run with ``score``.

    ``score(spec, start)`` is the validation accuracy of the final weights (``start=None``) or of
    the average from ``start``; ``None`` makes the run fail.
    """
    task_of = {t: TASKS[t] for t in cfg.tasks}
    records: dict[str, dict] = {}
    trained: list[RunSpec] = []
    state: dict = {}
    for _ in range(max_rounds):
        plan = plan_tuning(cfg, state, records, task_of)
        missing = [s for s in plan.specs if s.config_hash(task_of[s.task]) not in records]
        for spec in missing:
            trained.append(spec)
            final = score(spec, None)
            rec = {"status": "failed"} if final is None else {"status": "ok"}
            rec["final"] = {"val_acc": final}
            rec["averages"] = {average_key(s): {"val_acc": score(spec, s)} for s in spec.starts()}
            records[spec.config_hash(task_of[spec.task])] = rec
        if missing:
            continue
        if plan.state == state:
            return plan, trained
        state = plan.state
    raise AssertionError("plan_tuning did not converge")


def _by_rho(f):
    """A score that depends on rho only (SAM trajectory runs)."""
    return lambda spec, start: f(spec.hyper.rho) if spec.hyper.rho is not None else 0.5


def test_interior_choice_needs_no_extension():
    cfg = _cfg(("baseline", "sam"))
    peak = 0.1
    plan, trained = simulate(cfg, _by_rho(lambda r: 1 - abs(math.log(r / peak))))
    c = plan.choices[("toy-a", "sam")]
    assert c.chosen == (0.1,) and c.extended == () and c.at_edge == ()
    assert [p[0] for p in c.points] == list(RHO_GRID)
    # 6 rho values x 2 tuning seeds; the baseline has nothing to tune.
    assert sorted((s.hyper.rho, s.seed) for s in trained if s.method == "sam") == sorted(
        (r, s) for r in RHO_GRID for s in (100, 101)
    )
    assert all(s.stage == "tune" and s.seed in (100, 101) for s in trained)


def test_high_edge_is_extended_until_the_optimum_is_inside():
    cfg = _cfg(("baseline", "sam"))
    # Peak at rho = 2: 1.0 is chosen (edge) -> +2.0 chosen (edge) -> +4.0, and 2.0 wins inside.
    plan, trained = simulate(cfg, _by_rho(lambda r: 1 - abs(math.log(r / 2.0))))
    c = plan.choices[("toy-a", "sam")]
    assert c.chosen == (2.0,)
    assert [p[0] for p in c.points] == [*RHO_GRID, 2.0, 4.0]
    assert c.extended == ("rho: 2, 4",) and c.at_edge == ()
    assert sorted({s.hyper.rho for s in trained}) == sorted([*RHO_GRID, 2.0, 4.0])


def test_extension_stops_after_two_steps_and_says_so():
    cfg = _cfg(("baseline", "sam"))
    plan, _ = simulate(cfg, _by_rho(lambda r: -r))  # smaller is always better
    c = plan.choices[("toy-a", "sam")]
    # One geometric step below 0.02 with the ratio of its neighbour: 0.02 * 0.02/0.05 = 0.008.
    assert [p[0] for p in c.points] == [0.0032, 0.008, *RHO_GRID]
    assert c.chosen == (0.0032,) and c.at_edge == ("rho",)


def test_selection_uses_the_mean_over_tuning_seeds():
    cfg = _cfg(("baseline", "sam"))

    def score(spec, start):
        if spec.hyper.rho is None:
            return 0.5
        if spec.hyper.rho == 0.5:  # best on seed 100 alone, worst on average
            return {100: 0.95, 101: 0.40}[spec.seed]
        return {0.1: 0.80, 0.2: 0.70}.get(spec.hyper.rho, 0.60)

    plan, _ = simulate(cfg, score)
    c = plan.choices[("toy-a", "sam")]
    assert c.chosen == (0.1,)
    i = [p[0] for p in c.points].index(0.5)
    assert c.per_seed[i] == (0.95, 0.40) and c.scores[i] == pytest.approx(0.675)


def test_a_value_with_a_failed_seed_cannot_win():
    cfg = _cfg(("baseline", "sam"))

    def score(spec, start):
        if spec.hyper.rho == 0.2 and spec.seed == 101:
            return None  # unstable: a non-finite loss on one seed
        return 0.9 if spec.hyper.rho == 0.2 else 0.7 if spec.hyper.rho is not None else 0.5

    plan, _ = simulate(cfg, score)
    c = plan.choices[("toy-a", "sam")]
    assert c.scores[[p[0] for p in c.points].index(0.2)] is None
    assert c.chosen == (0.05,)  # every other value ties: the default wins


def test_ties_go_to_the_default_then_to_the_smaller_value():
    cfg = _cfg(("baseline", "swa", "asam"))

    def score(spec, start):
        if spec.method == "asam":
            return 0.8 if spec.hyper.rho in (1.0, 2.0) else 0.5  # tie, default 0.5 not in it
        return 0.7  # every start ties, including the default 0.75

    plan, _ = simulate(cfg, score)
    assert plan.choices[("toy-a", "swa")].chosen == (0.75,)
    assert plan.choices[("toy-a", "asam")].chosen == (1.0,)
    assert [p[0] for p in plan.choices[("toy-a", "asam")].points] == list(ASAM_RHO_GRID)


def test_views_read_their_trajectory_and_wasam_chooses_rho_and_start_jointly():
    cfg = _cfg(("baseline", "swa", "sam", "wasam"))

    def score(spec, start):
        rho = spec.hyper.rho
        if rho is None:  # the baseline: SWA from 0.5 is best
            return 0.6 if start is None else {0.5: 0.7, 0.75: 0.65, 0.9: 0.62}[start]
        if start is None:  # SAM's final weights: best at 0.2
            return 0.9 - abs(math.log(rho / 0.2)) / 10
        # SAM's averages: best at rho 0.1 from 0.9
        return 0.95 - abs(math.log(rho / 0.1)) / 10 - (0.9 - start) / 10

    plan, trained = simulate(cfg, score)
    assert plan.choices[("toy-a", "swa")].hyper == Hyper(start=0.5)
    assert plan.choices[("toy-a", "sam")].hyper == Hyper(rho=0.2)
    assert plan.choices[("toy-a", "wasam")].hyper == Hyper(rho=0.1, start=0.9)
    # Only baseline and SAM trajectories are trained: no run per start.
    assert {s.method for s in trained} == {"baseline", "sam"}
    assert all(s.starts() == START_GRID for s in trained)
    assert len(trained) == 2 * (1 + len(RHO_GRID))


def test_wasam_at_an_edge_extends_the_shared_sam_grid():
    cfg = _cfg(("baseline", "sam", "wasam"))

    def score(spec, start):
        rho = spec.hyper.rho
        if rho is None:
            return 0.5
        return 0.8 if start is None and rho == 0.1 else 0.5 if start is None else rho / 10

    plan, _ = simulate(cfg, score)
    wasam = plan.choices[("toy-a", "wasam")]
    sam = plan.choices[("toy-a", "sam")]
    assert wasam.hyper.rho == 4.0 and wasam.at_edge == ("rho",)
    assert [p[0] for p in sam.points] == [*RHO_GRID, 2.0, 4.0]  # SAM saw the new points too
    assert sam.chosen == (0.1,)


def test_dependents_wait_for_the_owner_and_use_its_final_rho():
    cfg = _cfg(("baseline", "sam", "looksam", "samk"))

    def score(spec, start):
        if spec.method == "looksam":
            return 0.9 - abs(spec.hyper.alpha - 0.3)
        rho = spec.hyper.rho
        return 0.5 if rho is None else 1 - abs(math.log(rho / 2.0))  # sam: 2.0 after extension

    plan, trained = simulate(cfg, score)
    assert plan.choices[("toy-a", "samk")].hyper == Hyper(rho=2.0)
    assert plan.choices[("toy-a", "looksam")].hyper == Hyper(rho=2.0, alpha=0.3)
    looksam_runs = [s for s in trained if s.method == "looksam"]
    assert {s.hyper.rho for s in looksam_runs} == {2.0}  # never at a stale rho
    assert len(looksam_runs) == 3 * 2


def test_plan_tuning_is_a_pure_function_of_its_inputs():
    cfg = _cfg(("baseline", "swa", "sam", "wasam"))
    score = _by_rho(lambda r: 1 - abs(math.log(r / 0.5)))
    a, ta = simulate(cfg, score)
    b, tb = simulate(cfg, score)
    assert a.choices == b.choices and ta == tb


def test_plan_eval_shares_trajectories():
    hypers = {
        ("toy-a", "swa"): Hyper(start=0.5),
        ("toy-a", "sam"): Hyper(rho=0.2),
        ("toy-a", "wasam"): Hyper(rho=0.2, start=0.9),
    }
    specs = plan_eval(["toy-a"], ["baseline", "swa", "sam", "wasam"], [0, 1], hypers,
                      lambda t: "quick")  # fmt: skip
    assert specs[("toy-a", "swa", 0)] == specs[("toy-a", "baseline", 0)]
    assert specs[("toy-a", "wasam", 1)] == specs[("toy-a", "sam", 1)]
    assert len({s for s in specs.values()}) == 4  # 2 trajectories x 2 seeds
    with pytest.raises(ValueError, match=r"Invalid start: 0\.6"):
        eval_trajectory(get_method("swa"), Hyper(start=0.6))


def test_method_graph():
    assert free_params(get_method("swa")) == ("start",)
    assert free_params(get_method("wasam")) == ("start",)
    assert free_params(get_method("swa-lr")) == ()
    order = tuned_methods(["looksam", "wasam", "baseline"])
    assert order.index("sam") < order.index("looksam")
    assert set(order) == {"looksam", "sam", "wasam", "baseline"}


@pytest.mark.parametrize(
    ("values", "extend", "match"),
    [((0.2, 0.1), False, "increasing"), ((), False, "increasing"), ((0.5,), True, "extendable")],
)
def test_grid_errors(values, extend, match):
    with pytest.raises(ValueError, match=match):
        Grid(values, extend=extend)


def test_grid_step_beyond_is_geometric():
    g = Grid(RHO_GRID, extend=True)
    assert g.step_beyond(RHO_GRID, "high") == 2.0
    assert g.step_beyond(RHO_GRID, "low") == 0.008
