"""The report's figures, checked on their matplotlib objects (what is drawn, labelled, marked)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.collections import PolyCollection

from flatmin.bench import MethodResult, parse_record, summarize
from flatmin.bench.figures import (
    curves_figure,
    differences_figure,
    pyplot_agg,
    report_figures,
)

plt = pyplot_agg()
METHODS = ["baseline", "swa", "sam", "wasam"]
SEEDS = (0, 1, 2)
# Test accuracy (points) by task, method and seed: SAM's gain is 30 points on "big" and about
# half a point on "small"; SWA equals the baseline on every seed of "small" (a constant cell).
ACC = {
    "big": {"baseline": [60.0, 62.0, 61.0], "swa": [61.0, 62.0, 61.5], "sam": [90.0, 92.5, 91.0],
            "wasam": [90.5, 92.0, 91.5]},
    "small": {"baseline": [80.0, 80.4, 79.8], "swa": [80.0, 80.4, 79.8], "sam": [80.6, 80.7, 80.5],
              "wasam": [80.2, 81.4, 79.9]},
}  # fmt: skip
EPOCHS = 5


def _curve(task: str, method: str, seed: int) -> list[float]:
    """Validation accuracy per epoch (fraction): a ramp that differs per seed."""
    top = ACC[task]["baseline" if method == "swa" else "sam" if method == "wasam" else method][seed]
    return [(top / 100) * (e + 1 + seed) / (EPOCHS + 2) for e in range(EPOCHS)]


def _records() -> list[dict]:
    recs = []
    for task, by in ACC.items():
        for m, accs in by.items():
            for s in SEEDS:
                view = m in ("swa", "wasam")
                recs.append({
                    "hash": f"{task}-{m}-{s}", "stage": "eval", "hyper": {}, "epochs": EPOCHS,
                    "budget": "full", "recipe": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0,
                                                        "batch_size": 8, "epochs": EPOCHS},
                    "task": task, "method": m, "seed": s, "status": "ok", "domain": "vision",
                    "model": "net", "sizes": {"test": 1000}, "wall_time": 1.0,
                    # A view's final is its average; its curves are its trajectory's live weights.
                    "final": {"test_acc": accs[s] / 100, "val_acc": accs[s] / 100 + 0.01,
                              "train_acc": 1.0, "train_loss": 0.1, "test_loss": 0.5},
                    "curves": {
                        "val_acc": _curve(task, m, s),
                        "train_loss": [1.0 / (e + 1 + s) for e in range(EPOCHS)],
                    },
                    "trajectory": {"swa": "baseline", "wasam": "sam"}.get(m, m) if view else m,
                })  # fmt: skip
    return recs


@pytest.fixture(scope="module")
def rows():
    results = [MethodResult.parse(r, parse_record(r)) for r in _records()]
    return summarize(results, METHODS)


def _panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_differences_one_panel_per_task_with_its_own_scale(rows):
    fig = differences_figure(plt, rows, METHODS)
    panels = _panels(fig)
    assert set(panels) == {"big", "small"}
    for r in rows:
        ax = panels[r.task]
        heights = [p.get_height() for p in ax.patches]
        expected = [r.diffs[m].mean for m in ("swa", "sam", "wasam")]
        np.testing.assert_allclose(heights, expected)
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["SWA", "SAM", "WASAM"]
    # The 30-point gain does not flatten the half-point one: "small" has its own y-range.
    assert panels["big"].get_ylim()[1] > 30
    assert panels["small"].get_ylim()[1] < 5
    title = fig._suptitle.get_text()
    assert "95 % CI" in title and "Holm" in title
    plt.close(fig)


def test_differences_marks_exactly_the_significant_and_constant_cells(rows):
    fig = differences_figure(plt, rows, METHODS)
    panels = _panels(fig)
    marked = 0
    for r in rows:
        texts = [t for t in panels[r.task].texts]
        for i, m in enumerate(("swa", "sam", "wasam")):
            c = r.diffs[m]
            mark = "=" if c.constant else "*" if c.significant else None
            at = [t.get_text() for t in texts if abs(t.xy[0] - i) < 1e-9]
            assert at == ([mark] if mark else []), (r.task, m, at)
            marked += mark is not None
    # The fixture has both kinds (else the loop above checks nothing): SAM on "big" is
    # significant after Holm, SWA on "small" identical on every seed.
    assert rows[0].diffs["sam"].significant and rows[1].diffs["swa"].constant
    assert marked >= 2
    plt.close(fig)


def test_curves_show_mean_and_spread_and_the_averages_at_the_end(rows):
    recs = _records()
    fig = curves_figure(plt, rows, recs, METHODS, "val_acc")
    ax = _panels(fig)["big"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    # Trajectories: a mean line each; views (swa, wasam) only as their average's marker.
    assert {"baseline", "sam"} <= set(lines) and "swa" not in lines and "wasam" not in lines
    curves = np.array([_curve("big", "sam", s) for s in SEEDS]) * 100
    np.testing.assert_allclose(lines["sam"].get_ydata(), curves.mean(axis=0))
    np.testing.assert_array_equal(lines["sam"].get_xdata(), np.arange(1, EPOCHS + 1))
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # baseline and sam
    ys = np.concatenate([b.get_paths()[0].vertices[:, 1] for b in bands])
    assert np.isclose(ys.max(), curves.max()) and np.isclose(ys.min(), 100 * np.min(
        [_curve("big", "baseline", s) for s in SEEDS]))  # fmt: skip
    # SWA's and WASAM's final average: a marker at the last epoch at the mean of the averages.
    for view in ("swa", "wasam"):
        (marker,) = [c for c in ax.containers if c.get_label() == f"{view} (average, end)"]
        x, y = marker.lines[0].get_data()
        assert list(x) == [EPOCHS]
        assert np.isclose(y[0], np.mean([a + 1.0 for a in ACC["big"][view]]))
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)  # whole epochs only
    title = fig._suptitle.get_text()
    assert "mean over 3 seeds" in title and "min–max" in title and "average" in title
    plt.close(fig)


def test_train_loss_curves_draw_no_average_marker(rows):
    fig = curves_figure(plt, rows, _records(), METHODS, "train_loss")
    ax = _panels(fig)["small"]
    assert not ax.containers and ax.get_yscale() == "log"
    assert {line.get_label() for line in ax.get_lines()} == {"baseline", "sam"}
    assert "not drawn" in fig._suptitle.get_text()
    plt.close(fig)


def test_report_figures_write_each_file(rows, tmp_path):
    names = report_figures(tmp_path, rows, _records(), METHODS)
    assert names == ["differences.png", "curves_val.png", "curves_train_loss.png"]
    for name in names:
        assert (tmp_path / name).stat().st_size > 1000
