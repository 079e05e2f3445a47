"""The search's files: ``tune.json`` (written atomically) and its figure.

``tune.json`` holds the objective's definition, the best trial and every trial (state, params,
score, per-seed values and curves). It is written to a temporary file in the same directory,
``fsync``-ed and moved over the old one with ``os.replace``, so a reader (or a crash) only ever
sees a whole file.

The figure (:func:`plot_search`) has two panels: the score of each trial against its first
parameter (rho; log axis for a log parameter) with the per-seed values, pruned trials marked
where they stopped; and the pruning front, every trial's reported values per step (the seeds'
epochs one after the other), pruned trials ending in a cross.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from flatmin._io import atomic_write_text, finite_json
from flatmin.tune.result import TuneResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_search", "write_result"]


def write_result(path: str | os.PathLike[str], result: TuneResult) -> None:
    """Write ``result.as_dict()`` to ``path`` atomically, as strict JSON (NaN/inf as ``null``)."""
    data = finite_json(result.as_dict())[0]
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def plot_search(result: TuneResult) -> Figure:
    """The search's figure: score against the first parameter, and the pruning front.

    Needs matplotlib (``pip install 'flatmin[plot]'``). Returns a ``Figure`` that is not
    registered with pyplot (``fig.savefig(path)``; nothing to close).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, front = fig.subplots(1, 2)
    p = result.space[0]
    best = result.best
    colors = {"complete": "tab:blue", "pruned": "tab:gray", "failed": "tab:red"}
    for t in result.trials:
        if p.name not in t.params or t.state not in colors:
            continue
        x = t.params[p.name]
        c = colors[t.state]
        if t.state == "complete" and t.score is not None:
            finals = [r.final for r in t.runs if r.final is not None]
            ax.scatter([x] * len(finals), finals, s=12, color=c, alpha=0.45, linewidths=0)
            ax.scatter([x], [t.score.value], s=36, color=c, zorder=3)
        elif t.state == "pruned":
            last = [r.values[-1] for r in t.runs if r.values]
            if last:
                ax.scatter([x], [last[-1]], marker="x", s=36, color=c, zorder=3)
        else:
            ax.axvline(x, color=c, linewidth=0.8, linestyle=":")
    if best is not None and best.score is not None:
        x = best.params[p.name]
        ax.scatter([x], [best.score.value], s=160, facecolors="none", edgecolors="black",
                   zorder=4, label=f"best: {p.name}={x:.4g}")  # fmt: skip
    ax.scatter([], [], s=36, color=colors["complete"], label="score (complete)")
    ax.scatter([], [], s=12, color=colors["complete"], alpha=0.45, label="per seed")
    ax.scatter([], [], marker="x", s=36, color=colors["pruned"], label="pruned (last value)")
    if p.log:
        ax.set_xscale("log")
    ax.set_xlabel(p.name)
    ax.set_ylabel("validation value")
    ax.set_title(f"score = mean − {result.spread_penalty:g}·std over {len(result.seeds)} seeds")
    ax.legend(fontsize="small")

    for t in result.trials:
        if t.state not in colors:
            continue
        c = colors[t.state]
        is_best = best is not None and t.number == best.number
        style = {
            "color": "black" if is_best else c,
            "alpha": 1.0 if is_best else 0.5,
            "linewidth": 1.6 if is_best else 0.8,
        }
        offset = 0
        for r in t.runs:  # one segment per seed: the seeds' curves are not joined
            steps = [offset + e for e in r.epochs]
            front.plot(steps, r.values, **style)
            if r.state == "pruned" and steps:
                front.scatter([steps[-1]], [r.values[-1]], marker="x", s=30, color=c, zorder=3)
            offset += (r.epochs[-1] + 1) if r.epochs else 0
    for i in range(1, len(result.seeds)):
        bounds = [
            sum((r.epochs[-1] + 1) for r in t.runs[:i]) for t in result.trials if len(t.runs) > i
        ]
        if bounds:
            front.axvline(bounds[0], color="black", linewidth=0.6, linestyle="--")
    front.set_xlabel("step (seed after seed, epochs)")
    front.set_ylabel("reported value")
    front.set_title(
        f"pruning front ({result.pruner}): {result.count('complete')} complete, "
        f"{result.count('pruned')} pruned, {result.count('failed')} failed"
    )
    return fig
