"""The benchmark report: ``report.md``, ``results.csv`` and PNG figures.

Layout of the accuracy tables (Kaddour et al. 2022, Table 2): one table per domain; per task its
model, the baseline's test accuracy ``mean ± std`` over seeds, then for every other method the
difference to the baseline ``mean ± std`` of the per-seed differences (paired by seed). Standard
deviations are sample standard deviations (``ddof=1``). A difference is marked ``*`` when a
two-sided paired t-test over the seeds (``scipy.stats.ttest_rel``) gives ``p < 0.05``; with 2-3
seeds this test has little power, and a mark is weak evidence.

References:
    Kaddour et al., "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv:2202.00661.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flatmin._io import atomic_open, atomic_write_text, save_figure

__all__ = [
    "Cell",
    "TaskRow",
    "paired_difference",
    "summarize",
    "write_csv",
    "write_report",
]

DOMAINS = ("vision", "text", "graph")
ALPHA = 0.05
CSV_FIELDS = (
    "task", "domain", "model", "method", "seed", "status", "reason", "rho", "start",
    "test_acc", "test_loss", "best_val_epoch", "best_val_test_acc", "val_acc", "train_acc",
    "train_loss", "train_acc_clean", "live_test_acc", "epochs", "wall_time", "hash",
)  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One table cell: mean ± std over seeds (of accuracies, or of paired differences).

    Attributes:
        mean, std: in percent (``std`` is ``nan`` with one seed).
        n: number of seeds (paired seeds for a difference).
        p: paired t-test p-value (differences with ``n >= 2`` and non-constant differences only).
    """

    mean: float
    std: float
    n: int
    p: float | None = None

    @property
    def significant(self) -> bool:
        """``p < 0.05``."""
        return self.p is not None and self.p < ALPHA

    def format(self, *, signed: bool = False) -> str:
        """``97.12 ± 0.30`` or ``+0.25 ± 0.05*``; ``–`` when empty."""
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        mean = f"{self.mean:+.2f}" if signed else f"{self.mean:.2f}"
        std = "n/a" if math.isnan(self.std) else f"{self.std:.2f}"
        return f"{mean} ± {std}" + ("*" if signed and self.significant else "")


@dataclass(frozen=True)
class TaskRow:
    """One task of a domain table.

    Attributes:
        task, domain, model: identification.
        baseline: baseline test accuracy.
        diffs: per method, the paired difference to the baseline (``None``: no paired seeds).
        absolute: per method (baseline included), the test accuracy itself.
        train_acc: per method, the final train accuracy (on the labels trained on).
        cost: per method, mean wall time relative to the baseline's.
    """

    task: str
    domain: str
    model: str
    baseline: Cell
    diffs: dict[str, Cell | None]
    absolute: dict[str, Cell]
    train_acc: dict[str, Cell]
    cost: dict[str, float]


def _mean_std(values: Sequence[float]) -> Cell:
    if not values:
        return Cell(math.nan, math.nan, 0)
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return Cell(float(arr.mean()), std, int(arr.size))


def paired_difference(method: dict[int, float], baseline: dict[int, float]) -> Cell | None:
    """Mean ± std of ``method[s] − baseline[s]`` over the common seeds, with a paired t-test.

    Args:
        method: the method's values by seed (percent).
        baseline: the baseline's values by seed (percent).

    Returns:
        The difference cell (``p`` from ``scipy.stats.ttest_rel``; ``None`` when ``n < 2`` or
        every difference is equal), or ``None`` without common seeds.
    """
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    diffs = [method[s] - baseline[s] for s in seeds]
    cell = _mean_std(diffs)
    p = None
    if len(seeds) >= 2 and np.ptp(np.asarray(diffs)) > 0:
        from scipy.stats import ttest_rel

        p = float(ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return Cell(cell.mean, cell.std, cell.n, p)


def _metric(rec: dict[str, Any], selection: str) -> float:
    if selection == "best_val":
        return 100.0 * float(rec["best_val"]["test_acc"])
    return 100.0 * float(rec["final"]["test_acc"])


def summarize(
    records: Sequence[dict[str, Any]], methods: Sequence[str], *, selection: str = "final"
) -> list[TaskRow]:
    """Per-task rows of the report from evaluation records (``status == "ok"`` only).

    Args:
        records: evaluation records (one per task × method × seed).
        methods: method order; ``"baseline"`` is the reference.
        selection: ``"final"`` (last epoch) or ``"best_val"`` (epoch of best validation accuracy).
    """
    ok = [r for r in records if r.get("status") == "ok" and r.get("stage", "eval") == "eval"]
    tasks: dict[str, dict[str, Any]] = {}
    for r in records:
        tasks.setdefault(r["task"], {"domain": r.get("domain", "?"), "model": r.get("model", "?")})
    rows = []
    for task, info in tasks.items():
        by: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
        for r in ok:
            if r["task"] == task and r["method"] in by:
                by[r["method"]][int(r["seed"])] = r
        acc = {m: {s: _metric(r, selection) for s, r in by[m].items()} for m in methods}
        base = acc.get("baseline", {})
        base_time = [r["wall_time"] for r in by.get("baseline", {}).values()]
        cost = {}
        for m in methods:
            times = [r["wall_time"] for r in by[m].values()]
            if times and base_time:
                cost[m] = float(np.mean(times) / np.mean(base_time))
        rows.append(
            TaskRow(
                task=task,
                domain=info["domain"],
                model=info["model"],
                baseline=_mean_std(list(base.values())),
                diffs={m: paired_difference(acc[m], base) for m in methods if m != "baseline"},
                absolute={m: _mean_std(list(acc[m].values())) for m in methods},
                train_acc={
                    m: _mean_std([100.0 * r["final"]["train_acc"] for r in by[m].values()])
                    for m in methods
                },
                cost=cost,
            )
        )
    return rows


def _domain_order(rows: Sequence[TaskRow]) -> list[str]:
    present = list(dict.fromkeys(r.domain for r in rows))
    return [d for d in DOMAINS if d in present] + [d for d in present if d not in DOMAINS]


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def accuracy_tables(rows: Sequence[TaskRow], methods: Sequence[str]) -> list[str]:
    """Markdown: one Kaddour-style table per domain."""
    others = [m for m in methods if m != "baseline"]
    out: list[str] = []
    for domain in _domain_order(rows):
        out += [f"### {domain}", ""]
        body = []
        for r in rows:
            if r.domain != domain:
                continue
            cells = [r.task, r.model, r.baseline.format()]
            for m in others:
                d = r.diffs.get(m)
                cells.append("–" if d is None else d.format(signed=True))
            body.append(cells)
        out += [*_table(["Task", "Model", "Baseline", *(m.upper() for m in others)], body), ""]
    return out


def summary_table(rows: Sequence[TaskRow], methods: Sequence[str]) -> list[str]:
    """Markdown: per method, on how many tasks it beats / trails the baseline (final epoch)."""
    body = []
    for m in methods:
        if m == "baseline":
            continue
        cells = [r.diffs[m] for r in rows if r.diffs.get(m) is not None]
        diffs = [c for c in cells if c is not None]
        if not diffs:
            continue
        better = sum(c.mean > 0 for c in diffs)
        worse = sum(c.mean < 0 for c in diffs)
        sig_b = sum(c.mean > 0 and c.significant for c in diffs)
        sig_w = sum(c.mean < 0 and c.significant for c in diffs)
        mean = float(np.mean([c.mean for c in diffs]))
        body.append(
            [
                m.upper(),
                f"{better} ({sig_b})",
                f"{worse} ({sig_w})",
                str(len(diffs)),
                f"{mean:+.2f}",
            ]
        )
    header = ["Method", "Tasks better (*)", "Tasks worse (*)", "Tasks", "Mean difference"]
    return _table(header, body)


def _fit_table(rows: Sequence[TaskRow], methods: Sequence[str]) -> list[str]:
    body = []
    for r in rows:
        cells = [r.task]
        for m in methods:
            tr, te = r.train_acc.get(m), r.absolute.get(m)
            if tr is None or te is None or tr.n == 0:
                cells.append("–")
            else:
                cells.append(f"{tr.mean:.1f} / {te.mean:.1f}")
        body.append(cells)
    return _table(["Task", *(m.upper() for m in methods)], body)


def _cost_table(rows: Sequence[TaskRow], methods: Sequence[str]) -> list[str]:
    body = []
    for r in rows:
        body.append([r.task, *(f"{r.cost[m]:.2f}×" if m in r.cost else "–" for m in methods)])
    geo = []
    for m in methods:
        vals = [r.cost[m] for r in rows if m in r.cost]
        geo.append(f"{math.exp(float(np.mean(np.log(vals)))):.2f}×" if vals else "–")
    body.append(["**geometric mean**", *geo])
    return _table(["Task", *(m.upper() for m in methods)], body)


def _hyper_table(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    used: dict[str, dict[str, str]] = {}
    for r in records:
        hp = r.get("hyper") or {}
        text = ", ".join(f"{k}={v:g}" for k, v in sorted(hp.items())) or "–"
        first, last = r.get("averaging_start_epoch"), r.get("epochs_planned")
        if first is not None and last is not None:
            text += f" [{first}–{last}]"
        used.setdefault(r["task"], {})[r["method"]] = text
    body = [[t, *(hp.get(m, "–") for m in methods)] for t, hp in used.items()]
    return _table(["Task", *(m.upper() for m in methods)], body)


def _task_table(records: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, list[str]] = {}
    for r in records:
        rec = r.get("recipe")
        if r["task"] in seen or not rec:
            continue
        seen[r["task"]] = [
            r["task"], r.get("domain", "?"), r.get("model", "?"), str(r.get("budget", "?")),
            f"{rec['optimizer']} lr {rec['lr']:g}, wd {rec['weight_decay']:g}",
            str(rec["batch_size"]), str(rec["epochs"]), rec["schedule"],
            # By name: results.jsonl stores keys sorted, so the dict's order is not the split's.
            "/".join(str((r.get("sizes") or {}).get(k, "?")) for k in ("train", "val", "test")),
        ]  # fmt: skip
    header = [
        "Task", "Domain", "Model", "Budget", "Optimizer", "Batch", "Epochs", "Schedule",
        "Train/val/test",
    ]  # fmt: skip
    return _table(header, list(seen.values()))


def _tuning_table(tuning: Sequence[Any]) -> list[str]:
    body = []
    for c in tuning:
        accs = [
            ("–" if a is None else f"{100 * a:.2f}") + (" ←" if v == c.chosen else "")
            for v, a in zip(c.values, c.val_acc, strict=True)
        ]
        grid = ", ".join(f"{c.param}={v:g}: {a}" for v, a in zip(c.values, accs, strict=True))
        body.append([c.task, c.owner, grid, f"{c.chosen:g}"])
    return _table(["Task", "Method", "Validation accuracy (%) per value", "Chosen"], body)


def write_csv(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> None:
    """One row per run (see :data:`CSV_FIELDS`), sorted by task, method, seed."""
    rows = sorted(records, key=lambda r: (r.get("task", ""), r.get("method", ""), r.get("seed", 0)))
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            final, best, hp = r.get("final") or {}, r.get("best_val") or {}, r.get("hyper") or {}
            writer.writerow(
                {
                    "task": r.get("task"), "domain": r.get("domain"), "model": r.get("model"),
                    "method": r.get("method"), "seed": r.get("seed"), "status": r.get("status"),
                    "reason": r.get("reason") or "", "rho": hp.get("rho", ""),
                    "start": hp.get("start", ""), "test_acc": final.get("test_acc", ""),
                    "test_loss": final.get("test_loss", ""),
                    "best_val_epoch": best.get("epoch", ""),
                    "best_val_test_acc": best.get("test_acc", ""),
                    "val_acc": final.get("val_acc", ""), "train_acc": final.get("train_acc", ""),
                    "train_loss": final.get("train_loss", ""),
                    "train_acc_clean": _blank(final.get("train_acc_clean")),
                    "live_test_acc": final.get("live_test_acc", ""),
                    "epochs": r.get("epochs", ""), "wall_time": _fmt_time(r.get("wall_time")),
                    "hash": r.get("hash"),
                }
            )  # fmt: skip


def _blank(value: Any) -> Any:
    return "" if value is None else value


def _fmt_time(value: Any) -> str:
    return "" if value is None else f"{float(value):.2f}"


def write_report(
    out: str | os.PathLike[str],
    records: Sequence[dict[str, Any]],
    *,
    tuning: Sequence[Any] = (),
    tune_records: Sequence[dict[str, Any]] = (),
    meta: dict[str, Any] | None = None,
    figures: bool = True,
) -> Path:
    """Write ``report.md``, ``results.csv`` and the figures into ``out``.

    Args:
        out: output directory.
        records: evaluation records of the grid.
        tuning: the validation-grid choices (:class:`~flatmin.bench.runner.TuneChoice`).
        tune_records: the validation-grid records (their failures are listed).
        meta: the grid's options (suite, budget, seeds, ...), shown at the top.
        figures: draw the PNG figures (needs matplotlib).

    Returns:
        The path of ``report.md``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    methods = list(meta.get("methods") or dict.fromkeys(r["method"] for r in records))
    if "baseline" in methods:
        methods.remove("baseline")
        methods.insert(0, "baseline")
    rows = summarize(records, methods)
    best_rows = summarize(records, methods, selection="best_val")
    ok = [r for r in records if r.get("status") == "ok"]
    seeds = sorted({int(r["seed"]) for r in ok})
    write_csv(out / "results.csv", records)

    lines = ["# flatmin benchmark report", ""]
    lines += [
        f"Suite `{meta.get('suite') or 'custom'}`, `{meta.get('budget', '?')}` budgets"
        + (
            " except " + ", ".join(f"{t} (`{b}`)" for t, b in meta["task_budgets"].items())
            if meta.get("task_budgets")
            else ""
        )
        + "; "
        f"{len(rows)} tasks × {len(methods)} methods × {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}); {len(ok)} of {len(records)} runs finished.",
        "",
        "Test accuracy (%) in the layout of Kaddour et al. (2022), Table 2: the baseline's mean ± "
        "std over seeds, then each method's difference to the baseline, mean ± std of the "
        "per-seed differences (paired by seed; sample std, ddof = 1). `*`: two-sided paired "
        "t-test over seeds (`scipy.stats.ttest_rel`) with p < 0.05 — with so few seeds the test "
        "has little power and a mark is weak evidence; an unmarked difference is not evidence "
        "of no effect.",
        "",
        "Model selection: the **final epoch** (for SWA/WASAM the averaged weights, BatchNorm "
        "statistics recomputed on the training set). The epoch with the best validation "
        "accuracy is reported separately below. All methods train for the same number of "
        "epochs under the task's LR schedule; averaging never replaces it.",
        "",
    ]
    if meta.get("tune"):
        lines += [
            f"Hyper-parameters: rho and the SWA start chosen per task on the validation split "
            f"(grid runs with seed {meta.get('tune_seed')}, not an evaluation seed; see "
            "'Validation grid').",
            "",
        ]
    else:
        lines += [
            "Hyper-parameters: fixed defaults (no validation grid in this suite): SAM/WASAM "
            "rho = 0.05, ASAM rho = 0.5, SWA/WASAM averaging from 75 % of the epoch budget "
            "(one snapshot per epoch).",
            "",
        ]
    lines += ["## Test accuracy (final epoch)", "", *accuracy_tables(rows, methods)]
    lines += [
        "### summary",
        "",
        "Tasks on which each method's mean difference to the baseline is positive / negative "
        "(in brackets: with p < 0.05), and the unweighted mean difference over tasks (points).",
        "",
        *summary_table(rows, methods),
        "",
    ]
    lines += ["## Test accuracy (epoch of best validation accuracy)", ""]
    lines += accuracy_tables(best_rows, methods)
    lines += [
        "## Fit: train accuracy / test accuracy (%)",
        "",
        "Final model, mean over seeds; train accuracy is measured on the labels trained on "
        "(noisy labels for the label-noise tasks: 100 % means the noise was memorised).",
        "",
    ]
    lines += [*_fit_table(rows, methods), ""]
    lines += [
        "## Relative wall-clock cost",
        "",
        "Mean wall time of a run relative to the baseline's on the same task (training, "
        "per-epoch evaluation and BN recomputation included).",
        "",
    ]
    lines += [*_cost_table(rows, methods), ""]
    lines += [
        "## Tasks and budgets",
        "",
        "Split sizes are samples (labelled nodes for node classification): one test sample is "
        "100/n points of accuracy.",
        "",
        *_task_table(records),
        "",
    ]
    lines += [
        "## Hyper-parameters used",
        "",
        "`start` is the fraction of the epoch budget after which SWA averages one snapshot per "
        "epoch; the averaged epochs are shown in brackets (a single epoch means the average is "
        "the final weights, so SWA equals the baseline there).",
        "",
        *_hyper_table(records, methods),
        "",
    ]
    if tuning:
        lines += ["## Validation grid", "", *_tuning_table(tuning), ""]
    bad = [r for r in list(records) + list(tune_records) if r.get("status") != "ok"]
    if bad:
        lines += ["## Failed runs", ""]
        lines += [
            f"- {r.get('task')} / {r.get('method')} / seed {r.get('seed')}"
            f"{' (validation grid)' if r.get('stage') == 'tune' else ''}: "
            f"{r.get('status')} — {r.get('reason')}"
            for r in bad
        ] + [""]
    if figures and ok:
        names = _figures(out, rows, records, methods)
        if names:
            lines += ["## Figures", ""] + [f"![{n}]({n})" for n in names] + [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _figures(
    out: Path, rows: Sequence[TaskRow], records: Sequence[dict[str, Any]], methods: Sequence[str]
) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot extra is optional
        return []
    names = []
    others = [m for m in methods if m != "baseline"]
    if others and rows:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 2), 4))
        width = 0.8 / len(others)
        x = np.arange(len(rows))
        for i, m in enumerate(others):
            cells = [r.diffs.get(m) for r in rows]
            means = [np.nan if c is None else c.mean for c in cells]
            stds = [0.0 if c is None or math.isnan(c.std) else c.std for c in cells]
            ax.bar(x + (i - (len(others) - 1) / 2) * width, means, width, yerr=stds, label=m,
                   capsize=2)  # fmt: skip
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, [r.task for r in rows], rotation=30, ha="right")
        ax.set_ylabel("test accuracy − baseline (points)")
        ax.set_title("Difference to the baseline (mean ± std over seeds)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        save_figure(fig, out / "differences.png", dpi=120)
        plt.close(fig)
        names.append("differences.png")
    for key, ylabel, name in (
        ("test_acc", "test accuracy (%)", "curves_test.png"),
        ("train_loss", "train loss", "curves_train_loss.png"),
    ):
        cols = min(4, len(rows))
        nrows = math.ceil(len(rows) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
        for ax, r in zip(axes.flat, rows, strict=False):
            for m in methods:
                curves = [
                    rec["curves"][key]
                    for rec in records
                    if rec["task"] == r.task and rec["method"] == m and rec.get("status") == "ok"
                ]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                mean = np.mean([c[:n] for c in curves], axis=0)
                scale = 100.0 if key.endswith("acc") else 1.0
                ax.plot(np.arange(1, n + 1), scale * mean, label=m)
            ax.set_title(r.task, fontsize="medium")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            if key == "train_loss":
                ax.set_yscale("log")
        for ax in list(axes.flat)[len(rows) :]:
            ax.axis("off")
        labelled = [ax for ax in axes.flat if ax.get_lines()]
        if labelled:
            labelled[0].legend(fontsize="small")
        fig.tight_layout()
        save_figure(fig, out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names
