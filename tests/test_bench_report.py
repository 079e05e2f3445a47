"""The report's numbers against hand computation from a small fixture results.jsonl."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
from scipy import stats

from flatmin.bench import read_records, summarize, write_report
from flatmin.bench.report import paired_difference
from flatmin.bench.store import append_record

# Test accuracy (fraction) by (task, method) and seed; train accuracy = test + 0.05.
ACC = {
    ("alpha", "baseline"): {0: 0.80, 1: 0.82, 2: 0.84},
    ("alpha", "swa"): {0: 0.81, 1: 0.82, 2: 0.86},
    ("alpha", "sam"): {0: 0.85, 1: 0.87, 2: 0.88},
    ("beta", "baseline"): {0: 0.60, 1: 0.70},
    ("beta", "swa"): {0: 0.65, 1: 0.70},
    ("beta", "sam"): {0: 0.61},  # seed 1 failed: only one paired seed
}
BEST = {("alpha", "baseline"): 0.9, ("alpha", "sam"): 0.95}  # best-val test acc (else = final)
TIME = {"baseline": 10.0, "swa": 11.0, "sam": 20.0}
DOMAIN = {"alpha": "vision", "beta": "graph"}


def _records():
    recs = []
    for (task, method), by_seed in ACC.items():
        for seed, acc in by_seed.items():
            recs.append(
                {
                    "hash": f"{task}-{method}-{seed}", "task": task, "method": method,
                    "seed": seed, "stage": "eval", "status": "ok", "domain": DOMAIN[task],
                    "model": f"net-{task}", "hyper": {}, "epochs": 3,
                    "sizes": {"train": 100, "val": 20, "test": 40}, "budget": "quick",
                    "recipe": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0,
                               "batch_size": 8, "epochs": 3, "schedule": "cosine"},
                    "wall_time": TIME[method] * (1 + seed),
                    "final": {"test_acc": acc, "test_loss": 1 - acc, "val_acc": acc,
                              "train_acc": acc + 0.05, "train_loss": 0.1, "train_acc_clean": None,
                              "live_test_acc": acc},
                    "best_val": {"epoch": 2, "val_acc": acc,
                                 "test_acc": BEST.get((task, method), acc), "test_loss": 0.5},
                    "curves": {"test_acc": [acc / 2, acc, acc], "train_loss": [1.0, 0.5, 0.2]},
                }
            )  # fmt: skip
    recs.append(
        {"hash": "beta-sam-1", "task": "beta", "method": "sam", "seed": 1, "stage": "eval",
         "status": "failed", "reason": "non-finite training loss nan at epoch 1, step 3",
         "domain": "graph", "model": "net-beta", "hyper": {}, "wall_time": 1.0}
    )  # fmt: skip
    return recs


@pytest.fixture
def fixture_jsonl(tmp_path):
    path = tmp_path / "results.jsonl"
    for rec in _records():
        append_record(path, rec)
    return path


def _pct(task, method):
    return {s: 100 * a for s, a in ACC[(task, method)].items()}


def test_summary_numbers_by_hand(fixture_jsonl):
    rows = {r.task: r for r in summarize(read_records(fixture_jsonl), ["baseline", "swa", "sam"])}
    alpha = rows["alpha"]
    base = list(_pct("alpha", "baseline").values())
    assert alpha.baseline.mean == pytest.approx(statistics.mean(base))
    assert alpha.baseline.std == pytest.approx(statistics.stdev(base))
    assert alpha.baseline.n == 3
    for m in ("swa", "sam"):
        d = [_pct("alpha", m)[s] - _pct("alpha", "baseline")[s] for s in (0, 1, 2)]
        cell = alpha.diffs[m]
        assert cell.mean == pytest.approx(statistics.mean(d))
        assert cell.std == pytest.approx(statistics.stdev(d))
        # Paired t-test by hand: t = mean(d) / (sd(d)/√n), two-sided p from Student's t, n−1 dof.
        t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(3))
        assert cell.p == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    # sam on alpha: d = (5, 5, 4) → t = 4.667/0.577·√3 ≈ 14 → p ≈ 0.005 < 0.05 → marked.
    assert alpha.diffs["sam"].significant and alpha.diffs["sam"].format(signed=True).endswith("*")
    assert not alpha.diffs["swa"].significant
    # beta: SAM has one paired seed (the other failed): mean, no std, no test.
    beta_sam = rows["beta"].diffs["sam"]
    assert beta_sam.n == 1 and beta_sam.mean == pytest.approx(1.0)
    assert math.isnan(beta_sam.std) and beta_sam.p is None
    assert beta_sam.format(signed=True) == "+1.00 ± n/a"
    # Relative cost: mean wall time over seeds / the baseline's.
    assert alpha.cost["sam"] == pytest.approx(
        statistics.mean([20, 40, 60]) / statistics.mean([10, 20, 30])
    )
    assert rows["beta"].cost["swa"] == pytest.approx(statistics.mean([11, 22]) / 15)
    assert alpha.train_acc["swa"].mean == pytest.approx(100 * (0.83 + 0.05), abs=1e-9)


def test_best_val_selection_by_hand(fixture_jsonl):
    rows = {r.task: r for r in summarize(read_records(fixture_jsonl), ["baseline", "sam"],
                                        selection="best_val")}  # fmt: skip
    assert rows["alpha"].baseline.mean == pytest.approx(90.0)
    assert rows["alpha"].diffs["sam"].mean == pytest.approx(5.0)
    assert rows["alpha"].diffs["sam"].std == pytest.approx(0.0, abs=1e-12)
    assert rows["alpha"].diffs["sam"].p is None  # constant differences: no test


def test_constant_differences_have_no_p_value():
    cell = paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert cell is not None and cell.mean == 1.0 and cell.std == 0.0 and cell.p is None
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_report_markdown_and_csv(fixture_jsonl, tmp_path):
    out = tmp_path / "report"
    meta = {"suite": "fixture", "budget": "quick", "methods": ["baseline", "swa", "sam"]}
    path = write_report(out, read_records(fixture_jsonl), meta=meta, figures=False)
    text = path.read_text()
    # Kaddour et al. Table 2 layout, one table per domain, vision before graph.
    assert text.index("### vision") < text.index("### graph")
    d_swa = [1.0, 0.0, 2.0]
    d_sam = [5.0, 5.0, 4.0]
    row = (
        f"| alpha | net-alpha | {statistics.mean([80, 82, 84]):.2f} ± "
        f"{statistics.stdev([80, 82, 84]):.2f} | +{statistics.mean(d_swa):.2f} ± "
        f"{statistics.stdev(d_swa):.2f} | +{statistics.mean(d_sam):.2f} ± "
        f"{statistics.stdev(d_sam):.2f}* |"
    )
    assert row == "| alpha | net-alpha | 82.00 ± 2.00 | +1.00 ± 1.00 | +4.67 ± 0.58* |"
    assert row in text
    assert "| beta | net-beta | 65.00 ± 7.07 | +2.50 ± 3.54 | +1.00 ± n/a |" in text
    assert "| alpha | 87.0 / 82.0 | 88.0 / 83.0 | 91.7 / 86.7 |" in text  # fit table
    assert "| alpha | 1.00× | 1.10× | 2.00× |" in text  # cost table
    # Split sizes in train/val/test order (results.jsonl stores keys sorted).
    assert "| quick | sgd lr 0.1, wd 0 | 8 | 3 | cosine | 100/20/40 |" in text
    assert "beta / sam / seed 1: failed — non-finite training loss" in text
    assert "ttest_rel" in text and "seeds (0, 1, 2)" in text
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(_records())
    first = rows[0]
    assert (first["task"], first["method"], first["seed"]) == ("alpha", "baseline", "0")
    assert float(first["test_acc"]) == 0.80 and float(first["best_val_test_acc"]) == 0.9
    assert [r["status"] for r in rows].count("failed") == 1


def test_report_figures(fixture_jsonl, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig"
    text = write_report(out, read_records(fixture_jsonl)).read_text()
    for name in ("differences.png", "curves_test.png", "curves_train_loss.png"):
        assert (out / name).stat().st_size > 1000 and f"]({name})" in text


def test_summary_table_counts(fixture_jsonl):
    from flatmin.bench.report import summary_table

    rows = summarize(read_records(fixture_jsonl), ["baseline", "swa", "sam"])
    table = "\n".join(summary_table(rows, ["baseline", "swa", "sam"]))
    swa = statistics.mean([statistics.mean([1.0, 0.0, 2.0]), statistics.mean([5.0, 0.0])])
    sam = statistics.mean([statistics.mean([5.0, 5.0, 4.0]), 1.0])
    assert f"| SWA | 2 (0) | 0 (0) | 2 | {swa:+.2f} |" in table
    assert f"| SAM | 2 (1) | 0 (0) | 2 | {sam:+.2f} |" in table
