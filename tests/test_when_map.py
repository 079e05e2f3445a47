"""Issue #23: task variants of the `when` map (-asymNN, -noisy0, -xF), per-suite grids and seeds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flatmin.bench import BenchConfig, get_suite, plan_tuning
from flatmin.bench.methods import RHO_GRID
from flatmin.bench.suites import map_cell
from flatmin.data import Dataset, TensorSplit, with_asymmetric_noise
from flatmin.data.splits import DIGIT_FLIPS, asymmetric_flips
from flatmin.tasks import get_task
from test_bench_support import TASKS


def _digits_like(n_per_class: int = 10) -> Dataset:
    y = torch.arange(10).repeat_interleave(n_per_class)
    split = TensorSplit(torch.randn(len(y), 2), y)
    return Dataset(
        name="d", domain="vision", train=split, val=TensorSplit(torch.randn(5, 2), y[:5]),
        test=TensorSplit(torch.randn(5, 2), y[:5]), num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
    )  # fmt: skip


# -- asymmetric noise ----------------------------------------------------------------------------


def test_asymmetric_noise_flips_exactly_the_digit_pairs_on_train_only():
    ds = _digits_like(10)
    noisy = with_asymmetric_noise(ds, 0.4, seed=3)
    old, new = ds.train.targets, noisy.train.targets
    assert torch.equal(noisy.train.clean_targets, old)
    for c in range(10):
        changed = new[(old == c) & (new != old)]
        if c in DIGIT_FLIPS:  # exactly 4 of the 10 samples, all to the fixed partner class
            assert changed.tolist() == [DIGIT_FLIPS[c]] * 4, c
        else:
            assert changed.numel() == 0, c
    assert DIGIT_FLIPS == {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
    assert noisy.val is ds.val and noisy.test is ds.test
    # The same seed gives the same flips; another seed other samples.
    assert torch.equal(with_asymmetric_noise(ds, 0.4, seed=3).train.targets, new)
    assert not torch.equal(with_asymmetric_noise(ds, 0.4, seed=4).train.targets, new)


def test_asymmetric_flips_of_other_classes_are_cyclic():
    ds = replace(_digits_like(2), class_names=tuple("abcdefghij"))
    assert asymmetric_flips(ds) == {c: (c + 1) % 10 for c in range(10)}
    assert asymmetric_flips(_digits_like(2)) == DIGIT_FLIPS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"fraction": 1.0}, "fraction: 1.0"), ({"fraction": 0.2, "flips": {1: 1}}, "flip: 1 -> 1"),
     ({"fraction": 0.2, "flips": {1: 10}}, "flip: 1 -> 10")],
)  # fmt: skip
def test_asymmetric_noise_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        with_asymmetric_noise(_digits_like(2), **kwargs)


# -- task variants ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["mnist-5k-asym40", "mnist-5k-noisy0", "mnist-5k-noisy40-x2", "mnist-5k-x0.5",
     "mnist-5k-noisy0-x4", "mnist-5k-asym40-x0.5", "digits-asym20-x3"],
)  # fmt: skip
def test_variant_names_round_trip(name):
    assert get_task(name).name == name
    assert get_task(get_task(name).name) == get_task(name)


@pytest.mark.parametrize(
    "name", ["mnist-5k-x2.0", "mnist-5k-x0", "mnist-5k-asym0", "mnist-5k-noisy05",
             "mnist-5k-x2-noisy40", "nope-x2"],
)  # fmt: skip
def test_non_canonical_variant_names_are_refused(name):
    with pytest.raises(ValueError, match="Unknown task"):
        get_task(name)


def test_budget_variant_scales_every_recipes_epochs_and_nothing_else():
    base, x2, half = get_task("mnist-5k-noisy40"), get_task("mnist-5k-noisy40-x2"), None
    for budget in ("quick", "full"):
        r, r2 = base.recipe(budget), x2.recipe(budget)
        assert r2.epochs == 2 * r.epochs and replace(r2, epochs=r.epochs) == r
    assert x2.recipe("full").epochs == 80 and x2.label_noise == 0.4
    half = get_task("mnist-5k-x0.5")
    assert (half.recipe("quick").epochs, half.recipe("full").epochs) == (2, 6)  # 1.5 -> 2
    warm = replace(base, quick=replace(base.quick, warmup_epochs=3)).with_budget(2)
    assert warm.quick.warmup_epochs == 6
    with pytest.raises(ValueError, match="budget factor: 0"):
        base.with_budget(0)


def test_noisy0_is_the_clean_control_of_the_noise_protocol():
    clean, zero, noisy = (get_task(n) for n in ("mnist-5k", "mnist-5k-noisy0", "mnist-5k-noisy40"))
    assert zero.label_noise == 0 and zero.recipe("full") == noisy.recipe("full")
    assert zero.recipe("full") != clean.recipe("full")  # 40 epochs without weight decay
    assert zero.recipe("quick") == clean.recipe("quick")


def test_asymmetric_task_changes_only_train_labels_of_the_source_classes():
    try:
        clean = get_task("mnist-5k").load("quick")
        asym = get_task("mnist-5k-asym40").load("quick")
    except Exception as exc:  # DataUnavailableError
        pytest.skip(f"mnist-5k unavailable: {exc}")
    old, new = clean.dataset.train.targets, asym.dataset.train.targets
    assert torch.equal(asym.dataset.train.clean_targets, old)
    moved = new != old
    for src, dst in DIGIT_FLIPS.items():
        n = int((old == src).sum())
        assert int(moved[old == src].sum()) == round(0.4 * n)
        assert set(new[moved & (old == src)].tolist()) == {dst}
    assert not moved[~torch.isin(old, torch.tensor(list(DIGIT_FLIPS)))].any()
    assert torch.equal(asym.dataset.val.targets, clean.dataset.val.targets)
    assert torch.equal(asym.dataset.test.targets, clean.dataset.test.targets)


# -- suites: the when map, per-task seeds, per-suite grids ----------------------------------------


def test_when_suite_lists_the_cells_as_tuned_tasks():
    suite = get_suite("when")
    assert map_cell("mnist-5k", 40, 2.0) == "mnist-5k-noisy40-x2"
    assert map_cell("mnist-5k", 0, 1.0) == "mnist-5k-noisy0"
    tasks = {get_task(t).name: get_task(t) for t in suite.tasks}
    assert set(tasks) == set(suite.tasks)
    cells = {(round(100 * t.label_noise), t.recipe("full").epochs, t.noise_kind)
             for t in tasks.values()}  # fmt: skip
    for noise in (0, 40, 80):
        for epochs in (20, 40, 80):
            assert (noise, epochs, "symmetric") in cells
    assert (40, 160, "symmetric") in cells and (40, 40, "asymmetric") in cells
    assert suite.tune and suite.seeds >= 3 and suite.methods[0] == "baseline"
    assert {"sam", "wasam", "swa"} <= set(suite.methods)
    cfg = BenchConfig.from_suite(suite, "unused")
    cfg.validate()
    assert cfg.grids["sam"]["rho"] == (0.05, 0.2, 0.5) and cfg.tune_seeds == (100,)


def test_full_suite_runs_ten_seeds_of_fashion_noisy40():
    cfg = BenchConfig.from_suite(get_suite("full"), "unused")
    assert cfg.seeds_of("fashion-mnist-noisy40") == tuple(range(10))
    assert cfg.seeds_of("mutag") == tuple(range(5))
    # A --seeds override applies to every task.
    assert BenchConfig.from_suite(get_suite("full"), "u", seeds=(0,)).seeds_of(
        "fashion-mnist-noisy40") == (0,)  # fmt: skip


def test_task_seeds_are_validated():
    cfg = BenchConfig(out=Path("u"), tasks=("digits",), methods=("baseline",), seeds=(0,))
    with pytest.raises(ValueError, match="task seeds: 'mutag'"):
        replace(cfg, task_seeds={"mutag": (0,)}).validate()
    with pytest.raises(ValueError, match="overlap"):
        replace(cfg, task_seeds={"digits": (0, 100)}, tune=True).validate()


def _toy_cfg(**kw) -> BenchConfig:
    return BenchConfig(out=Path("u"), tasks=("toy-a",), methods=("baseline", "sam", "wasam"),
                       seeds=(0,), tune=True, tune_seeds=(100,), **kw)  # fmt: skip


def test_a_suite_grid_replaces_the_methods_grid_for_the_trajectory_and_its_views():
    cfg = _toy_cfg(grids={"sam": {"rho": (0.05, 0.2, 0.5)}})
    plan = plan_tuning(cfg, {}, {}, {"toy-a": TASKS["toy-a"]})
    rhos = sorted({s.hyper.rho for s in plan.specs if s.method == "sam"})
    assert rhos == [0.05, 0.2, 0.5]  # wasam reads the same sam runs: no other rho
    default = plan_tuning(_toy_cfg(), {}, {}, {"toy-a": TASKS["toy-a"]})
    assert sorted({s.hyper.rho for s in default.specs if s.method == "sam"}) == list(RHO_GRID)


def test_a_suite_grid_is_extended_at_its_edge():
    cfg = _toy_cfg(grids={"sam": {"rho": (0.05, 0.2, 0.5)}})
    task_of = {"toy-a": TASKS["toy-a"]}
    records: dict = {}
    state: dict = {}
    for _ in range(6):  # larger rho is always better: 0.5 -> 1.25 -> 3.125, then at the edge
        plan = plan_tuning(cfg, state, records, task_of)
        for spec in plan.specs:
            rho = spec.hyper.rho or 0.0
            avg = {k: {"val_acc": rho} for k in ("0.5", "0.75", "0.9")}
            records[spec.config_hash(task_of[spec.task])] = {
                "status": "ok", "final": {"val_acc": rho}, "averages": avg}  # fmt: skip
        state = plan.state
    choice = plan.choices[("toy-a", "sam")]
    assert [p[0] for p in choice.points] == [0.05, 0.2, 0.5, 1.25, 3.125]
    assert choice.extended == ("rho: 1.25, 3.125",) and choice.at_edge == ("rho",)


@pytest.mark.parametrize(
    ("grids", "message"),
    [({"wasam": {"rho": (0.1, 0.2)}}, "wasam.rho"), ({"sam": {"start": (0.5,)}}, "sam.start"),
     ({"sam": {"rho": (0.2, 0.1)}}, "Invalid grid")],
)  # fmt: skip
def test_bad_suite_grids_are_refused(grids, message):
    with pytest.raises(ValueError, match=message):
        _toy_cfg(grids=grids).validate(_toy_resolver())


def _toy_resolver():
    from test_bench_support import ToyResolver

    return ToyResolver()
