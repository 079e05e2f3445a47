"""Figures of the benchmark report (matplotlib, the ``plot`` extra; skipped without it)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flatmin._io import save_figure
from flatmin.bench.methods import ABLATION_METHODS, get_method
from flatmin.bench.stats import mean_ci

__all__ = ["curves_figure", "differences_figure", "report_figures"]


def pyplot_agg() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot extra is optional
        return None
    return plt


def report_figures(
    out: Path,
    rows: Sequence[Any],
    records: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    ablation: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """Write the report's figures into ``out`` and return their file names.

    Args:
        out: output directory.
        rows: the headline table's rows (:class:`~flatmin.bench.report.TaskRow`, Holm applied).
        records: the method results (one per task × method × seed, views included).
        methods: method order, ``"baseline"`` first.
        ablation: the budget ablation's results.
    """
    plt = pyplot_agg()
    if plt is None:
        return []
    figures = {"differences.png": differences_figure(plt, rows, methods)}
    for key, name in (("val_acc", "curves_val.png"), ("train_loss", "curves_train_loss.png")):
        figures[name] = curves_figure(plt, rows, records, methods, key)
    if ablation:
        figures["ablation.png"] = _ablation_figure(plt, ablation, records)
    names = []
    for name, fig in figures.items():
        if fig is not None:
            save_figure(fig, out / name, dpi=120)
            plt.close(fig)
            names.append(name)
    return names


def _colors(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method, the same in every figure."""
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def _grid(plt: Any, n: int, width: float, height: float) -> tuple[Any, list[Any]]:
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(width * cols, height * nrows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def differences_figure(plt: Any, rows: Sequence[Any], methods: Sequence[str]) -> Any:
    """One panel per task, each on its own scale: the methods' differences to the baseline.

    Bars are the mean paired difference ± its 95 % CI (the headline table's cells), ``*`` marks a
    Holm-corrected p < 0.05 (``Cell.significant``, the table's ``*``), ``=`` a difference equal on
    every seed. Returns ``None`` without a method to compare or a row.
    """
    others = [m for m in methods if m != "baseline"]
    if not others or not rows:
        return None
    colors = _colors(methods)
    fig, axes = _grid(plt, len(rows), 3.4, 3.0)
    x = np.arange(len(others))
    for ax, r in zip(axes, rows, strict=True):
        for i, m in enumerate(others):
            c = r.diffs.get(m)
            if c is None or math.isnan(c.mean):
                ax.annotate("not run", (i, 0), ha="center", va="bottom", color="grey",
                            rotation=90, fontsize="x-small")  # fmt: skip
                continue
            ci = 0.0 if math.isnan(c.ci) else c.ci
            ax.bar(i, c.mean, 0.7, yerr=ci, color=colors[m], capsize=2)
            mark = "=" if c.constant and c.n > 1 else "*" if c.significant else ""
            if mark:
                top = c.mean + ci if c.mean >= 0 else c.mean - ci
                ax.annotate(mark, (i, top), xytext=(0, 2 if c.mean >= 0 else -2),
                            textcoords="offset points", ha="center",
                            va="bottom" if c.mean >= 0 else "top", fontsize="large")  # fmt: skip
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.margins(y=0.15)
        ax.set_xticks(x, [m.upper() for m in others], rotation=45, ha="right", fontsize="small")
        ax.set_title(r.task, fontsize="medium")
        ax.set_ylabel("points", fontsize="small")
    fig.suptitle(
        "Test accuracy − baseline (points, own scale per task): mean ± 95 % CI of the per-seed "
        "paired differences\n* Holm-corrected paired t-test p < 0.05 over the headline table; "
        "= identical on every seed",
        fontsize="medium",
    )
    fig.tight_layout()
    return fig


CURVES = {
    "val_acc": "Validation accuracy (%) after each epoch",
    "train_loss": "Training loss (mean of the epoch's minibatch losses)",
}
CURVES_NOTE = {
    "val_acc": "◆ averaged methods (SWA, SWA-LR, WASAM): the average's validation accuracy "
    "(mean, min–max), evaluated only at the end of training",
    "train_loss": "averages (SWA, SWA-LR, WASAM) are not drawn: they exist only at the end, "
    "evaluated on the training set (see report.md)",
}


def _finals(records: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    return [(rec.get("final") or {}).get(key) for rec in records]


def _task_records(
    records: Sequence[Mapping[str, Any]], task: str, method: str
) -> list[Mapping[str, Any]]:
    return [
        r for r in records
        if r["task"] == task and r["method"] == method and r.get("status") == "ok"
    ]  # fmt: skip


def curves_figure(
    plt: Any,
    rows: Sequence[Any],
    records: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    key: str,
) -> Any:
    """Per-epoch ``key`` (``val_acc`` or ``train_loss``), one panel per task.

    The curves are the trajectories' live weights: the mean over seeds (line) and its min–max
    over seeds (band). The averaged methods (SWA, SWA-LR, WASAM) exist as an average only at
    the end of training: for validation accuracy (measured the same way every epoch and at the
    end) their final average is a marker (mean, min–max bar) at the last epoch. The per-epoch
    train loss is the running mean of the minibatch losses, a different measurement from the
    final evaluation on the training set, so no average is drawn on it. SWA's and WASAM's own
    curves would repeat the baseline's and SAM's. Returns ``None`` when no record has the curve.
    """
    from matplotlib.ticker import MaxNLocator

    scale = 100.0 if key.endswith("acc") else 1.0
    colors = _colors(methods)
    fig, axes = _grid(plt, len(rows), 4.0, 3.0)
    seeds: set[int] = set()
    drawn = False
    for ax, r in zip(axes, rows, strict=True):
        for m in methods:
            recs = _task_records(records, r.task, m)
            method = get_method(m)
            curves = [rec["curves"][key] for rec in recs if (rec.get("curves") or {}).get(key)]
            if curves and method.is_trajectory:
                n = min(len(c) for c in curves)
                vals = scale * np.asarray([c[:n] for c in curves], dtype=float)
                epochs = np.arange(1, n + 1)
                ax.plot(epochs, vals.mean(axis=0), color=colors[m], label=m)
                ax.fill_between(epochs, vals.min(axis=0), vals.max(axis=0), color=colors[m],
                                alpha=0.2, linewidth=0)  # fmt: skip
                seeds.add(len(curves))
                drawn = True
            finals = [scale * float(v) for v in _finals(recs, key) if v is not None]
            if key == "val_acc" and method.averaged and finals and curves:
                mean = float(np.mean(finals))
                last = max(len(c) for c in curves)
                ax.errorbar([last], [mean], yerr=[[mean - min(finals)], [max(finals) - mean]],
                            marker="D", markersize=5, color=colors[m], capsize=2, linestyle="none",
                            label=f"{m} (average, end)")  # fmt: skip
                drawn = True
        ax.set_title(r.task, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "train_loss":
            ax.set_yscale("log")
    if not drawn:
        plt.close(fig)
        return None
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    n_seeds = "/".join(str(n) for n in sorted(seeds))
    fig.suptitle(
        f"{CURVES.get(key, key)} of the live weights: mean over {n_seeds} seeds (line), "
        f"min–max over seeds (band)\n{CURVES_NOTE.get(key, '')}",
        fontsize="medium",
    )
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(len(handles), 6), fontsize="small")  # fmt: skip
    legend_height = 0.3 * math.ceil(len(handles) / 6) + 0.15  # inches, below the panels
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    return fig


def ablation_accuracies(
    ablation: Sequence[Mapping[str, Any]], main: Sequence[Mapping[str, Any]]
) -> dict[str, dict[float, list[float]]]:
    """Test accuracies (%) by method and budget factor, for the ablation's methods that ran.

    The ablation's runs, and the main grid's runs of the same task at factor 1.
    """
    task = ablation[0]["task"]
    pts: dict[str, dict[float, list[float]]] = {m: {} for m in ABLATION_METHODS}
    for r in [*ablation, *({**x, "budget_factor": 1.0} for x in main if x["task"] == task)]:
        if r.get("status") == "ok" and r["method"] in pts:
            pts[r["method"]].setdefault(float(r["budget_factor"]), []).append(
                100.0 * float(r["final"]["test_acc"])
            )
    return {m: by for m, by in pts.items() if by}


def _ablation_figure(
    plt: Any,
    ablation: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
) -> Any:
    task = ablation[0]["task"]
    pts = ablation_accuracies(ablation, records)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m, by in pts.items():
        factors = sorted(by)
        cells = [mean_ci(by[f]) for f in factors]
        ax.errorbar(factors, [c.mean for c in cells],
                    yerr=[0.0 if math.isnan(c.ci) else c.ci for c in cells],
                    marker="o", capsize=3, label=m)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({f for by in pts.values() for f in by}))
    ax.get_xaxis().set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.set_xlabel("epoch budget (× the task's)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: budget ablation (mean ± 95 % CI)", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
