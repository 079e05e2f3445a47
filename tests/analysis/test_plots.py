import numpy as np
import pytest

from flatmin.analysis import (
    PathResult,
    PlaneResult,
    SpectrumResult,
    plot_path,
    plot_paths,
    plot_plane,
    plot_spectrum,
)

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402


def _path(shift=0.0):
    t = np.linspace(-1, 1, 5)
    return PathResult(
        kind="ray",
        coords=t,
        loss={"train": t**2 + shift, "test": t**2 + 0.1},
        error={"train": np.abs(t) / 2, "test": np.full(5, np.nan)},
        settings={"bn": "frozen"},
    )


def test_plots_return_figures_and_draw_the_data():
    import matplotlib.pyplot as plt

    fig = plot_path(_path(), title="ray")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), _path().loss["train"])
    assert len(fig.axes[1].get_lines()) == 1  # NaN error curve is skipped
    fig2 = plot_paths({"a": _path(), "b": _path(1.0)}, dataset="train", metric="error", logy=True)
    np.testing.assert_allclose(
        fig2.axes[0].get_lines()[0].get_ydata(), 100 * _path().error["train"]
    )
    plane = PlaneResult(
        x=np.linspace(-1, 1, 4), y=np.linspace(-1, 1, 3),
        loss={"d": np.arange(12.0).reshape(4, 3)}, error={"d": np.zeros((4, 3))},
    )  # fmt: skip
    assert isinstance(plot_plane(plane, dataset="d", levels=5), Figure)
    spec = SpectrumResult(
        nodes=np.array([[0.0, 1.0]]), weights=np.array([[0.5, 0.5]]),
        grid=np.linspace(-1, 2, 50), density=np.exp(-np.linspace(-1, 2, 50) ** 2),
        settings={"n_params": 2},
    )  # fmt: skip
    assert isinstance(plot_spectrum({"x": spec}), Figure)
    assert spec.trace == pytest.approx(1.0)
    with pytest.raises(ValueError, match="Invalid metric"):
        plot_paths({"a": _path()}, dataset="train", metric="acc")
    plt.close("all")


def test_losses_spanning_decades_get_a_log_axis_and_the_legend_stays_off_the_data():
    import matplotlib.pyplot as plt

    t = np.linspace(-0.5, 1.5, 9)
    wide = PathResult(
        kind="interpolation", coords=t,
        loss={"train": 0.1 + (t - 0.5) ** 2},  # 0.1 .. 1.1: one decade
        error={"train": np.zeros(9)},
    )  # fmt: skip
    assert plot_path(wide).axes[0].get_yscale() == "linear"
    huge = PathResult(kind="interpolation", coords=t, loss={"train": 10.0 ** (4 * np.abs(t - 0.5))},
                      error={"train": np.zeros(9)})  # 1 .. 1e4  # fmt: skip
    fig = plot_path(huge)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    # The legend is anchored below the axes (outside the plotting area), not over the curves.
    legend = ax.get_legend()
    fig.canvas.draw()
    assert legend.get_window_extent().y1 <= ax.get_window_extent().y0
    assert plot_paths({"a": huge}, dataset="train").axes[0].get_yscale() == "log"
    assert plot_paths({"a": wide}, dataset="train").axes[0].get_yscale() == "linear"
    assert plot_paths({"a": huge}, dataset="train", logy=False).axes[0].get_yscale() == "linear"
    plt.close("all")
