"""The plots a person compares: labelled axes, integer layer ticks, a band over seeds only with three or more,
legends below the data, a log axis only across decades, and one line per distinct construction."""

from pathlib import Path

import numpy as np
import pytest

from iclgd.report import plots


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would write, by file name (inspected instead of saved)."""
    figs = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.__setitem__(Path(path).name, fig))
    return figs


def _seed(rng, n_layers=2):
    layers = lambda: {"per_layer": rng.normal(size=n_layers).tolist()}  # noqa: E731
    return {"simaou": {**layers(), "baseline_uniform": layers(), "baseline_gaussian": layers()}}


@pytest.mark.parametrize("n_seeds, bands", [(1, 0), (2, 0), (3, 3)])
def test_per_layer_plots_label_their_axes_tick_whole_layers_and_band_only_three_seeds(figures, n_seeds, bands):
    rng = np.random.default_rng(0)
    seeds = [_seed(rng) for _ in range(n_seeds)]
    written = plots.plot_compare(seeds, Path("."), "t")
    assert written == ["simaou_layers.png"]  # the panels whose figures the results lack are not drawn
    ax = figures["simaou_layers.png"].axes[0]
    assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "cosine"
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 1]
    assert ticks == [0, 1]  # a 2-layer model: layers 0 and 1, no 0.5
    assert len(ax.collections) == bands  # fill_between bands: min-max over seeds, only with >= 3 seeds
    legend = ax.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().y0 < ax.get_window_extent().y0  # below the axes
    assert np.allclose(ax.lines[0].get_ydata(), np.mean([s["simaou"]["per_layer"] for s in seeds], axis=0))


def test_a_ratio_in_a_narrow_range_gets_a_linear_axis_and_one_across_decades_a_log_axis(figures):
    rows = [{"layer": l, "softmax_cos": 0.9, "softmax_relerr": r, "dW/WZSL": q}
            for l, r, q in ((0, 1e-3, 2.9), (1, 0.5, 3.7))]
    plots.plot_verify(rows, Path("dual_verify.png"), "t")
    gap, ratio = figures["dual_verify.png"].axes
    assert gap.get_yscale() == "log" and ratio.get_yscale() == "linear"
    assert gap.get_ylabel() and ratio.get_ylabel() == "norm ratio"


@pytest.mark.parametrize("layers, gd_lines", [(1, 1), (3, 3)])
def test_the_regression_loss_is_drawn_as_the_printed_mse_with_one_line_per_distinct_construction(
        figures, monkeypatch, layers, gd_lines):
    monkeypatch.setattr(plots, "plot_calibration", lambda *a, **k: None)
    curve = np.linspace(2.0, 0.5, 120)  # the training loss: ½ squared error
    loss = {"gd_1step": 1.5, f"gd_{layers}steps": 1.2, f"gdpp_{layers}steps": 0.9}
    r = {"config": {"layers": layers, "model": "m"}, "train_curve": curve.tolist(), "loss": loss,
         "_sens": (np.ones((4, 2)), np.ones((4, 2))), "trained_vs_gd": {"sensitivity_cos": 1.0}}
    plots.plot_synthetic(r, {}, Path("."))
    ax = figures["loss.png"].axes[0]
    assert ax.get_ylabel() == "mean squared error"
    trained, *gd = ax.lines
    assert trained.get_ydata().max() == pytest.approx(2 * curve.max(), rel=0.02)  # MSE = 2 × ½ squared error
    assert len(gd) == gd_lines
    drawn = {float(l.get_ydata()[0]) for l in gd}
    assert drawn == ({loss["gd_1step"]} if layers == 1 else set(loss.values()))  # eval MSE as printed, not halved


@pytest.mark.parametrize("seeds, bars_with_errors", [([1], 0), ([1, 2, 3], 4)])
def test_calibration_bars_show_a_ci_only_over_three_or_more_seeds(figures, seeds, bars_with_errors):
    from iclgd.report.plots import CALIBRATED

    fig_vals = {m: (0.5, 0.4, 0.6) for m in CALIBRATED}
    summary = {"seeds": seeds, "calibration": {"construction": {**fig_vals, **{f"{m}_random": (0.0, -0.1, 0.1)
                                                                              for m in CALIBRATED}},
                                               "trained": fig_vals, "untrained": fig_vals}}
    plots.plot_calibration(summary, Path("calibration.png"), "t")
    ax = figures["calibration.png"].axes[0]
    assert ax.get_ylabel()
    from matplotlib.container import BarContainer, ErrorbarContainer

    assert sum(isinstance(c, BarContainer) for c in ax.containers) == 4  # construction, trained, untrained, random
    assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == bars_with_errors
