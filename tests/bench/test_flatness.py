"""The flatness study: its reproduction check compares each method's own weights; its figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flatmin.bench import BenchConfig, Hyper, run_grid
from flatmin.bench.flatness import FLATNESS, reproduction
from flatmin.bench.train import average_key
from helpers.toy_tasks import ToyResolver

START = 0.5


def _record(live: float, average: float) -> dict:
    return {
        "hash": "h", "method": "baseline", "status": "ok", "epochs_planned": 4,
        "final": {"test_acc": live},
        "averages": {average_key(START): {"test_acc": average}},
    }  # fmt: skip


def test_reproduction_reads_a_view_on_its_average():
    hyper = Hyper(start=START)
    rep = reproduction("swa", hyper, _record(0.70, 0.72), _record(0.70, 0.71))
    assert rep == {"recorded_final_test_acc": 0.72, "retrained_final_test_acc": 0.71}
    # The trajectory itself is read on its live weights, as before.
    base = reproduction("baseline", Hyper(), _record(0.70, 0.72), _record(0.70, 0.71))
    assert base == {"recorded_final_test_acc": 0.70, "retrained_final_test_acc": 0.70}
    assert reproduction("swa", hyper, None, _record(0.7, 0.7))["recorded_final_test_acc"] is None


def _grid(out):
    cfg = BenchConfig(
        out=out, tasks=("toy-a",), methods=("baseline", "swa", "sam", "wasam"), seeds=(0,),
        analysis_task="toy-a", epochs=3, progress=False,
    )  # fmt: skip
    return run_grid(cfg, resolver=ToyResolver())


def test_study_flags_a_view_whose_average_was_not_reproduced(tmp_path):
    pytest.importorskip("matplotlib")
    summary = _grid(tmp_path)
    study = summary.flatness
    by_method = {r.method: r for r in summary.records}
    for m in study["methods"]:
        rep = study["reproduced"][m]
        # Each entry is the result the report shows: SWA's and WASAM's are their averages'.
        assert rep["recorded_final_test_acc"] == by_method[m].final.test_acc, m
        assert rep["retrained_final_test_acc"] == rep["recorded_final_test_acc"], m
    # Alter the recorded average of the baseline's run (SWA's result) only; the live weights'
    # accuracy is unchanged, so a check on the live weights would still call SWA reproduced.
    path = tmp_path / "results.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    swa_run = study["reproduced"]["swa"]["run"]
    start = average_key(study["hypers"]["swa"]["start"])
    for rec in records:
        if rec["hash"] == swa_run:
            rec["averages"][start]["test_acc"] += 0.25
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / FLATNESS).unlink()
    study = _grid(tmp_path).flatness
    rep = study["reproduced"]
    assert rep["swa"]["recorded_final_test_acc"] != rep["swa"]["retrained_final_test_acc"]
    for m in ("baseline", "sam", "wasam"):
        assert rep[m]["recorded_final_test_acc"] == rep[m]["retrained_final_test_acc"], m
    assert "**Not reproduced exactly:** swa (see flatness.json)." in (
        tmp_path / "report.md"
    ).read_text()
    # Both sets' spectra are stored.
    for m in study["methods"]:
        assert {"nodes", "weights"} <= set(study["measures"][m]["test"]["spectrum"])


# -- figures -------------------------------------------------------------------------------


def _study() -> dict:
    coords = np.linspace(-0.5, 1.5, 25).tolist()
    path = {"coords": coords, "loss": {"train": [1.0 + c * c for c in coords]},
            "error": {"test": [0.1 + 0.01 * c for c in coords]}}  # fmt: skip
    return {
        "task": "toy-noisy", "seed": 0, "settings": {"max_batches": 4},
        "rays": {"baseline": path, "sam": path},
        "interpolations": {"baseline→sam": path, "baseline→wasam": path},
    }  # fmt: skip


def _overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bad = []
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in labels]
        for (a, ba), (b, bb) in zip(zip(labels, boxes), zip(labels[1:], boxes[1:]), strict=False):
            if ba.x1 > bb.x0:
                bad.append((a.get_text(), b.get_text()))
    return bad


@pytest.mark.parametrize("kind", ["rays", "interpolations"])
def test_path_figures_say_what_they_show_and_their_ticks_do_not_overlap(kind):
    plt = pytest.importorskip("matplotlib.pyplot")
    from flatmin.bench.flatness import path_figure

    fig = path_figure(plt, _study(), kind)
    assert _overlapping_tick_labels(fig) == []
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2]
    title = fig._suptitle.get_text()
    if kind == "rays":
        assert "one random filter-normalised direction" in title
    else:
        assert "recomputed at every point" in title
    plt.close(fig)


def test_spectrum_figure_has_train_and_test_and_a_title_inside_the_figure():
    plt = pytest.importorskip("matplotlib.pyplot")
    from flatmin.analysis import SpectrumResult
    from flatmin.bench.flatness import spectrum_figure

    grid = np.linspace(-1, 10, 50)

    def spec(scale):
        return SpectrumResult(nodes=np.array([[0.0, scale]]), weights=np.array([[0.9, 0.1]]),
                              grid=grid, density=np.exp(-((grid - scale) ** 2)))  # fmt: skip

    spectra = {"train": {"baseline": spec(1.0), "sam": spec(5.0)},
               "test": {"baseline": spec(8.0), "sam": spec(2.0)}}  # fmt: skip
    fig = spectrum_figure(plt, {"task": "toy-noisy", "seed": 0, "settings": {"max_batches": 4}},
                          spectra)  # fmt: skip
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["training set, its noisy labels", "test set, true labels"]
    for ax, by in zip(fig.axes, spectra.values(), strict=True):
        assert [line.get_label() for line in ax.get_lines()] == list(by)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width  # not cut off
    assert "Hessian eigenvalue density" in fig._suptitle.get_text()
    plt.close(fig)
