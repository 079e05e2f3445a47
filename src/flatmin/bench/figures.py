"""Figures of the benchmark report (matplotlib, the ``plot`` extra; skipped without it)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flatmin._io import save_figure
from flatmin.bench.methods import ABLATION_METHODS
from flatmin.bench.stats import mean_ci

__all__ = ["report_figures"]


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
    """Write the report's figures into ``out`` and return their file names."""
    plt = pyplot_agg()
    if plt is None:
        return []
    names = []
    others = [m for m in methods if m != "baseline"]
    if others and rows:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
        width = 0.8 / len(others)
        x = np.arange(len(rows))
        for i, m in enumerate(others):
            cells = [r.diffs.get(m) for r in rows]
            means = [np.nan if c is None else c.mean for c in cells]
            cis = [0.0 if c is None or math.isnan(c.ci) else c.ci for c in cells]
            ax.bar(x + (i - (len(others) - 1) / 2) * width, means, width, yerr=cis, label=m,
                   capsize=2)  # fmt: skip
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, [r.task for r in rows], rotation=30, ha="right")
        ax.set_ylabel("test accuracy − baseline (points)")
        ax.set_title("Difference to the baseline (mean ± 95 % CI over seeds)")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        save_figure(fig, out / "differences.png", dpi=120)
        plt.close(fig)
        names.append("differences.png")
    trajectories = [m for m in methods if m not in ("swa", "wasam")]
    for key, ylabel, name in (
        ("val_acc", "validation accuracy (%), live weights", "curves_val.png"),
        ("train_loss", "train loss", "curves_train_loss.png"),
    ):
        if _curves_figure(plt, out / name, rows, records, trajectories, key, ylabel):
            names.append(name)
    if ablation:
        _ablation_figure(plt, out / "ablation.png", ablation, records)
        names.append("ablation.png")
    return names


def _curves_figure(
    plt: Any, path: Path, rows: Sequence[Any], records: Sequence[Mapping[str, Any]],
    methods: Sequence[str], key: str, ylabel: str,
) -> bool:  # fmt: skip
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    drawn = False
    for ax, r in zip(axes.flat, rows, strict=False):
        for m in methods:
            curves = [
                rec["curves"][key]
                for rec in records
                if rec["task"] == r.task
                and rec["method"] == m
                and rec.get("status") == "ok"
                and rec.get("curves", {}).get(key)
            ]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = np.mean([c[:n] for c in curves], axis=0)
            scale = 100.0 if key.endswith("acc") else 1.0
            ax.plot(np.arange(1, n + 1), scale * mean, label=m)
            drawn = True
        ax.set_title(r.task, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel, fontsize="small")
        if key == "train_loss":
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    if drawn:
        handles, labels = next(ax for ax in axes.flat if ax.get_lines()).get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize="small")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        save_figure(fig, path, dpi=110)
    plt.close(fig)
    return drawn


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
    path: Path,
    ablation: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
) -> None:
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
    save_figure(fig, path, dpi=120)
    plt.close(fig)
