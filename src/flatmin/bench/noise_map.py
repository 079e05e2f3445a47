"""The report's map of *when* flat minima help: label noise × epoch budget (issue #23).

Tasks that are variants of one base task (``mnist-5k-noisy40-x2``: 40 % symmetric noise, 2 × the
epochs; ``-noisy0`` the clean control, no ``-x`` suffix 1 ×) form a map: noise rows × budget
columns. For every method the report draws a heat map of its mean test-accuracy gain over the
baseline (``*``: Holm-corrected p < 0.05 in the headline family) with the share of flipped training
labels that the baseline and the method reproduce written in each cell (``mem 91→40``), and a
heat map of SAM's chosen ``rho`` per cell. Class-dependent noise cells (``-asym<NN>``) are listed
beside the map as checks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flatmin._io import save_figure
from flatmin.bench.figures import pyplot_agg
from flatmin.bench.methods import Hyper
from flatmin.bench.stats import Cell

__all__ = ["MapCell", "NoiseMap", "map_figure", "map_lines", "noise_maps", "parse_cell"]

_CELL = re.compile(
    r"^(?P<base>.+)-(?P<kind>noisy|asym)(?P<pct>[0-9]{1,2})(?:-x(?P<factor>[0-9]+(?:\.[0-9]+)?))?$"
)


@dataclass(frozen=True)
class MapCell:
    """Where a task sits on a map: its base task, noise kind and percent, and budget factor."""

    base: str
    kind: str
    noise: int
    factor: float


def parse_cell(task: str) -> MapCell | None:
    """``mnist-5k-noisy40-x2`` → ``MapCell("mnist-5k", "noisy", 40, 2.0)``; ``None`` otherwise."""
    m = _CELL.match(task)
    if m is None:
        return None
    return MapCell(m["base"], m["kind"], int(m["pct"]), float(m["factor"] or 1.0))


@dataclass(frozen=True)
class NoiseMap:
    """One base task's map.

    Attributes:
        base: the base task.
        noises: the symmetric noise levels (%), the rows.
        factors: the budget factors, the columns.
        tasks: the task of each ``(noise, factor)`` cell present.
        checks: the class-dependent noise cells (task names), outside the grid.
    """

    base: str
    noises: tuple[int, ...]
    factors: tuple[float, ...]
    tasks: Mapping[tuple[int, float], str]
    checks: tuple[str, ...] = ()


def noise_maps(tasks: Sequence[str]) -> list[NoiseMap]:
    """The maps among ``tasks``: bases with symmetric cells at >= 2 noise levels or budgets."""
    by: dict[str, dict[tuple[int, float], str]] = {}
    checks: dict[str, list[str]] = {}
    for task in tasks:
        cell = parse_cell(task)
        if cell is None:
            continue
        if cell.kind == "asym":
            checks.setdefault(cell.base, []).append(task)
        else:
            by.setdefault(cell.base, {})[(cell.noise, cell.factor)] = task
    out = []
    for base, cells in by.items():
        noises = tuple(sorted({n for n, _ in cells}))
        factors = tuple(sorted({f for _, f in cells}))
        if len(noises) >= 2 or len(factors) >= 2:
            out.append(NoiseMap(base, noises, factors, cells, tuple(checks.get(base, ()))))
    return out


def _gain(rows: Mapping[str, Any], task: str | None, method: str) -> Cell | None:
    row = rows.get(task) if task else None
    return None if row is None else row.diffs.get(method)


def _memo(rows: Mapping[str, Any], task: str | None, method: str) -> float | None:
    row = rows.get(task) if task else None
    return None if row is None else row.fit.get(method, (None, None, None))[2]


def _cell_text(rows: Mapping[str, Any], task: str | None, method: str) -> str:
    """``+3.10* (mem 91→40)``: the gain, its Holm mark and the memorisation shares."""
    gain = _gain(rows, task, method)
    if gain is None or math.isnan(gain.mean):
        return "–"
    text = f"{gain.mean:+.1f}" + ("*" if gain.significant else "")
    base, own = _memo(rows, task, "baseline"), _memo(rows, task, method)
    if base is not None and own is not None:
        text += f" (mem {base:.0f}→{own:.0f})"
    return text


def _rho_text(hypers: Mapping[tuple[str, str], Hyper], task: str | None, method: str) -> str:
    hyper = hypers.get((task, method)) if task else None
    if hyper is None or hyper.rho is None:
        return "–"
    return f"{hyper.rho:g}" + (f", s={hyper.start:g}" if hyper.start is not None else "")


def _grid_table(nm: NoiseMap, cell: Any) -> list[str]:
    """Markdown: noise rows × budget columns of ``cell(task)``."""
    head = ["Noise \\ budget", *(f"{f:g}×" for f in nm.factors)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for n in nm.noises:
        cells = [cell(nm.tasks.get((n, f))) for f in nm.factors]
        lines.append("| " + " | ".join([f"{n} %", *cells]) + " |")
    return lines


def map_lines(
    nm: NoiseMap, rows: Mapping[str, Any], hypers: Mapping[tuple[str, str], Hyper],
    methods: Sequence[str],
) -> list[str]:  # fmt: skip
    """The markdown of one map: a gain table per method, the chosen rho, the checks."""
    lines = [f"### `{nm.base}`: symmetric label noise × epoch budget", ""]
    for m in methods:
        if m == "baseline":
            continue
        lines += [f"**{m.upper()} − baseline** (points)", ""]
        lines += [*_grid_table(nm, lambda t, m=m: _cell_text(rows, t, m)), ""]
    for m in (m for m in methods if any(hypers.get((t, m)) and hypers[(t, m)].rho is not None
                                        for t in nm.tasks.values())):  # fmt: skip
        lines += [f"**{m.upper()}: chosen rho** (and averaging start)", ""]
        lines += [*_grid_table(nm, lambda t, m=m: _rho_text(hypers, t, m)), ""]
    if nm.checks:
        head = ["Check (class-dependent noise)", *(f"{m.upper()} − baseline" for m in methods
                                                    if m != "baseline"), "SAM rho"]  # fmt: skip
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for t in nm.checks:
            cells = [_cell_text(rows, t, m) for m in methods if m != "baseline"]
            lines.append("| " + " | ".join([t, *cells, _rho_text(hypers, t, "sam")]) + " |")
        lines.append("")
    return lines


def _matrix(nm: NoiseMap, value: Any) -> np.ndarray:
    """``value(task)`` over the map (``nan`` for absent cells), noise rows × budget columns."""
    out = np.full((len(nm.noises), len(nm.factors)), np.nan)
    for i, n in enumerate(nm.noises):
        for j, f in enumerate(nm.factors):
            task = nm.tasks.get((n, f))
            v = value(task) if task else None
            out[i, j] = np.nan if v is None else v
    return out


def _heat(ax: Any, nm: NoiseMap, data: np.ndarray, texts: np.ndarray, title: str, **kw: Any) -> Any:
    image = ax.imshow(np.ma.masked_invalid(data), origin="lower", aspect="auto", **kw)
    ax.set_xticks(range(len(nm.factors)), [f"{f:g}×" for f in nm.factors])
    ax.set_yticks(range(len(nm.noises)), [f"{n} %" for n in nm.noises])
    ax.set_xlabel("epoch budget")
    ax.set_ylabel("label noise")
    ax.set_title(title, fontsize="medium")
    for (i, j), text in np.ndenumerate(texts):
        if text:
            ax.text(j, i, text, ha="center", va="center", fontsize="x-small")
    return image


def map_figure(
    plt: Any, nm: NoiseMap, rows: Mapping[str, Any], hypers: Mapping[tuple[str, str], Hyper],
    methods: Sequence[str],
) -> Any:  # fmt: skip
    """Heat maps: each method's gain over the baseline (memorisation written in), SAM's rho."""
    others = [m for m in methods if m != "baseline"]
    gains = {m: _matrix(nm, lambda t, m=m: getattr(_gain(rows, t, m), "mean", None))
             for m in others}  # fmt: skip
    finite = [abs(v) for g in gains.values() for v in g.flat if np.isfinite(v)]
    vmax = max(finite, default=1.0) or 1.0
    panels = len(others) + 1
    ncols = min(panels, 3)  # rows of three panels: room for the two-line cell texts
    nrows = -(-panels // ncols)
    fig, grid = plt.subplots(
        nrows, ncols, figsize=(4.8 * ncols, 4.4 * nrows), squeeze=False, layout="constrained"
    )
    axes = list(grid.flat)
    for ax in axes[panels:]:
        ax.remove()
    axes = axes[:panels]
    images = []
    for ax, m in zip(axes, others, strict=False):
        texts = np.empty(gains[m].shape, dtype=object)
        for i, n in enumerate(nm.noises):
            for j, f in enumerate(nm.factors):
                t = nm.tasks.get((n, f))
                texts[i, j] = "" if t is None else _cell_text(rows, t, m).replace(" (", "\n(")
        images.append(_heat(ax, nm, gains[m], texts, f"{m.upper()} − baseline (points)",
                            cmap="RdBu", vmin=-vmax, vmax=vmax))  # fmt: skip
    if images:  # one shared scale, symmetric about 0
        fig.colorbar(images[0], ax=axes[:-1], shrink=0.8, label="test accuracy gain (points)")
    rho = _matrix(nm, lambda t: getattr(hypers.get((t, "sam")), "rho", None))
    texts = np.vectorize(lambda v: "" if not np.isfinite(v) else f"{v:g}", otypes=[object])(rho)
    _heat(axes[-1], nm, np.log10(rho), texts, "SAM: chosen rho (log color)", cmap="viridis")
    fig.suptitle(f"{nm.base}: when does flatness help? (* Holm p < 0.05; mem: % of flipped "
                 "labels reproduced, baseline→method)", fontsize="medium")  # fmt: skip
    return fig


def write_map_figures(
    out: Path, maps: Sequence[NoiseMap], rows: Mapping[str, Any],
    hypers: Mapping[tuple[str, str], Hyper], methods: Sequence[str],
) -> list[str]:  # fmt: skip
    """Save ``map_<base>.png`` per map into ``out``; the file names (none without matplotlib)."""
    plt = pyplot_agg()
    if plt is None:
        return []
    names = []
    for nm in maps:
        fig = map_figure(plt, nm, rows, hypers, methods)
        name = f"map_{re.sub(r'[^A-Za-z0-9_.-]', '_', nm.base)}.png"
        save_figure(fig, out / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names
