"""Matplotlib figures for analysis results (the ``plot`` extra: ``pip install flatmin[plot]``).

Every function returns the :class:`matplotlib.figure.Figure` it drew on and never saves or shows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from flatmin.analysis.results import PathResult, PlaneResult, SpectrumResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_path", "plot_paths", "plot_plane", "plot_spectrum"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'flatmin[plot]'") from exc
    return plt


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    # A figure of our own lays itself out when drawn; a caller's axes keep the caller's layout.
    fig, new_ax = _pyplot().subplots(figsize=figsize, layout="tight")
    return fig, new_ax


def _spans_decades(values: Sequence[np.ndarray], decades: float = 2.0) -> bool:
    """Whether the finite positive ``values`` span more than ``decades`` powers of ten."""
    flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])
    flat = flat[np.isfinite(flat) & (flat > 0)]
    return flat.size > 1 and bool(np.log10(flat.max() / flat.min()) > decades)


def _legend_below(ax: Axes, lines: Sequence[Any], ncol: int) -> None:
    # Below the axes, never over the curves (a loss that explodes at the path's ends fills the
    # corners where matplotlib's "best" placement would go).
    ax.legend(
        lines, [str(ln.get_label()) for ln in lines], fontsize="small", loc="upper center",
        bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False,
    )  # fmt: skip


def _xlabel(result: PathResult) -> str:
    return "distance t along the ray" if result.kind == "ray" else "interpolation coefficient α"


def plot_path(
    result: PathResult,
    *,
    datasets: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Loss (left axis, solid) and error in % (right axis, dashed) along one path.

    The twin-axis figure of Izmailov et al. 2018 (Fig. 4) and Kaddour et al. 2022. The loss axis
    is logarithmic when the losses span more than two decades (a path far from a minimum), and
    the legend sits below the axes.

    Args:
        result: A :class:`PathResult` from ``evaluate_ray`` or ``interpolate``.
        datasets: Data-set names to draw (default: all).
        ax: Axes to draw on (default: a new figure).
        title: Optional title.
    """
    fig, ax = _axes(ax, (5.0, 3.5))
    names = list(result.loss) if datasets is None else list(datasets)
    right = ax.twinx()
    colors = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        c = colors[i % len(colors)]
        ax.plot(result.coords, result.loss[name], color=c, label=f"{name} loss")
        err = result.error[name]
        if not np.all(np.isnan(err)):
            right.plot(result.coords, 100 * err, color=c, ls="--", label=f"{name} error")
    ax.set_xlabel(_xlabel(result))
    ax.set_ylabel("loss")
    if _spans_decades([result.loss[n] for n in names]):
        ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)")
    right.set_ylabel("error (%)")
    lines = ax.get_lines() + right.get_lines()
    _legend_below(ax, lines, ncol=min(4, len(lines)))
    if title:
        ax.set_title(title)
    return fig


def plot_paths(
    results: Mapping[str, PathResult],
    *,
    dataset: str,
    metric: str = "loss",
    ax: Axes | None = None,
    title: str | None = None,
    logy: bool | None = None,
) -> Figure:
    """Several paths (e.g. rays from SGD, SWA and SAM solutions) on one axes (legend below).

    Args:
        results: Label → :class:`PathResult`.
        dataset: Which data set to draw.
        metric: ``"loss"`` or ``"error"`` (drawn in %).
        ax: Axes to draw on (default: a new figure).
        title: Optional title.
        logy: Logarithmic y axis (default: when the values span more than two decades).

    Raises:
        ValueError: for an unknown metric.
    """
    if metric not in ("loss", "error"):
        raise ValueError(f"Invalid metric: {metric!r} (expected 'loss' or 'error')")
    fig, ax = _axes(ax, (5.0, 3.5))
    first = next(iter(results.values()))
    drawn = []
    for label, res in results.items():
        values = res.loss[dataset] if metric == "loss" else 100 * res.error[dataset]
        ax.plot(res.coords, values, label=label)
        drawn.append(values)
    ax.set_xlabel(_xlabel(first))
    ax.set_ylabel(f"{dataset} {'loss' if metric == 'loss' else 'error (%)'}")
    if logy or (logy is None and _spans_decades(drawn)):
        ax.set_yscale("log")
    _legend_below(ax, ax.get_lines(), ncol=min(4, len(results)))
    if title:
        ax.set_title(title)
    return fig


def plot_plane(
    result: PlaneResult,
    *,
    dataset: str,
    metric: str = "loss",
    levels: int | Sequence[float] = 20,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Filled contour plot of a 2-D plane (Li et al. 2018).

    Args:
        result: A :class:`PlaneResult`.
        dataset: Which data set to draw.
        metric: ``"loss"`` or ``"error"``.
        levels: Number of contour levels or the levels.
        ax: Axes to draw on (default: a new figure).
        title: Optional title.
    """
    if metric not in ("loss", "error"):
        raise ValueError(f"Invalid metric: {metric!r} (expected 'loss' or 'error')")
    fig, ax = _axes(ax, (4.5, 4.0))
    values = result.loss[dataset] if metric == "loss" else result.error[dataset]
    xx, yy = np.meshgrid(result.x, result.y, indexing="ij")
    cs = ax.contourf(xx, yy, values, levels=levels, cmap="viridis")
    ax.contour(xx, yy, values, levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(cs, ax=ax, label=f"{dataset} {metric}")
    ax.plot([0], [0], "r*", markersize=10)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    if title:
        ax.set_title(title)
    return fig


def plot_spectrum(
    result: SpectrumResult | Mapping[str, SpectrumResult],
    *,
    log: bool = True,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Hessian eigenvalue density from SLQ (log scale by default, as in Ghorbani et al. 2019).

    Args:
        result: One :class:`SpectrumResult` or label → result to overlay.
        log: Logarithmic density axis (floored at 1e-8 of the peak).
        ax: Axes to draw on (default: a new figure).
        title: Optional title.
    """
    fig, ax = _axes(ax, (5.0, 3.5))
    items = result.items() if isinstance(result, Mapping) else [("", result)]
    for label, res in items:
        density = res.density
        if log:
            density = np.maximum(density, 1e-8 * density.max())
        ax.plot(res.grid, density, label=label or None)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if isinstance(result, Mapping):
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig
