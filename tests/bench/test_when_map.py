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
from helpers.toy_tasks import TASKS


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
    from helpers.toy_tasks import ToyResolver

    return ToyResolver()


# -- power: minimum detectable effect --------------------------------------------------------------


def test_mde_gives_80_percent_power_by_simulation_and_exceeds_the_normal_approximation():
    import math

    import numpy as np
    from scipy.stats import norm
    from scipy.stats import t as student

    from flatmin.bench.stats import min_detectable_effect, t_test_power

    # R: power.t.test(n = 10, sd = 1, power = 0.8, type = "one.sample")$delta = 0.9960.
    assert min_detectable_effect(1.0, 10) == pytest.approx(0.9960, abs=5e-4)
    n, sd = 5, 2.0
    mde = min_detectable_effect(sd, n)
    assert t_test_power(mde, sd, n) == pytest.approx(0.8, abs=1e-9)
    # Independent check: a seeded simulation of the paired t-test at that true difference.
    rng = np.random.default_rng(0)
    d = rng.normal(mde, sd, (200_000, n))
    tstat = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    assert (np.abs(tstat) > student.ppf(0.975, n - 1)).mean() == pytest.approx(0.8, abs=0.005)
    # The normal approximation (z_0.975 + z_0.8) sd / sqrt(n) is too small at n = 5 ...
    normal = (norm.ppf(0.975) + norm.ppf(0.8)) * sd / math.sqrt(n)
    assert mde > 1.3 * normal
    # ... and the limit at large n; the MDE scales with sd.
    assert min_detectable_effect(1.0, 5000) == pytest.approx(2.8016 / math.sqrt(5000), rel=1e-3)
    assert min_detectable_effect(3.0, 7) == pytest.approx(3 * min_detectable_effect(1.0, 7))


def test_mde_edge_cases():
    import math

    from flatmin.bench.stats import min_detectable_effect

    assert math.isnan(min_detectable_effect(0.0, 5))
    with pytest.raises(ValueError, match="Invalid n: 1"):
        min_detectable_effect(1.0, 1)
    with pytest.raises(ValueError, match=r"Invalid power: 1\.0"):
        min_detectable_effect(1.0, 5, power=1.0)


# -- the report's map ------------------------------------------------------------------------------

# Test accuracy (%) by task, method and seed; memorised share of flipped labels by task, method.
MAP_ACC = {
    "m-noisy0": {"baseline": (90, 91, 92), "sam": (91, 92, 93)},
    "m-noisy40": {"baseline": (60, 61, 62), "sam": (80, 84, 82)},
    "m-noisy40-x2": {"baseline": (58, 59, 60), "sam": (57, 59, 58)},
    "m-asym40": {"baseline": (70, 71, 72), "sam": (75, 75.5, 77)},
    "other": {"baseline": (50, 51, 52), "sam": (50, 52, 52)},
}
MAP_MEMO = {("m-noisy40", "baseline"): 0.91, ("m-noisy40", "sam"): 0.12,
            ("m-noisy40-x2", "baseline"): 0.95, ("m-noisy40-x2", "sam"): 0.88}  # fmt: skip
MAP_RHO = {"m-noisy0": 0.05, "m-noisy40": 0.2, "m-noisy40-x2": 0.5, "m-asym40": 0.2}


def _map_summary():
    from types import SimpleNamespace

    from flatmin.bench import Hyper, MethodResult, parse_record

    results = []
    for task, by in MAP_ACC.items():
        for method, accs in by.items():
            for seed, acc in enumerate(accs):
                memo = MAP_MEMO.get((task, method))
                rec = {
                    "hash": f"{task}-{method}-{seed}", "task": task, "method": method,
                    "seed": seed, "stage": "eval", "status": "ok", "domain": "vision",
                    "model": "net", "hyper": {}, "epochs": 3, "wall_time": 1.0,
                    "sizes": {"train": 10, "val": 10, "test": 100}, "budget": "full",
                    "recipe": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0,
                               "batch_size": 8, "epochs": 3, "schedule": "cosine"},
                    "final": {"test_acc": acc / 100, "val_acc": acc / 100, "train_acc": 0.9,
                              "train_acc_clean": None if memo is None else 0.5,
                              "noise_memorised": memo},
                    "curves": {"val_acc": [acc / 100], "train_loss": [0.1]},
                }  # fmt: skip
                results.append(MethodResult.parse(rec, parse_record(rec)))
    hypers = {(t, "sam"): Hyper(rho=r) for t, r in MAP_RHO.items()}
    return SimpleNamespace(records=results, tune_records=[], ablation=[], tuning=[],
                           searches=[], flatness=None, hypers=hypers)  # fmt: skip


def test_noise_maps_group_the_cells_of_a_base():
    from flatmin.bench.noise_map import MapCell, noise_maps, parse_cell

    assert parse_cell("mnist-5k-noisy40-x0.5") == MapCell("mnist-5k", "noisy", 40, 0.5)
    assert parse_cell("mnist-5k-asym40") == MapCell("mnist-5k", "asym", 40, 1.0)
    assert parse_cell("mnist-5k") is None
    (nm,) = noise_maps(list(MAP_ACC))
    assert nm.base == "m" and nm.noises == (0, 40) and nm.factors == (1.0, 2.0)
    assert nm.tasks == {(0, 1.0): "m-noisy0", (40, 1.0): "m-noisy40", (40, 2.0): "m-noisy40-x2"}
    assert nm.checks == ("m-asym40",)
    # One noisy task per base (the full suite) is no map.
    assert noise_maps(["digits-noisy40", "mnist-5k-noisy40", "rotten-tomatoes"]) == []


def test_report_map_section_tables(tmp_path):
    from flatmin.bench import write_report

    text = write_report(tmp_path, _map_summary(), meta={"methods": ["baseline", "sam"]},
                        figures=False).read_text()  # fmt: skip
    section = text.split("## When do flat minima help?")[1].split("\n## ")[0]
    lines = section.splitlines()
    sam = lines.index("**SAM − baseline** (points)")
    assert lines[sam + 2] == "| Noise \\ budget | 1× | 2× |"
    assert lines[sam + 4] == "| 0 % | +1.0 | – |"  # +1 on every seed: not tested, no mark
    assert lines[sam + 5] == "| 40 % | +21.0* (mem 91→12) | -1.0 (mem 95→88) |"
    rho = lines.index("**SAM: chosen rho** (and averaging start)")
    assert lines[rho + 4:rho + 6] == ["| 0 % | 0.05 | – |", "| 40 % | 0.2 | 0.5 |"]
    assert "| m-asym40 | +4.8* | 0.2 |" in lines
    assert "other" not in section


def test_map_figure_draws_the_gains_memorisation_and_rho(tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np

    from flatmin.bench import summarize
    from flatmin.bench.figures import pyplot_agg
    from flatmin.bench.noise_map import map_figure, noise_maps, write_map_figures

    summary = _map_summary()
    rows = {r.task: r for r in summarize(summary.records, ["baseline", "sam"])}
    (nm,) = noise_maps(list(rows))
    plt = pyplot_agg()
    fig = map_figure(plt, nm, rows, summary.hypers, ["baseline", "sam"])
    gain_ax, rho_ax = fig.axes[:2]
    gains = gain_ax.images[0].get_array()
    # Noise rows (0, 40) x budget columns (1x, 2x); the absent cell (0 %, 2x) is masked.
    assert gains[1, 0] == pytest.approx(21.0) and gains[1, 1] == pytest.approx(-1.0)
    assert gains[0, 0] == pytest.approx(1.0) and bool(gains.mask[0, 1])
    vmin, vmax = gain_ax.images[0].get_clim()
    assert vmin == -vmax == pytest.approx(-21.0)  # symmetric about 0: white is no gain
    texts = {t.get_text() for t in gain_ax.texts}
    assert {"+21.0*\n(mem 91→12)", "-1.0\n(mem 95→88)", "+1.0"} <= texts
    assert [t.get_text() for t in gain_ax.get_yticklabels()] == ["0 %", "40 %"]
    assert [t.get_text() for t in gain_ax.get_xticklabels()] == ["1×", "2×"]
    rho = rho_ax.images[0].get_array()
    assert rho[1, 1] == pytest.approx(np.log10(0.5)) and rho[0, 0] == pytest.approx(np.log10(0.05))
    assert {t.get_text() for t in rho_ax.texts} == {"0.05", "0.2", "0.5"}
    plt.close(fig)
    assert write_map_figures(tmp_path, [nm], rows, summary.hypers, ["baseline", "sam"]) == [
        "map_m.png"]  # fmt: skip
    assert (tmp_path / "map_m.png").stat().st_size > 1000


# -- the budget ablation, tuned again per budget (item 4) ------------------------------------------


def test_tuned_budget_ablation_chooses_again_per_budget(tmp_path):
    from flatmin.bench import run_grid
    from helpers.toy_tasks import ToyResolver

    cfg = BenchConfig(
        out=tmp_path, tasks=("toy-a",), methods=("baseline", "swa", "sam", "wasam"), seeds=(0,),
        extra_methods={"toy-a": ("samk",)}, tune=True, tune_seeds=(100,),
        grids={"sam": {"rho": (0.05, 0.2)}}, ablation_task="toy-a", ablation_factors=(0.5, 2.0),
        progress=False,
    )  # fmt: skip
    summary = run_grid(cfg, resolver=ToyResolver())
    tuned = {(c.task, c.method) for c in summary.tuning}
    for variant in ("toy-a-x0.5", "toy-a-x2"):
        # Only the ablation's methods are tuned on a budget variant (no samk, no extension of
        # the main grid's methods).
        assert {m for t, m in tuned if t == variant} == {"baseline", "swa", "sam", "wasam"}
    ablation = {(r.method, r.budget_factor): r for r in summary.ablation}
    methods = ("baseline", "swa", "sam", "wasam")
    assert set(ablation) == {(m, f) for m in methods for f in (0.5, 2.0)}
    for (method, factor), r in ablation.items():
        variant = f"toy-a-x{factor:g}"
        assert r.task == "toy-a" and r.record.task == variant  # reported under the ablation task
        assert r.hyper == summary.hypers[(variant, method)].as_dict()  # its own budget's choice
        assert r.record.epochs == {0.5: 2, 2.0: 8}[factor]  # the toy recipe's 4 epochs scaled
    text = (tmp_path / "report.md").read_text()
    ablation_text = text.split("## Budget ablation")[1].split("\n## ")[0]
    assert "Hyper-parameters used at each budget" in ablation_text
    rho2 = summary.hypers[("toy-a-x2", "sam")].rho
    assert f"rho={rho2:g}" in ablation_text.split("| SAM |")[-1]
    again = run_grid(cfg, resolver=ToyResolver())
    assert again.ran == 0 and again.hypers == summary.hypers


def test_report_prints_each_cells_minimum_detectable_effect(tmp_path):
    import statistics

    from flatmin.bench import write_report
    from flatmin.bench.stats import min_detectable_effect

    text = write_report(tmp_path, _map_summary(), meta={"methods": ["baseline", "sam"]},
                        figures=False).read_text()  # fmt: skip
    pvalues = text.split("## p-values")[1].split("\n## ")[0]
    assert "| Task | Method | Difference | p (paired t) | p (Holm) | MDE at 80 % power |" in pvalues
    sd = statistics.stdev([20.0, 23.0, 20.0])  # m-noisy40: SAM - baseline per seed
    row = next(line for line in pvalues.splitlines() if line.startswith("| m-noisy40 | SAM"))
    assert row.endswith(f"| {min_detectable_effect(sd, 3):.2f} (n=3) |")
    zero = next(line for line in pvalues.splitlines() if line.startswith("| m-noisy0 | SAM"))
    assert zero.endswith("| – |")  # +1 on every seed: no variance, no power computation


def test_with_an_epochs_override_the_ablation_keeps_the_1x_choices(tmp_path):
    from flatmin.bench import run_grid
    from helpers.toy_tasks import ToyResolver

    cfg = BenchConfig(
        out=tmp_path, tasks=("toy-a",), methods=("baseline", "sam"), seeds=(0,), tune=True,
        tune_seeds=(100,), grids={"sam": {"rho": (0.05, 0.2)}}, ablation_task="toy-a",
        ablation_factors=(2.0,), epochs=2, progress=False,
    )  # fmt: skip
    summary = run_grid(cfg, resolver=ToyResolver())
    assert {c.task for c in summary.tuning} == {"toy-a"}
    (sam,) = [r for r in summary.ablation if r.method == "sam"]
    assert sam.record.task == "toy-a" and sam.record.epochs == 4
    assert sam.hyper == summary.hypers[("toy-a", "sam")].as_dict()
