"""The report's statistics and tables against hand computation from a small fixture."""

from __future__ import annotations

import csv
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from flatmin.bench import GridTuner, Hyper, MethodResult, parse_record, summarize, write_report
from flatmin.bench.stats import holm, mean_ci, paired_difference, with_holm

# Test accuracy (fraction) by (task, method) and seed.
ACC = {
    ("alpha", "baseline"): {0: 0.80, 1: 0.82, 2: 0.84},
    ("alpha", "swa"): {0: 0.81, 1: 0.82, 2: 0.86},
    ("alpha", "sam"): {0: 0.85, 1: 0.87, 2: 0.88},
    ("beta", "baseline"): {0: 0.60, 1: 0.70},
    ("beta", "swa"): {0: 0.65, 1: 0.70},
    ("beta", "sam"): {0: 0.61},  # seed 1 failed: only one paired seed
}
# Memorisation of the noisy task alpha: (train acc on noisy labels, on true labels, memorised).
FIT = {"baseline": (1.0, 0.62, 0.98), "swa": (0.97, 0.66, 0.93), "sam": (0.64, 0.91, 0.12)}
TIME = {"baseline": 10.0, "swa": 10.0, "sam": 20.0}
DOMAIN = {"alpha": "vision", "beta": "graph"}
SIZES = {"alpha": {"train": 100, "val": 500, "test": 400}, "beta": {"train": 50, "val": 20,
         "test": 188, "folds": 10}}  # fmt: skip


def _records():
    recs = []
    for (task, method), by_seed in ACC.items():
        for seed, acc in by_seed.items():
            tr, clean, memo = FIT[method] if task == "alpha" else (acc + 0.05, None, None)
            recs.append(
                {
                    "hash": f"{task}-{method}-{seed}", "task": task, "method": method,
                    "seed": seed, "stage": "eval", "status": "ok", "domain": DOMAIN[task],
                    "model": f"net-{task}", "hyper": {}, "epochs": 3, "sizes": SIZES[task],
                    "budget": "full",
                    "recipe": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0,
                               "batch_size": 8, "epochs": 3, "schedule": "cosine"},
                    "wall_time": TIME[method] * (1 + seed),
                    "final": {"test_acc": acc, "test_loss": 1 - acc, "val_acc": acc,
                              "train_acc": tr, "train_loss": 0.1, "train_acc_clean": clean,
                              "noise_memorised": memo, "live_test_acc": acc},
                    "curves": {"val_acc": [acc / 2, acc, acc], "train_loss": [1.0, 0.5, 0.2]},
                }
            )  # fmt: skip
    recs.append(
        {"hash": "beta-sam-1", "task": "beta", "method": "sam", "seed": 1, "stage": "eval",
         "status": "failed", "reason": "non-finite training loss nan at epoch 1, step 3",
         "domain": "graph", "model": "net-beta", "hyper": {}, "wall_time": 1.0}
    )  # fmt: skip
    return recs


def _pct(task, method):
    return {s: 100 * a for s, a in ACC[(task, method)].items()}


def _results(records):
    """The fixture's records as the typed results the report reads (parsed like results.jsonl)."""
    return [MethodResult.parse(r, parse_record(r), r.get("budget_factor")) for r in records]


def _summary(records, ablation=(), **kw):
    base = dict(records=_results(records), tune_records=[], ablation=_results(ablation),
                tuning=[], searches=[], flatness=None,
                hypers={("alpha", "sam"): Hyper(rho=0.5)})  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


# -- statistics ------------------------------------------------------------------------------


def test_ci_equals_scipy_paired_t_interval():
    a, b = [81.0, 82.0, 86.0, 90.0, 79.5], [80.0, 82.5, 84.0, 85.0, 80.0]
    cell = paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    ref = stats.ttest_rel(a, b)
    lo, hi = ref.confidence_interval(0.95)
    assert cell.mean == pytest.approx((lo + hi) / 2, abs=1e-12)
    assert cell.ci == pytest.approx((hi - lo) / 2, rel=1e-12)
    assert cell.p == pytest.approx(ref.pvalue, rel=1e-12)
    # By hand: t_{0.975,4} = 2.7764451051977987.
    d = [x - y for x, y in zip(a, b, strict=True)]
    assert cell.ci == pytest.approx(2.7764451051977987 * statistics.stdev(d) / math.sqrt(5))


def test_mean_ci_of_accuracies():
    cell = mean_ci([80.0, 82.0, 84.0])
    assert cell.mean == 82.0 and cell.std == pytest.approx(2.0)
    assert cell.ci == pytest.approx(stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3))
    assert math.isnan(mean_ci([5.0]).ci) and mean_ci([]).n == 0


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.5]
    # Sorted: 0.01·4 = 0.04; 0.03·3 = 0.09; 0.04·2 = 0.08 -> max(0.09, 0.08) = 0.09; 0.5·1 = 0.5.
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.02, 0.3]) == pytest.approx([0.04, 0.3])
    assert holm([0.04, 0.045]) == pytest.approx([0.08, 0.08])  # monotone in the sorted order
    assert holm([0.6, 0.7, 0.8]) == pytest.approx([1.0, 1.0, 1.0])
    assert holm([]) == []


def test_holm_over_a_table_keeps_untested_cells():
    cells = {
        "a": paired_difference({0: 2.0, 1: 3.0, 2: 5.0}, {0: 1.0, 1: 1.0, 2: 1.0}),
        "b": paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}),  # constant: not tested
        "c": paired_difference({0: 1.0, 1: 1.5, 2: 0.5}, {0: 1.0, 1: 1.0, 2: 1.0}),
        "d": None,
    }
    out = with_holm(cells)
    ps = [cells["a"].p, cells["c"].p]
    assert [out["a"].p_holm, out["c"].p_holm] == pytest.approx(holm(ps))
    assert out["b"].p is None and out["b"].p_holm is None and not out["b"].significant
    assert out["d"] is None


def test_zero_variance_is_one_rule():
    cell = paired_difference({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert cell.constant and cell.std == 0.0 and cell.p is None
    assert cell.format(signed=True) == "+1.00 ="
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


# -- the report -------------------------------------------------------------------------------


def test_summary_numbers_by_hand():
    rows = {r.task: r for r in summarize(_results(_records()), ["baseline", "swa", "sam"])}
    alpha = rows["alpha"]
    base = list(_pct("alpha", "baseline").values())
    assert alpha.baseline.mean == pytest.approx(statistics.mean(base))
    assert alpha.baseline.ci == pytest.approx(
        stats.t.ppf(0.975, 2) * statistics.stdev(base) / math.sqrt(3)
    )
    raw = {}
    for task, m in (("alpha", "swa"), ("alpha", "sam"), ("beta", "swa")):
        b = _pct(task, "baseline")
        d = [_pct(task, m)[s] - b[s] for s in sorted(b) if s in _pct(task, m)]
        cell = rows[task].diffs[m]
        assert cell.mean == pytest.approx(statistics.mean(d))
        t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
        raw[(task, m)] = 2 * stats.t.sf(abs(t), df=len(d) - 1)
        assert cell.p == pytest.approx(raw[(task, m)])
    # One Holm family over the three tested cells (beta/sam has one seed: untested).
    adjusted = holm(list(raw.values()))
    for (task, m), p in zip(raw, adjusted, strict=True):
        assert rows[task].diffs[m].p_holm == pytest.approx(p)
    beta_sam = rows["beta"].diffs["sam"]
    assert beta_sam.n == 1 and beta_sam.p is None and beta_sam.format(signed=True) == "+1.00 ± n/a"
    assert alpha.cost["sam"] == pytest.approx(statistics.mean([20, 40, 60]) / 20)
    assert alpha.test_size == 400 and alpha.resolution == pytest.approx(0.25)
    assert rows["beta"].test_size == 188


def test_memorisation_columns_from_the_fixture():
    rows = {r.task: r for r in summarize(_results(_records()), ["baseline", "swa", "sam"])}
    for m, (tr, clean, memo) in FIT.items():
        assert rows["alpha"].fit[m] == pytest.approx((100 * tr, 100 * clean, 100 * memo))
    assert rows["beta"].fit["baseline"][1] is None


def test_report_markdown_and_csv(tmp_path):
    out = tmp_path / "report"
    meta = {"suite": "fixture", "budget": "full", "methods": ["baseline", "swa", "sam"],
            "tune": True, "tuning": GridTuner().describe([100, 101])}  # fmt: skip
    text = write_report(out, _summary(_records()), meta=meta, figures=False).read_text()
    assert text.index("### vision") < text.index("### graph")
    rows = {r.task: r for r in summarize(_results(_records()), ["baseline", "swa", "sam"])}
    a = rows["alpha"]
    # By hand (percent; t_{0.975,2} = 4.302652729749462, t_{0.975,1} = 12.706204736174694):
    #   baseline 80, 82, 84: mean 82, sd 2 -> CI 4.3027 * 2 / sqrt(3) = 4.968 -> "82.00 ± 4.97"
    #   swa - baseline d = (1, 0, 2): mean 1, sd 1 -> CI 4.3027 / sqrt(3) = 2.484;
    #     t = 1 / (1 / sqrt(3)) = 1.732, p = 0.2254 -> "+1.00 ± 2.48"
    #   sam - baseline d = (5, 5, 4): mean 4.667, sd 0.5774 -> CI 4.3027 * 0.5774 / sqrt(3)
    #     = 1.434; t = 14.0, p = 0.005063 -> "+4.67 ± 1.43"
    #   beta swa - baseline d = (5, 0): mean 2.5, sd 3.536, t = 1.0, p = 0.5 (beta sam: n = 1)
    #   Holm over the 3 tested cells, ascending: 3 * 0.005063 = 0.0152 (sam: "*"),
    #     max(0.0152, 2 * 0.2254) = 0.4508 (swa), max(0.4508, 1 * 0.5) = 0.5.
    line = "| alpha | net-alpha | 400 (0.25) | 82.00 ± 4.97 | +1.00 ± 2.48 | +4.67 ± 1.43* |"
    assert line in text
    # SAM on alpha: d = (5, 5, 4), p ≈ 0.0051; Holm over 3 cells keeps it < 0.05 → marked.
    assert a.diffs["sam"].p_holm < 0.05 and line.endswith("* |")
    assert "| beta | net-beta | 188 (0.53) |" in text
    # Memorisation table: test acc, train acc on noisy and true labels, noise memorised.
    assert "| alpha | SAM | 86.67 | 64.0 | 91.0 | 12.0 |" in text
    assert "| alpha | BASELINE | 82.00 | 100.0 | 62.0 | 98.0 |" in text
    assert "10-fold CV, pooled 50/20/188" in text
    assert "| alpha | – | – | rho=0.5 |" in text  # chosen hyper-parameters
    assert "mean over tuning seeds [100, 101]" in text
    assert "beta / sam / seed 1: failed — non-finite training loss" in text
    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(_records())
    first = csv_rows[0]
    assert (first["task"], first["method"], first["seed"]) == ("alpha", "baseline", "0")
    assert float(first["test_acc"]) == 0.80 and float(first["noise_memorised"]) == 0.98


def test_variant_table_share_of_sams_gain(tmp_path):
    recs = _records()
    for r in [r for r in recs if r["task"] == "alpha" and r["method"] == "baseline"]:
        v = {**r, "method": "samk", "hash": r["hash"] + "k", "wall_time": 13.0 * (1 + r["seed"])}
        v["final"] = {**r["final"], "test_acc": r["final"]["test_acc"] + 0.035}
        recs.append(v)
    meta = {"methods": ["baseline", "swa", "sam"], "variants": ["samk"]}
    text = write_report(tmp_path, _summary(recs), meta=meta, figures=False).read_text()
    sam_gain = statistics.mean([5.0, 5.0, 4.0])
    assert "| alpha | SAMK | 1.30× | +3.50 =" in text
    assert f"{100 * 3.5 / sam_gain:.0f} %" in text


def test_report_figures(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig"
    ablation = [
        {**r, "budget_factor": f, "epochs_planned": int(3 * f)}
        for r in _records() if r["task"] == "alpha" for f in (0.5, 2.0)
    ]  # fmt: skip
    meta = {"methods": ["baseline", "swa", "sam"]}
    text = write_report(out, _summary(_records(), ablation=ablation), meta=meta).read_text()
    for name in ("differences.png", "curves_val.png", "curves_train_loss.png", "ablation.png"):
        assert (out / name).stat().st_size > 1000 and f"]({name})" in text
    assert "| BASELINE | " in text and "0.5× (1 ep)" in text and "2× (6 ep)" in text


def test_summary_table_counts():
    from flatmin.bench.report import summary_table

    rows = summarize(_results(_records()), ["baseline", "swa", "sam"])
    table = "\n".join(summary_table(rows, ["baseline", "swa", "sam"]))
    swa = [statistics.mean([1.0, 0.0, 2.0]), statistics.mean([5.0, 0.0])]
    sam = [statistics.mean([5.0, 5.0, 4.0]), 1.0]
    assert f"| SWA | 2 (0) | 0 (0) | 2 | {np.mean(swa):+.2f} | {np.median(swa):+.2f} |" in table
    assert f"| SAM | 2 (1) | 0 (0) | 2 | {np.mean(sam):+.2f} | {np.median(sam):+.2f} |" in table
